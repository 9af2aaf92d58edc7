# lmerTest side of the inference benchmark (benchmarks/bench_inference.py calls this script).
#
# Usage:
#   Rscript benchmarks/lmertest_bench.R [--data-dir DIR] [--models a,b,...]
#
# For each model: read the bundled CSV, make the factors (R's level order, as
# bayeslmm.datasets does; InstEval's studage and lectage as *unordered* factors so that
# both sides use treatment contrasts and estimate the same coefficients), then time, with
# proc.time() (elapsed seconds), in this order and each once:
#   fit      lme4::lmer(formula, data, REML = TRUE)  (the REML fit alone)
#   setup    lmerTest::as_lmerModLmerTest(fit)       (lmerTest's Hessian and Jacobian of
#            the variance parameters: what lmerTest::lmer adds to lme4's fit)
#   summary  summary(m)                               (Satterthwaite df and p per coefficient)
#   anova    anova(m)                                 (type III F tests, Satterthwaite)
# Data reading and factor conversion are outside the timings.
#
# Output: one JSON object on stdout (nothing else is printed there), per model the
# timings, REMLcrit, the coefficient df and t values and the F values and DenDF.

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
})

args <- commandArgs(trailingOnly = TRUE)
opt <- list(data_dir = NULL, models = NULL)
i <- 1L
while (i <= length(args)) {
  a <- args[[i]]
  if (a == "--data-dir") { opt$data_dir <- args[[i + 1L]]; i <- i + 2L }
  else if (a == "--models") { opt$models <- strsplit(args[[i + 1L]], ",")[[1]]; i <- i + 2L }
  else stop("unknown argument: ", a)
}
if (is.null(opt$data_dir)) {
  file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
  here <- if (length(file_arg)) dirname(normalizePath(sub("^--file=", "", file_arg[[1]]))) else "benchmarks"
  opt$data_dir <- file.path(dirname(here), "bayeslmm", "datasets", "data")
}

INSTEVAL_FACTORS <- c("s", "d", "dept", "service", "studage", "lectage")
MODELS <- list(
  InstEval = list(file = "InstEval.csv.gz", factors = INSTEVAL_FACTORS,
                  formula = "y ~ service + (1|s) + (1|d) + (1|dept)"),
  InstEval_more = list(file = "InstEval.csv.gz", factors = INSTEVAL_FACTORS,
                       formula = "y ~ service + lectage + studage + (1|s) + (1|d) + (1|dept)"),
  ham = list(file = "ham.csv", factors = c("Consumer", "Product", "Information", "Gender"),
             formula = "Informed.liking ~ Product*Information + (1|Consumer) + (1|Consumer:Product)"),
  carrots = list(file = "carrots.csv",
                 factors = c("Consumer", "Frequency", "Gender", "Age", "Homesize", "Work", "Income", "Product"),
                 formula = "Preference ~ sens2*Homesize + (1 + sens2 | Consumer)")
)
if (is.null(opt$models)) opt$models <- names(MODELS)
unknown <- setdiff(opt$models, names(MODELS))
if (length(unknown)) stop("unknown model(s): ", paste(unknown, collapse = ", "))

read_data <- function(m) {
  path <- file.path(opt$data_dir, m$file)
  d <- if (grepl("\\.gz$", path)) read.csv(gzfile(path)) else read.csv(path)
  for (f in m$factors) d[[f]] <- factor(d[[f]])  # levels sorted as numbers / text, as R's default
  d
}

# minimal JSON writer (no dependency on jsonlite)
num <- function(x) if (length(x) == 1L && is.finite(x)) formatC(x, digits = 17, format = "g") else "null"
jstr <- function(x) paste0('"', gsub('"', '\\\\"', x), '"')
arr <- function(x) paste0("[", paste(vapply(x, num, ""), collapse = ", "), "]")
sarr <- function(x) paste0("[", paste(vapply(x, jstr, ""), collapse = ", "), "]")
obj <- function(kv) paste0("{", paste(paste0(jstr(names(kv)), ": ", unlist(kv)), collapse = ", "), "}")

elapsed <- function(expr_fn) {
  gc(verbose = FALSE)
  t0 <- proc.time()[["elapsed"]]
  value <- expr_fn()
  list(value = value, seconds = proc.time()[["elapsed"]] - t0)
}

results <- list()
for (name in opt$models) {
  m <- MODELS[[name]]
  d <- read_data(m)
  f <- as.formula(m$formula)
  fit <- elapsed(function() lme4::lmer(f, data = d, REML = TRUE))
  setup <- elapsed(function() lmerTest::as_lmerModLmerTest(fit$value))
  smry <- elapsed(function() summary(setup$value))
  aov <- elapsed(function() anova(setup$value))
  coefs <- coef(smry$value)
  results[[name]] <- obj(list(
    formula = jstr(m$formula),
    n = num(nobs(fit$value)),
    fit = num(fit$seconds),
    setup = num(setup$seconds),
    summary = num(smry$seconds),
    anova = num(aov$seconds),
    objective = num(REMLcrit(fit$value)),
    coef_names = sarr(rownames(coefs)),
    df = arr(coefs[, "df"]),
    t_value = arr(coefs[, "t value"]),
    terms = sarr(rownames(aov$value)),
    f_value = arr(aov$value[["F value"]]),
    den_df = arr(aov$value[["DenDF"]])
  ))
}

cat(obj(list(
  lmertest_version = jstr(as.character(packageVersion("lmerTest"))),
  lme4_version = jstr(as.character(packageVersion("lme4"))),
  r_version = jstr(paste(R.version$major, R.version$minor, sep = ".")),
  blas = jstr(sessionInfo()$BLAS),
  models = obj(results)
)), "\n")
