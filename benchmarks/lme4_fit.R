# lme4 side of the benchmark suite (benchmarks/run_all.py runs this, one fit per process).
#
# Usage:
#   Rscript benchmarks/lme4_fit.R --data DIR --formula "y ~ x + (1 + x | g)"
#                                 [--repeats K] [--repeat-under SECONDS]
#
# DIR holds the data as written by run_all.py: columns.tsv (name, kind, n) and one
# little-endian binary file per column, <name>.bin: float64 for kind "double", int32
# codes (0-based) for kind "factor" with the levels, in order, one per line in
# <name>.levels.  The same bytes are read by the Python engines, so every engine fits
# the same numbers; reading them is not timed.
#
# Timed, with proc.time() (elapsed): lmer(formula, data, REML = TRUE) with lme4's
# default control (nloptwrap: NLopt BOBYQA).  The first fit in the process is timed
# on its own; when it took less than --repeat-under seconds (default 1) it is followed
# by K more timed fits (default 5) whose median is the reported time, as for the
# Python engines.
#
# Output: one JSON object on stdout with the timings, REMLcrit(), the optimizer's
# feval, θ, σ, fixef() and as.data.frame(VarCorr()) (grp, var1, var2, sdcor).

suppressPackageStartupMessages(library(lme4))

args <- commandArgs(trailingOnly = TRUE)
opt <- list(data = NULL, formula = NULL, repeats = 5L, repeat_under = 1)
i <- 1L
while (i <= length(args)) {
  a <- args[[i]]
  if (a == "--data") { opt$data <- args[[i + 1L]]; i <- i + 2L }
  else if (a == "--formula") { opt$formula <- args[[i + 1L]]; i <- i + 2L }
  else if (a == "--repeats") { opt$repeats <- as.integer(args[[i + 1L]]); i <- i + 2L }
  else if (a == "--repeat-under") { opt$repeat_under <- as.numeric(args[[i + 1L]]); i <- i + 2L }
  else stop("unknown argument: ", a)
}
if (is.null(opt$data) || is.null(opt$formula)) stop("--data and --formula are required")

read_columns <- function(dir) {
  meta <- read.delim(file.path(dir, "columns.tsv"), stringsAsFactors = FALSE)
  cols <- list()
  for (k in seq_len(nrow(meta))) {
    name <- meta$name[[k]]
    n <- meta$n[[k]]
    con <- file(file.path(dir, paste0(name, ".bin")), "rb")
    if (meta$kind[[k]] == "double") {
      v <- readBin(con, "double", n = n, size = 8L, endian = "little")
    } else if (meta$kind[[k]] == "factor") {
      codes <- readBin(con, "integer", n = n, size = 4L, endian = "little")
      levs <- readLines(file.path(dir, paste0(name, ".levels")))
      v <- structure(codes + 1L, levels = levs, class = "factor")
    } else {
      close(con)
      stop("column ", name, ": unknown kind ", meta$kind[[k]])
    }
    close(con)
    if (length(v) != n) stop("column ", name, ": read ", length(v), " values, expected ", n)
    cols[[name]] <- v
  }
  list2DF(cols)
}

# minimal JSON writer (no dependency on jsonlite)
num <- function(x) if (length(x) == 1L && is.finite(x)) formatC(x, digits = 17, format = "g") else "null"
jstr <- function(x) {  # a JSON string: backslashes, quotes and control characters escaped
  x <- gsub("\\", "\\\\", x, fixed = TRUE)
  x <- gsub('"', '\\"', x, fixed = TRUE)
  x <- gsub("\n", "\\n", x, fixed = TRUE)
  x <- gsub("\t", "\\t", x, fixed = TRUE)
  x <- gsub("[[:cntrl:]]", " ", x)
  paste0('"', x, '"')
}
arr <- function(x) paste0("[", paste(vapply(x, num, ""), collapse = ", "), "]")
sarr <- function(x) paste0("[", paste(vapply(x, function(s) if (is.na(s)) "null" else jstr(s), ""),
                                      collapse = ", "), "]")
obj <- function(kv) paste0("{", paste(paste0(jstr(names(kv)), ": ", unlist(kv)), collapse = ", "), "}")

t_read <- proc.time()[["elapsed"]]
d <- read_columns(opt$data)
read_seconds <- proc.time()[["elapsed"]] - t_read
f <- as.formula(opt$formula)

one_fit <- function() {
  gc(verbose = FALSE)
  t0 <- proc.time()[["elapsed"]]
  fit <- lmer(f, data = d, REML = TRUE)
  list(fit = fit, seconds = proc.time()[["elapsed"]] - t0)
}

first <- one_fit()
fit <- first$fit
times <- numeric(0)
if (first$seconds < opt$repeat_under && opt$repeats > 0L) {
  for (r in seq_len(opt$repeats)) {
    res <- one_fit()
    times <- c(times, res$seconds)
    fit <- res$fit
  }
}
vc <- as.data.frame(VarCorr(fit))
feval <- fit@optinfo$feval
if (is.null(feval)) feval <- NA
fe <- fixef(fit)

cat(obj(list(
  engine = jstr("lme4"),
  formula = jstr(opt$formula),
  n = num(nrow(d)),
  read_seconds = num(read_seconds),
  first_seconds = num(first$seconds),
  times = arr(times),
  wall = num(if (length(times)) median(times) else first$seconds),
  objective = num(REMLcrit(fit)),
  feval = num(feval),
  theta = arr(getME(fit, "theta")),
  sigma = num(sigma(fit)),
  fixef_names = sarr(names(fe)),
  fixef = arr(unname(fe)),
  vc_grp = sarr(vc$grp),
  vc_var1 = sarr(vc$var1),
  vc_var2 = sarr(vc$var2),
  vc_sdcor = arr(vc$sdcor),
  optimizer = jstr(fit@optinfo$optimizer),
  warnings = jstr(paste(c(unlist(fit@optinfo$conv$lme4$messages), unlist(fit@optinfo$warnings)),
                        collapse = "; ")),
  lme4_version = jstr(as.character(packageVersion("lme4"))),
  r_version = jstr(paste(R.version$major, R.version$minor, sep = "."))
)), "\n")
