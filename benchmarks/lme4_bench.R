# lme4 side of the REML benchmark (benchmarks/bench_reml.py calls this script).
#
# Usage:
#   Rscript benchmarks/lme4_bench.R [--data-dir DIR] [--models a,b,...]
#                                   [--repeats K] [--repeats-large K] [--no-warmup]
#
# For each model: read the bundled CSV, turn the grouping columns (and InstEval's
# `service`) into factors, do one untimed warm-up lmer() call, then time K calls of
# lmer(formula, data, REML = TRUE) with proc.time() (elapsed wall-clock seconds).
# Data reading and factor conversion are outside the timed region, as on the Python
# side.  lmer() is run with its defaults (optimizer "nloptwrap", i.e. NLopt BOBYQA).
#
# Output: one JSON object on stdout (nothing else is printed there), with per model
# the formula, n, all timings, their median, REMLcrit() and the optimizer's feval count.

suppressPackageStartupMessages(library(lme4))

args <- commandArgs(trailingOnly = TRUE)
opt <- list(data_dir = NULL, models = NULL, repeats = 5L, repeats_large = 3L, warmup = TRUE)
i <- 1L
while (i <= length(args)) {
  a <- args[[i]]
  if (a == "--data-dir") { opt$data_dir <- args[[i + 1L]]; i <- i + 2L }
  else if (a == "--models") { opt$models <- strsplit(args[[i + 1L]], ",")[[1]]; i <- i + 2L }
  else if (a == "--repeats") { opt$repeats <- as.integer(args[[i + 1L]]); i <- i + 2L }
  else if (a == "--repeats-large") { opt$repeats_large <- as.integer(args[[i + 1L]]); i <- i + 2L }
  else if (a == "--no-warmup") { opt$warmup <- FALSE; i <- i + 1L }
  else stop("unknown argument: ", a)
}
if (is.null(opt$data_dir)) {
  # default: bayeslmm/datasets/data relative to this script's repository
  file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
  here <- if (length(file_arg)) dirname(normalizePath(sub("^--file=", "", file_arg[[1]]))) else "benchmarks"
  opt$data_dir <- file.path(dirname(here), "bayeslmm", "datasets", "data")
}

# name, file, formula, factor columns, "large" (uses --repeats-large)
MODELS <- list(
  InstEval = list(file = "InstEval.csv.gz",
                  formula = "y ~ 1 + service + (1|s) + (1|d) + (1|dept)",
                  factors = c("s", "d", "dept", "service"), large = TRUE),
  sleepstudy = list(file = "sleepstudy.csv",
                    formula = "Reaction ~ Days + (Days | Subject)",
                    factors = c("Subject"), large = FALSE),
  exam = list(file = "exam.csv",
              formula = "normexam ~ standLRT + (standLRT | school)",
              factors = c("school"), large = FALSE),
  Penicillin = list(file = "Penicillin.csv",
                    formula = "diameter ~ 1 + (1|plate) + (1|sample)",
                    factors = c("plate", "sample"), large = FALSE)
)
if (is.null(opt$models)) opt$models <- names(MODELS)
unknown <- setdiff(opt$models, names(MODELS))
if (length(unknown)) stop("unknown model(s): ", paste(unknown, collapse = ", "))

read_data <- function(m) {
  path <- file.path(opt$data_dir, m$file)
  d <- if (grepl("\\.gz$", path)) read.csv(gzfile(path)) else read.csv(path)
  for (f in m$factors) d[[f]] <- factor(d[[f]])
  d
}

# minimal JSON writer (no dependency on jsonlite)
num <- function(x) if (length(x) == 1L && is.finite(x)) formatC(x, digits = 17, format = "g") else "null"
jstr <- function(x) paste0('"', gsub('"', '\\\\"', x), '"')
arr <- function(x) paste0("[", paste(vapply(x, num, ""), collapse = ", "), "]")
obj <- function(kv) paste0("{", paste(paste0(jstr(names(kv)), ": ", unlist(kv)), collapse = ", "), "}")

results <- list()
for (name in opt$models) {
  m <- MODELS[[name]]
  d <- read_data(m)
  f <- as.formula(m$formula)
  k <- if (m$large) opt$repeats_large else opt$repeats
  if (opt$warmup) invisible(lmer(f, data = d, REML = TRUE))
  times <- numeric(k)
  fit <- NULL
  for (r in seq_len(k)) {
    gc(verbose = FALSE)
    t0 <- proc.time()[["elapsed"]]
    fit <- lmer(f, data = d, REML = TRUE)
    times[r] <- proc.time()[["elapsed"]] - t0
  }
  feval <- fit@optinfo$feval
  if (is.null(feval)) feval <- NA
  results[[name]] <- obj(list(
    formula = jstr(m$formula),
    n = num(nrow(d)),
    repeats = num(k),
    times = arr(times),
    median = num(median(times)),
    objective = num(REMLcrit(fit)),
    feval = num(feval),
    theta = arr(getME(fit, "theta")),
    sigma = num(sigma(fit)),
    optimizer = jstr(fit@optinfo$optimizer),
    warnings = jstr(paste(unlist(fit@optinfo$conv$lme4$messages), collapse = "; "))
  ))
}

cat(obj(list(
  lme4_version = jstr(as.character(packageVersion("lme4"))),
  r_version = jstr(paste(R.version$major, R.version$minor, sep = ".")),
  blas = jstr(sessionInfo()$BLAS),
  models = obj(results)
)), "\n")
