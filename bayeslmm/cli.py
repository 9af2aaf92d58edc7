"""Command line: ``bayeslmm fit DATA FORMULA --method reml|ml|nuts|both [--out DIR] [--json PATH]``.

DATA is a CSV or Parquet file, or the name of a bundled dataset
(``bayeslmm datasets`` lists them).  Parquet data go through Dask, partition by
partition (:mod:`bayeslmm.outofcore`), when DATA is a glob, a folder of several
files or above ``DASK_BYTES`` on disk, or when ``--dask`` asks for it.

The REML/ML summary is lmerTest's: the fixed effects with Satterthwaite's denominator
df and p-values (``df`` and ``p_value`` of each coefficient in the JSON, under
``fixef_table``).  ``--anova 3`` (or ``2``) adds the F test of each fixed-effect term,
type III (lmerTest's default) or type II, to what is printed, to the JSON (``anova``)
and to ``--out`` (``anova.csv``).

``--variance``, ``--correlation`` and ``--weights`` give the residuals a structure, R = σ² Λ_R(ρ)
(:mod:`bayeslmm.residual`; nlme's ``weights =`` and ``correlation =``), written as small
expressions: ``--variance "ident(Sex)" | "power(Time)" | "exp(x)" | "fixed(Time)"``,
``--correlation "ar1(Mare)" | "ar1(Mare, time=Day)" | "car1(Subject, time=t)" |
"compsymm(Subject)"``, ``--weights COLUMN`` (precision weights, Var = σ²/w).  The JSON carries
the structure under ``residual_structure`` and the REML/ML estimates under ``residual_params``
(a NUTS fit's posterior has them as ``residual_*`` rows).  After a NUTS fit the posterior
predictive check draws the structured noise, the variance components use the mean residual
variance over the rows (as the REML fit's), and what the structure rules out is a printed
note: LOO under a correlation structure (no pointwise log-likelihood), and in this release
the side-by-side comparison table.

``--method both`` fits the model by REML and by NUTS, prints both summaries and then
the side-by-side table of :func:`bayeslmm.compare`.  ``--out DIR`` writes into DIR
(created if needed) what was printed (``summary.txt``), each fit's results as JSON
(``reml.json``, ``ml.json``, ``nuts.json``) and saved (``*.nc``, readable by
:func:`bayeslmm.load`), the comparison table (``comparison.csv``), each grouping
factor's pooling table (``pooling_<group>.csv``) and the figures as PNG: shrinkage and
caterpillar plots per grouping factor, and for a NUTS fit the variance components
(with the REML estimates when both were fitted) and a posterior predictive check.

Nothing is lost and no traceback is printed:

* ``--out`` and ``--json`` are checked, created and probed with a small file before
  anything is fitted; files of a non-empty ``--out`` that the run will replace are
  named on stderr.
* Each fit's files are written as soon as the fit is done (``summary.txt`` and
  ``--json`` are rewritten after each step), every file under a temporary name then
  renamed, so none is ever half-written.
* An output that cannot be made (the comparison, the F tests, a table or a plot: an
  error of the model's or an internal one) is reported as a warning on stderr and listed as
  skipped; the rest is still written and the exit status is 0.
* Any other failure ends with one ``bayeslmm: error:`` line: exit status 2 for bad
  input or options, 1 for the environment (disk full, read-only, out of memory) or an
  internal error.  Ctrl-C ends with exit status 130 and writes nothing of the step it
  interrupted; the files of the steps that finished before it stay.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import pandas as pd

from .errors import BayesLMMError, DataError, IncompleteTraceError
from .io import SaveError, write_atomically


def read_data(source: str) -> tuple[pd.DataFrame, str]:
    """A DataFrame from a CSV/Parquet path or a bundled dataset's name."""
    from .datasets import list_datasets, load_dataset

    path = Path(source)
    if path.exists():
        suffix = "".join(path.suffixes[-2:]).lower()
        if path.suffix.lower() in (".parquet", ".pq") or path.is_dir():
            try:
                return pd.read_parquet(path), path.name
            except ImportError as exc:
                raise DataError("reading Parquet needs pyarrow: pip install 'bayeslmm[parquet]'") from exc
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise DataError(f"DATA {source!r} could not be read as Parquet ({exc}); check the file") from exc
        if path.suffix.lower() == ".csv" or suffix == ".csv.gz":
            try:
                return pd.read_csv(path), path.name
            except pd.errors.EmptyDataError as exc:
                raise DataError(f"DATA {source!r} is empty (no header, no rows); give a CSV file with a header "
                                "line naming the columns") from exc
            except pd.errors.ParserError as exc:
                raise DataError(f"DATA {source!r} is not a well-formed CSV file ({str(exc).strip()}); every line "
                                "needs as many comma-separated fields as the header") from exc
            except UnicodeDecodeError as exc:
                raise DataError(f"DATA {source!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it "
                                "as UTF-8 CSV") from exc
            except OSError as exc:  # unreadable, or a corrupt .csv.gz
                raise DataError(f"DATA {source!r} could not be read ({exc})") from exc
        raise DataError(f"DATA {source!r}: unknown file type {path.suffix!r}; give a .csv, .csv.gz or .parquet file")
    if source.lower() in {n.lower() for n in list_datasets()}:
        return load_dataset(source), source
    raise DataError(
        f"DATA {source!r} is neither an existing file nor a bundled dataset "
        f"(bundled: {', '.join(list_datasets())})"
    )


#: Parquet data larger than this on disk are read out of memory (through Dask)
DASK_BYTES = 1 << 30


def use_dask(source: str, force: bool = False) -> bool:
    """Whether DATA should be read partition by partition with Dask."""
    from .outofcore import is_parquet_source

    if not is_parquet_source(source):
        if force:
            raise DataError(f"--dask reads Parquet data (a file, a folder or a glob); {source!r} is not one")
        return False
    if force or any(ch in source for ch in "*?["):
        return True
    path = Path(source)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    return len(files) > 1 or sum(f.stat().st_size for f in files if f.exists()) > DASK_BYTES


ROUTE_HELP = (
    "nuts: how the posterior is computed (docs/bayes.md, Routes). auto (default): the fastest exact route that "
    "applies: a compiled (numba, cached) kernel sampled by nutpie where one applies, else the PyMC graph. "
    "kernel: whichever compiled kernel applies (an error saying why when none does). one-factor: the kernel "
    "for one random-effect term with at most two columns, its effects integrated out; blocked: every random "
    "effect integrated out; partial: the largest factor integrated out, the others sampled; structured: a "
    "model with a residual structure, every effect integrated out (each an error saying why when it cannot fit "
    "the model). graph: the PyMC graph, the largest factor integrated out; graph-explicit: the PyMC graph, "
    "every random effect sampled")
ROUTES = ["auto", "kernel", "one-factor", "blocked", "partial", "structured", "graph", "graph-explicit"]
SAMPLER_HELP = (
    "nuts: which NUTS samples a PyMC-graph route (the compiled kernels always run on nutpie). auto (default): "
    "nutpie when the graph's gradient is large, PyMC's own NUTS when small; nutpie: nutpie (compiles the graph); "
    "pymc: PyMC's own NUTS, which with --route auto means the graph")


VARIANCE_HELP = (
    "a residual variance function, as nlme's weights =: ident(G) a residual sd per level of column G "
    "(varIdent(form = ~1 | G)); power(V) sd proportional to |V|^power (varPower); exp(V) sd proportional to "
    "exp(expon * V) (varExp); fixed(V) variance proportional to V (varFixed)")
CORRELATION_HELP = (
    "a residual correlation within the levels of a grouping column G, as nlme's correlation =: ar1(G) "
    "AR(1) in row order, ar1(G, time=T) by an integer time column T (corAR1); car1(G, time=T) continuous-time "
    "AR(1) by a numeric time T (corCAR1); compsymm(G) one correlation within each group (corCompSymm). G must "
    "be a random-effect grouping factor or nested in each one")


EXIT_STATUS = ("Exit status: 0 done (outputs that could not be made are warned about and listed as skipped), "
               "1 a failure of the environment (disk full, read-only, out of memory) or an internal error, "
               "2 bad input or options, 130 interrupted (Ctrl-C).")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bayeslmm", description="Linear mixed models with lme4 formulas.",
                                epilog=EXIT_STATUS)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit a model and print its summary", epilog=EXIT_STATUS)
    f.add_argument("data", metavar="DATA", help="CSV or Parquet path, or a bundled dataset name")
    f.add_argument("formula", metavar="FORMULA", help="lme4 formula, e.g. 'y ~ x + (1 + x | g)'")
    f.add_argument("--method", default="reml", choices=["reml", "ml", "nuts", "both"],
                   help="estimation method (default: reml); nuts samples the posterior; both fits REML and NUTS "
                        "and prints the two side by side")
    f.add_argument("--draws", type=int, default=1000, help="nuts: draws per chain (default 1000)")
    f.add_argument("--tune", type=int, default=1000, help="nuts: tuning steps per chain (default 1000)")
    f.add_argument("--chains", type=int, default=4, help="nuts: number of chains (default 4)")
    f.add_argument("--random-seed", "--seed", dest="seed", type=int, default=None,
                   help="nuts: random seed (--seed is its older name, still accepted)")
    f.add_argument("--route", default="auto", choices=ROUTES, help=ROUTE_HELP)
    f.add_argument("--sampler", default="auto", choices=["auto", "pymc", "nutpie"], help=SAMPLER_HELP)
    f.add_argument("--target-accept", type=float, default=0.8, metavar="P",
                   help="nuts: target acceptance probability of the step-size adaptation, strictly between 0 "
                        "and 1 (default 0.8); raise it (0.95, 0.99) when the fit reports divergences")
    f.add_argument("--intervals", default=None, choices=["profile", "wald", "none"],
                   help="both: frequentist intervals in the comparison table: profile (Wald for the fixed "
                        "effects, profile likelihood for the sds, correlations and sigma), wald (the fixed "
                        "effects' only, as lme4's Wald confint), or none at all; default: compare()'s (profile "
                        "unless the model is very large)")
    f.add_argument("--ci-prob", type=float, default=None, metavar="P",
                   help="probability of the intervals (posterior summary, comparison table, caterpillar plots, "
                        "the REML/ML fixef_table in the JSON); default: ArviZ's 0.89 for the posterior and the "
                        "comparison, 0.95 for REML/ML caterpillar plots and fixef_table")
    f.add_argument("--anova", type=int, choices=[3, 2], default=None, metavar="TYPE",
                   help="reml, ml, both: also print the F test of each fixed-effect term with Satterthwaite's "
                        "denominator df, as lmerTest's anova(m, type = TYPE): 3 for type III (lmerTest's "
                        "default: each term averaged over the other factors' levels) or 2 for type II; "
                        "written to --json ('anova') and --out (anova.csv) too. Default: not printed")
    f.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")
    f.add_argument("--out", metavar="DIR",
                   help="write the results (summary.txt, JSON, saved fits, comparison and pooling tables as CSV) "
                        "and the plots (PNG) into the folder DIR, created if needed; each fit's files are "
                        "written as soon as it is done")
    f.add_argument("--variance", metavar="EXPR", default=None, help=VARIANCE_HELP)
    f.add_argument("--correlation", metavar="EXPR", default=None, help=CORRELATION_HELP)
    f.add_argument("--weights", metavar="COLUMN", default=None,
                   help="known precision weights in COLUMN (positive): Var(y_i) = sigma^2 / w_i, as lme4's "
                        "and nlme's weights")
    f.add_argument("--missing", default="raise", choices=["raise", "drop"],
                   help="rows with missing values: raise an error (default) or drop them")
    f.add_argument("--dask", action="store_true",
                   help="read Parquet DATA out of memory with Dask (automatic for a glob, a folder of "
                        "several files, or more than 1 GiB); per-row outputs are then not available")
    sub.add_parser("datasets", help="list the bundled datasets")
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one ``bayeslmm: warning:`` line on stderr, like the errors (no source path)."""
    print(f"bayeslmm: warning: {message}", file=sys.stderr)


#: errno -> what the user can do about it
_OS_HINTS = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free space within your disk quota",
             errno.EROFS: "the file system is read-only; give a writable --out / --json",
             errno.EACCES: "check its permissions, or give a writable --out / --json",
             errno.EPERM: "check its permissions, or give a writable --out / --json",
             errno.EFBIG: "a limit on file size refuses files this large; write elsewhere"}


def main(argv: list[str] | None = None) -> int:
    """The ``bayeslmm`` command.  Never raises (but argparse exits with 2 on bad options):
    every failure becomes one ``bayeslmm: error:`` line on stderr and an exit status."""
    args = _parser().parse_args(argv)
    run = _Run(args)
    with warnings.catch_warnings(), _interrupts_flagged(run):
        warnings.showwarning = _show_warning
        try:
            return run.execute()
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001  (the last line of defence: no traceback, ever)
            run.discard_empty_folder()
            code, message = _failure(exc, run)
            print(message, file=sys.stderr, flush=True)
            return code


def _failure(exc: BaseException, run: "_Run") -> tuple[int, str]:
    """The exit status and the one line on stderr for a run that ``exc`` ended."""
    if run.interrupted or isinstance(exc, KeyboardInterrupt):
        # a sampler may turn Ctrl-C into a partial result or another exception: the flag decides
        kept = f"; kept from the steps that finished: {', '.join(run.written)}" if run.written else ""
        if run.stage.startswith("writing "):  # the files being written were completed first
            return 130, f"bayeslmm: interrupted after {run.stage}{kept}"
        return 130, f"bayeslmm: interrupted while {run.stage}: nothing of that step was written{kept}"
    if isinstance(exc, BayesLMMError):
        return 2, f"bayeslmm: error: {exc}"
    if isinstance(exc, OSError):
        return 1, f"bayeslmm: error: {run.stage}: {_describe_os_error(exc)}{run.kept()}"
    if isinstance(exc, MemoryError):
        return 1, (f"bayeslmm: error: out of memory while {run.stage}; try fewer --draws or --chains, a smaller "
                   f"model or data set, or a machine with more memory{run.kept()}")
    if isinstance(exc, RecursionError):
        return 1, (f"bayeslmm: error: recursion too deep while {run.stage} (an extremely nested formula or "
                   f"file?); please report it with the command line{run.kept()}")
    if isinstance(exc, IncompleteTraceError):
        return 1, (f"bayeslmm: error: while {run.stage}: {exc}; nothing of that step was written: run it again"
                   f"{run.kept()}")
    return 1, (f"bayeslmm: error: internal error while {run.stage}: {type(exc).__name__}: {exc}; please report "
               f"it with the command line{run.kept()}")


@contextlib.contextmanager
def _interrupts_flagged(run: "_Run"):
    """Ctrl-C raises ``KeyboardInterrupt`` as usual and also sets ``run.interrupted``.

    A sampler that catches the interrupt and returns what it drew (nutpie keeps a
    partial trace) cannot then pass for a finished fit: the run checks the flag after
    every step and writes nothing of an interrupted one.
    """
    def handle(signum, frame):
        run.interrupted = True
        if not run.deferring:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, handle)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, SaveError):  # already says what failed and what to do
        return str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = _OS_HINTS.get(exc.errno, "check the files and folders named and run again")
    return f"{reason}{where}; {hint}"


def _check_json_path(path: str | None) -> None:
    if path and path != "-" and not Path(path).resolve().parent.is_dir():
        raise BayesLMMError(f"--json {path!r}: the folder {str(Path(path).parent)!r} does not "
                            "exist; create it or give another path")
    if path and path != "-" and Path(path).is_dir():
        raise BayesLMMError(f"--json {path!r} is a folder; give a file name such as {str(Path(path) / 'fit.json')!r}")


def _check_out_dir(path: str | None) -> None:
    """Refuse, before anything is fitted, a --out that is a file or cannot be created."""
    if path is None:
        return
    target = Path(path).resolve()
    if target.exists() and not target.is_dir():
        raise BayesLMMError(f"--out {path!r} is a file, not a folder; give a folder for the results")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise BayesLMMError(f"--out {path!r}: cannot write into {str(existing)!r}; give a writable folder")


def _probe_writable(folder: Path, option: str) -> None:
    """Write and remove one small file in ``folder``: permissions, read-only mounts and full disks show here."""
    try:
        write_atomically(folder / ".bayeslmm-probe", lambda tmp: tmp.write_bytes(b"probe\n"))
        (folder / ".bayeslmm-probe").unlink()
    except OSError as exc:
        raise BayesLMMError(f"{option}: cannot write into {str(folder)!r} ({exc.strerror or exc}); "
                            f"give a writable folder with free space") from exc


def _check_probability(option: str, p: float | None) -> None:
    if p is not None and not (0 < p < 1):  # NaN fails too
        raise BayesLMMError(f"{option} must be a probability strictly between 0 and 1, got {p!r}")


def output_names(keys: list[str], groups: list[str], comparison: bool, anova: bool = False) -> list[str]:
    """The files ``--out`` writes for fits ``keys`` ("reml", "ml", "nuts") of a model with grouping factors
    ``groups`` (``anova``: the F tests per term of the REML/ML fit, ``--anova``)."""
    names = ["summary.txt"] + [f"{key}.{ext}" for key in keys for ext in ("json", "nc")]
    names += ["anova.csv"] if anova and set(keys) & {"reml", "ml"} else []
    names += ["comparison.csv"] if comparison else []
    for group in groups:
        g = _safe_name(group)
        names += [f"pooling_{g}.csv", f"shrinkage_{g}.png"] + [f"caterpillar_{g}_{key}.png" for key in keys]
    names += ["variance.png", "ppc.png"] if "nuts" in keys else []
    return names


class _Run:
    """One ``bayeslmm`` command: the fits in order, each written out as soon as it exists.

    ``--out`` gets ``summary.txt`` (rewritten after every step), then each fit's JSON and
    saved file, the comparison, and last the tables and plots; ``--json`` is rewritten
    after every fit with what exists so far.  Every file is written under a temporary
    name and renamed, so none is ever half-written; an interrupted or failed step
    writes nothing, and the files of the steps that finished before stay.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.stage = "starting"
        self.folder = Path(args.out) if getattr(args, "out", None) else None  # ("datasets" has no --out)
        self.created_folder = False
        self.fits: dict[str, object] = {}  # "reml" | "ml" | "nuts" -> fit, in the order fitted
        self.comparison = None
        self.anovas: dict[str, pd.DataFrame] = {}  # "reml" | "ml" -> F tests per term (--anova)
        self.printed: list[str] = []
        self.written: list[str] = []
        self.skipped: list[str] = []
        self.interrupted = False  # set by the Ctrl-C handler of main()
        self.deferring = False  # Ctrl-C waits until the files being written are complete

    def check_not_interrupted(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    def kept(self) -> str:
        return f"; the files of the steps that finished were written: {', '.join(self.written)}" if self.written else ""

    def discard_empty_folder(self) -> None:
        """Remove the --out folder this run created when nothing was written into it."""
        if self.created_folder and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def show(self, text: str) -> None:
        print(text, flush=True)
        self.printed.append(text)

    def execute(self) -> int:
        args = self.args
        if args.command == "datasets":
            return _list_datasets()
        self.stage = "checking the options"
        _check_json_path(args.json)
        _check_out_dir(args.out)
        _check_probability("--ci-prob", args.ci_prob)
        _check_probability("--target-accept", args.target_accept)
        if args.anova is not None and args.method == "nuts":
            raise BayesLMMError("--anova tests the fixed effects of a REML or ML fit; use --method reml, ml or "
                                "both, or leave --anova out")
        self.stage = "reading the data"
        model = _build_model(args)
        self.stage = "preparing the outputs"
        self._prepare_outputs(model)
        if args.method in ("reml", "ml", "both"):
            key = "ml" if args.method == "ml" else "reml"
            self.stage = f"fitting by {key.upper()}"
            fit = model.fit(method=key)
            self._add_fit(key, fit, str(fit.summary()))
            if args.anova is not None:
                self._anova(key, fit)
        if args.method in ("nuts", "both"):
            self.stage = "sampling by NUTS"
            fit = model.fit(method="nuts", draws=args.draws, tune=args.tune, chains=args.chains,
                            random_seed=args.seed, route=args.route, sampler=args.sampler,
                            target_accept=args.target_accept,
                            progressbar=sys.stderr.isatty())
            self._add_fit("nuts", fit, str(fit.summary(args.ci_prob)))
            self._residual_notes(fit)
        if args.method == "both":
            self.stage = "comparing the fits"
            self._compare()
        if args.json == "-":
            print(json.dumps(self._json(), indent=2))
        if self.folder is not None:
            self.stage = "making the tables and plots"
            self._write_the_rest()
            print(f"\nWrote {len(self.written)} files to {args.out}: {', '.join(self.written)}")
        if self.skipped:
            print(f"Skipped (see the warnings on stderr): {', '.join(self.skipped)}")
        return 0

    # -- each step's outputs --------------------------------------------------------------
    def _prepare_outputs(self, model) -> None:
        """Create and probe --out and --json before fitting; say which files of a non-empty --out get replaced."""
        if self.folder is not None:
            if not self.folder.exists():
                try:
                    self.folder.mkdir(parents=True)
                except OSError as exc:
                    raise BayesLMMError(f"--out {self.args.out!r}: could not create the folder "
                                        f"({exc.strerror or exc}); give a writable folder") from exc
                self.created_folder = True
            _probe_writable(self.folder, f"--out {self.args.out!r}")
            keys = {"reml": ["reml"], "ml": ["ml"], "nuts": ["nuts"], "both": ["reml", "nuts"]}[self.args.method]
            groups = list(dict.fromkeys(b.group for b in model.spec.blocks))
            comparison = self.args.method == "both"
            planned = output_names(keys, groups, comparison, self.args.anova is not None)
            present = {p.name for p in self.folder.iterdir()}
            replaced = [n for n in planned if n in present]
            others = len(present - set(planned))
            if replaced:
                stay = f"; {others} other file(s) there stay as they are" if others else ""
                print(f"bayeslmm: note: --out {self.args.out!r} is not empty: this run replaces "
                      f"{', '.join(replaced)}{stay}", file=sys.stderr, flush=True)
        if self.args.json and self.args.json != "-":
            _probe_writable(Path(self.args.json).resolve().parent, f"--json {self.args.json!r}")

    def _add_fit(self, key: str, fit, summary: str) -> None:
        self.check_not_interrupted()  # a fit that returned after Ctrl-C is not kept
        if self.fits:
            self.show("")
        self.fits[key] = fit
        self.show(summary)
        with self._writing(f"the {key.upper()} fit's files"):
            self._write_summary()
            self._write_fit_json(key, fit)
            self._attempt(f"{key}.nc", lambda p: fit.save(p), atomic=False)  # save() writes atomically itself
            self._write_json()

    def _write_fit_json(self, key: str, fit) -> None:
        self._attempt(f"{key}.json", lambda p: p.write_text(json.dumps(
            fit_dict(fit, self.args.ci_prob, self.anovas.get(key)), indent=2) + "\n"))

    def _anova(self, key: str, fit) -> None:
        """``--anova``: the F tests per term of the REML/ML fit, printed after its summary and written.

        Run after the fit's own files are written, so an interrupt here loses nothing
        of the fit.  F tests that cannot be made (a model read out of memory has no
        rows to build the terms' hypotheses from) are warned about and skipped, as
        the comparison is.
        """
        self.stage = f"testing each term of the {key.upper()} fit"
        table = self._optional(lambda: fit.anova(type=self.args.anova), "the F tests per term (--anova) were",
                               "anova.csv", "the F tests")
        if table is None:
            return
        self.anovas[key] = table
        self.show("")
        self.show(format_anova(table))
        with self._writing("the F tests"):
            self._write_summary()
            self._attempt("anova.csv", lambda p: table.rename_axis("term").to_csv(p))
            self._write_fit_json(key, fit)
            self._write_json()

    def _optional(self, make, what: str, filename: str, in_json: str):
        """A step after the fits (comparison, F tests): its result, or None with a warning naming
        what was skipped — the fits are done and written, so their failure loses nothing else."""
        try:
            result = make()
        except (MemoryError, RecursionError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001  (the fits are done and written: report and go on)
            self.check_not_interrupted()  # (an interrupt turned into another exception)
            lost = [filename] if self.folder is not None else []
            lost += [f"{in_json} in --json {self.args.json}"] if self.args.json else []
            kind = "" if isinstance(exc, BayesLMMError) else f"internal error, please report: {type(exc).__name__}: "
            warnings.warn(f"{what} not made ({kind}{exc})" + (f"; skipped: {', '.join(lost)}" if lost else ""),
                          stacklevel=3)
            if self.folder is not None:
                self.skipped.append(filename)
            return None
        self.check_not_interrupted()
        return result

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Ctrl-C while one step's files are written takes effect once they all are (a second or so).

        So a step's files are never a mix of this run's and an earlier run's.
        """
        self.stage, self.deferring = f"writing {what}", True
        try:
            yield
        finally:
            self.deferring = False
        self.check_not_interrupted()

    def _residual_notes(self, fit) -> None:
        """Say what a NUTS fit with a residual structure cannot give (printed, and in summary.txt)."""
        from .bayes.posterior import no_pointwise_loglik

        why = no_pointwise_loglik(fit.spec)
        if why is None:
            return
        self.show("")
        self.show(f"Note: no LOO for this fit: {why}.")
        with self._writing("the notes"):
            self._write_summary()

    def _compare(self) -> None:
        from .compare import compare

        options = {} if self.args.intervals is None else {"intervals": self.args.intervals}
        self.comparison = self._optional(
            lambda: compare(self.fits["nuts"], self.fits["reml"], ci_prob=self.args.ci_prob, **options),
            "the comparison table was", "comparison.csv", "the comparison")
        if self.comparison is None:
            return
        self.show("")
        self.show(str(self.comparison))
        with self._writing("the comparison"):
            self._write_summary()
            self._attempt("comparison.csv", lambda p: self.comparison.to_frame().rename_axis("parameter").to_csv(p))
            self._write_json()

    def _write_summary(self) -> None:
        self._attempt("summary.txt", lambda p: p.write_text("\n".join(self.printed) + "\n"))

    def _write_json(self) -> None:
        path = self.args.json
        if not path or path == "-":
            return
        text = json.dumps(self._json(), indent=2) + "\n"
        try:
            write_atomically(Path(path), lambda tmp: tmp.write_text(text))
        except OSError as exc:
            raise OSError(exc.errno, f"--json {path!r}: could not write the results ({exc.strerror or exc})") from exc

    def _json(self) -> dict:
        return _json_results(self.fits, self.comparison, self.args.ci_prob, keyed=self.args.method == "both",
                             anovas=self.anovas)

    def _attempt(self, name: str, make, atomic: bool = True) -> None:
        """Write one --out file; an output that cannot be made is warned about and listed as skipped."""
        if self.folder is None:
            return
        if not _write_one(self.folder, name, make, atomic):
            self.skipped.append(name)
        elif name not in self.written:
            self.written.append(name)

    def _write_the_rest(self) -> None:
        written, skipped = write_tables_and_plots(self.folder, self.fits, ci_prob=self.args.ci_prob)
        self.written += [n for n in written if n not in self.written]
        self.skipped += skipped


def _list_datasets() -> int:
    from .datasets import dataset_info, list_datasets

    for name in list_datasets():
        first = dataset_info(name).strip().splitlines()[0]
        print(f"{name:12s} {first}")
    return 0


def _build_model(args: argparse.Namespace):
    from .model import Model

    residual = {"variance": parse_variance(args.variance), "correlation": parse_correlation(args.correlation),
                "weights": _weights_column(args.weights)}
    if use_dask(args.data, args.dask):
        model = Model(args.formula, args.data, missing=args.missing, **residual)
        name = Path(args.data).name
    else:
        data, name = read_data(args.data)
        _check_residual_columns(residual, data)
        model = Model(args.formula, data, missing=args.missing, **residual)
    model.data_name = name
    return model


# -- residual structures from the command line -------------------------------------------------
_EXPRESSION = re.compile(r"^\s*([A-Za-z0-9_]+)\s*\((.*)\)\s*$", re.S)
#: expression name -> structure (correlations: and whether time= is needed: True, optional: False, not taken: None)
_VARIANCE_NAMES = {"ident": "VarIdent", "power": "VarPower", "exp": "VarExp", "fixed": "VarFixed"}
_CORRELATION_NAMES = {"ar1": ("CorAR1", False), "car1": ("CorCAR1", True), "compsymm": ("CorCompSymm", None)}
_VARIANCE_FORMS = '"ident(G)", "power(V)", "exp(V)" or "fixed(V)"'
_CORRELATION_FORMS = '"ar1(G)", "ar1(G, time=T)", "car1(G, time=T)" or "compsymm(G)"'


def _split_expression(text: str, option: str, forms: str) -> tuple[str, str, dict[str, str]]:
    """``name(column, key=value, ...)`` -> (name, column, keywords); an ``option`` error otherwise."""
    match = _EXPRESSION.match(text)
    if match is None:
        raise BayesLMMError(f"{option} {text!r} is not an expression like {forms}: a name, then a column in "
                            "parentheses")
    name, inner = match.group(1).lower(), match.group(2)
    parts = [p.strip() for p in inner.split(",")]
    if any(p == "" for p in parts):
        raise BayesLMMError(f"{option} {text!r}: an empty argument; write {forms}")
    positional = [p for p in parts if "=" not in p]
    keywords = {}
    for p in parts:
        if "=" in p:
            key, _, value = (x.strip() for x in p.partition("="))
            if not key or not value or key in keywords:
                raise BayesLMMError(f"{option} {text!r}: {p!r} is not a keyword=column argument given once; "
                                    f"write {forms}")
            keywords[key] = value
    if len(positional) != 1 or parts[0] != positional[0]:
        raise BayesLMMError(f"{option} {text!r} needs exactly one column first, then keywords; write {forms}")
    return name, positional[0], keywords


def parse_variance(text: str | None):
    """``--variance``: ``"ident(G)"`` -> ``VarIdent("G")``; ``power``, ``exp``, ``fixed`` likewise; None -> None."""
    from . import residual

    if text is None:
        return None
    name, column, keywords = _split_expression(text, "--variance", _VARIANCE_FORMS)
    if name not in _VARIANCE_NAMES:
        raise BayesLMMError(f"--variance {text!r}: unknown variance function {name!r}; write {_VARIANCE_FORMS}")
    if keywords:
        raise BayesLMMError(f"--variance {text!r}: {name}() takes one column and no keywords "
                            f"(got {', '.join(keywords)}=); write {_VARIANCE_FORMS}")
    return getattr(residual, _VARIANCE_NAMES[name])(column)


def parse_correlation(text: str | None):
    """``--correlation``: ``"ar1(G)"``, ``"ar1(G, time=T)"``, ``"car1(G, time=T)"``, ``"compsymm(G)"`` -> the
    structure of :mod:`bayeslmm.residual`; None -> None."""
    from . import residual

    if text is None:
        return None
    name, group, keywords = _split_expression(text, "--correlation", _CORRELATION_FORMS)
    if name not in _CORRELATION_NAMES:
        raise BayesLMMError(f"--correlation {text!r}: unknown correlation structure {name!r}; write "
                            f"{_CORRELATION_FORMS}")
    structure, needs_time = _CORRELATION_NAMES[name]
    unknown = set(keywords) - ({"time"} if needs_time is not None else set())
    if unknown:
        raise BayesLMMError(f"--correlation {text!r}: {name}() does not take {', '.join(sorted(unknown))}=; write "
                            f"{_CORRELATION_FORMS}")
    if needs_time and "time" not in keywords:
        raise BayesLMMError(f"--correlation {text!r}: {name}() needs a numeric time column, as "
                            f"\"{name}({group}, time=T)\"")
    cls = getattr(residual, structure)
    return cls(group, keywords["time"]) if "time" in keywords else cls(group)


def _check_residual_columns(residual: dict, data: pd.DataFrame) -> None:
    """Name the data's columns when --variance/--correlation/--weights name one it lacks."""
    from .residual import columns_of

    missing = [c for c in columns_of(**residual) if c not in data.columns]
    if missing:
        shown = ", ".join(map(str, list(data.columns)[:30])) + (", ..." if len(data.columns) > 30 else "")
        raise DataError(f"--variance/--correlation/--weights name column(s) {missing} that DATA does not have; "
                        f"its columns: {shown}")


def _weights_column(text: str | None) -> str | None:
    if text is not None and not text.strip():
        raise BayesLMMError("--weights needs the name of a column of positive precision weights")
    return None if text is None else text.strip()


# -- results ----------------------------------------------------------------------------------
def _plain(value):
    """JSON-ready: NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def comparison_records(comparison) -> dict:
    """The comparison table as ``{parameter: {column: value}}`` with nulls for NaN."""
    frame = comparison.to_frame()
    return {str(k): {c: _plain(v.item() if hasattr(v, "item") else v) for c, v in row.items()}
            for k, row in frame.iterrows()}


def _records(table: pd.DataFrame) -> dict:
    """``{row: {column: value}}`` with plain numbers (integer columns stay integers) and nulls for NaN
    and infinities."""
    columns = {c: table[c].tolist() for c in table.columns}  # per column: its own type
    return {str(k): {c: _plain(values[i]) for c, values in columns.items()} for i, k in enumerate(table.index)}


def fit_dict(fit, ci_prob: float | None = None, anova: pd.DataFrame | None = None) -> dict:
    """``fit.to_dict()``; for a NUTS fit with the posterior intervals at ``ci_prob`` when given.

    A REML/ML fit's dict also holds ``fixef_table`` (per coefficient ``estimate``,
    ``std_error``, ``lower``, ``upper``, ``t_value``, ``df``, ``p_value``: lmerTest's
    coefficient table, Satterthwaite's df) with ``fixef_table_attrs`` (``ddf``,
    ``ci_prob``), and, given ``anova`` (:meth:`FreqFit.anova`'s table), ``anova`` (per
    term ``sum_sq``, ``mean_sq``, ``num_df``, ``den_df``, ``f_value``, ``p_value``)
    with ``anova_attrs`` (``type``, ``ddf``).  Unknown values (df where Satterthwaite's
    approximation is not defined) are null.
    """
    from .reml.results import FreqFit

    out = fit.to_dict()
    if ci_prob is not None and "posterior" in out:
        table = fit.summary_table(ci_prob)
        out["interval"] = table.attrs["interval"]
        out["posterior"] = {k: {c: float(v) for c, v in row.items()} for k, row in table.iterrows()}
    residual = getattr(fit.spec, "residual", None)
    if residual is not None:  # the structure as written (its parameters are out["residual_params"])
        out["residual_structure"] = residual_structure(residual)
    if isinstance(fit, FreqFit):
        table = fit.fixef_table(ci_prob)
        out["fixef_table"] = _records(table)
        out["fixef_table_attrs"] = {"ddf": table.attrs["ddf"], "ci_prob": table.attrs["ci_prob"]}
    if anova is not None:
        out["anova"] = _records(anova)
        out["anova_attrs"] = {"type": anova.attrs["type"], "ddf": anova.attrs["ddf"]}
    return out


def residual_structure(residual) -> dict:
    """A fit's residual structure for the JSON: ``variance`` and ``correlation`` as
    ``{"type": "CorAR1", "group": ..., "time": ...}`` (or null) and ``weights`` (the column, "array" or null)."""
    from .residual import describe

    weights = residual.weights_name or ("array" if residual.weights is not None else None)
    return {"variance": describe(residual.variance.structure if residual.variance else None),
            "correlation": describe(residual.correlation.structure if residual.correlation else None),
            "weights": weights}


#: how lmerTest titles its ANOVA tables
_ANOVA_TYPES = {3: "Type III", 2: "Type II"}
_DDF_TITLES = {"satterthwaite": "with Satterthwaite's method", "none": "with Wald tests (no denominator df)"}


def format_anova(table: pd.DataFrame) -> str:
    """:meth:`FreqFit.anova`'s table printed as lmerTest prints ``anova(m)``."""
    from .reml.summary import format_p_value

    kind = _ANOVA_TYPES.get(table.attrs.get("type"), f"Type {table.attrs.get('type')}")
    ddf = table.attrs.get("ddf", "satterthwaite")
    title = f"{kind} Analysis of Variance Table {_DDF_TITLES.get(ddf, f'with {ddf} denominator df')}"
    shown = pd.DataFrame({
        "Sum Sq": [f"{v:.5g}" for v in table["sum_sq"]],
        "Mean Sq": [f"{v:.5g}" for v in table["mean_sq"]],
        "NumDF": [f"{int(v)}" for v in table["num_df"]],
        "DenDF": [f"{v:.2f}" if math.isfinite(v) else ("Inf" if v > 0 else "NA") for v in table["den_df"]],
        "F value": [f"{v:.4f}" for v in table["f_value"]],
        "Pr(>F)": [format_p_value(v) for v in table["p_value"]],
    }, index=table.index)
    return title + "\n" + shown.to_string()


def _json_results(fits: dict, comparison, ci_prob: float | None = None, keyed: bool = False,
                  anovas: dict | None = None) -> dict:
    """One fit's results, or (``keyed``, for ``--method both``) the fits by method and the comparison."""
    anovas = anovas or {}
    if len(fits) == 1 and not keyed:
        key, fit = next(iter(fits.items()))
        return fit_dict(fit, ci_prob, anovas.get(key))
    out = {key: fit_dict(fit, ci_prob, anovas.get(key)) for key, fit in fits.items()}
    if comparison is not None:
        out["comparison"] = comparison_records(comparison)
        out["comparison_ci_prob"] = comparison.attrs["ci_prob"]
    return out


def _safe_name(text: str) -> str:
    """A file-name part: letters, digits, '-' and '_' only (``a:b`` -> ``a_b``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "group"


def _flat_columns(table):
    """A pooling table with one header row: ``n``, ``complete[(Intercept)]``, ..., ``note``."""
    out = table.copy()
    out.columns = [f"{kind}[{col}]" if col else kind for kind, col in table.columns]
    return out


def _write_one(folder: Path, name: str, make, atomic: bool = True) -> bool:
    """``make(path)`` for ``folder / name``; False (with a warning) when the output cannot be made.

    ``atomic``: ``make`` writes a temporary file renamed to ``name`` once complete (pass
    False for a writer that does so itself).  An output the model cannot give (a
    :class:`~bayeslmm.errors.BayesLMMError`) or whose making fails (any other error but
    the environment's) is skipped; a file that cannot be written (disk full, no
    permission) raises ``OSError`` naming it.
    """
    path = folder / name
    try:
        if atomic:
            write_atomically(path, make)
        else:
            make(path)
    except (OSError, MemoryError, RecursionError, KeyboardInterrupt) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, SaveError):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except Exception as exc:  # noqa: BLE001  (one output failing must not lose the others)
        kind = "" if isinstance(exc, BayesLMMError) else f"internal error, please report: {type(exc).__name__}: "
        warnings.warn(f"--out: {name} not written: {kind}{exc}", stacklevel=2)
        return False
    return True


def write_tables_and_plots(folder: Path, fits: dict, ci_prob: float | None = None,
                           dpi: int = 100) -> tuple[list[str], list[str]]:
    """Write the pooling tables and the figures of ``fits`` into ``folder``; return (written, skipped).

    ``fits`` maps ``"reml"``/``"ml"``/``"nuts"`` to fits of one model.  An output that
    cannot be made is warned about and listed as skipped (see :func:`_write_one`).
    """
    from .plots import caterpillar_plot, ppc_plot, shrinkage_plot, variance_plot
    from .pooling import pooling_table

    written: list[str] = []
    skipped: list[str] = []

    def attempt(name: str, make) -> None:
        (written if _write_one(folder, name, make) else skipped).append(name)

    def figure(make_fig):
        def write(path: Path) -> None:
            make_fig().savefig(path, dpi=dpi, format="png")  # the temporary name has no .png to go by
        return write

    main_fit = fits.get("reml", fits.get("ml", fits.get("nuts")))
    groups = list(dict.fromkeys(b.group for b in main_fit.spec.blocks))
    for group in groups:
        g = _safe_name(group)
        attempt(f"pooling_{g}.csv", lambda p, group=group: _flat_columns(pooling_table(main_fit, group)).to_csv(p))
        attempt(f"shrinkage_{g}.png", figure(lambda group=group: shrinkage_plot(main_fit, group)))
        for key, fit in fits.items():
            attempt(f"caterpillar_{g}_{key}.png",
                    figure(lambda fit=fit, group=group: caterpillar_plot(fit, group, ci_prob)))
    if "nuts" in fits:
        freq = fits.get("reml", fits.get("ml"))
        attempt("variance.png", figure(lambda: variance_plot(fits["nuts"], freq)))
        attempt("ppc.png", figure(lambda: ppc_plot(fits["nuts"])))
    return written, skipped


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
