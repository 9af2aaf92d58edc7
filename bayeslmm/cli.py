"""Command line: ``bayeslmm fit DATA FORMULA --method reml|ml|nuts|both [--out DIR] [--json PATH]``.

DATA is a CSV or Parquet file, or the name of a bundled dataset
(``bayeslmm datasets`` lists them).  Parquet data go through Dask, partition by
partition (:mod:`bayeslmm.outofcore`), when DATA is a glob, a folder of several
files or above ``DASK_BYTES`` on disk, or when ``--dask`` asks for it.

``--method both`` fits the model by REML and by NUTS, prints both summaries and then
the side-by-side table of :func:`bayeslmm.compare`.  ``--out DIR`` writes into DIR
(created if needed) what was printed (``summary.txt``), each fit's results as JSON
(``reml.json``, ``ml.json``, ``nuts.json``) and saved (``*.nc``, readable by
:func:`bayeslmm.load`), the comparison table (``comparison.csv``), each grouping
factor's pooling table (``pooling_<group>.csv``) and the figures as PNG: shrinkage and
caterpillar plots per grouping factor, and for a NUTS fit the variance components
(with the REML estimates when both were fitted) and a posterior predictive check.
An output that the model cannot give (a plot that needs the rows of a model fitted
out of memory, say) is reported on stderr as a warning and listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

import pandas as pd

from .errors import BayesLMMError, DataError


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bayeslmm", description="Linear mixed models with lme4 formulas.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit a model and print its summary")
    f.add_argument("data", metavar="DATA", help="CSV or Parquet path, or a bundled dataset name")
    f.add_argument("formula", metavar="FORMULA", help="lme4 formula, e.g. 'y ~ x + (1 + x | g)'")
    f.add_argument("--method", default="reml", choices=["reml", "ml", "nuts", "both"],
                   help="estimation method (default: reml); nuts samples the posterior; both fits REML and NUTS "
                        "and prints the two side by side")
    f.add_argument("--draws", type=int, default=1000, help="nuts: draws per chain (default 1000)")
    f.add_argument("--tune", type=int, default=1000, help="nuts: tuning steps per chain (default 1000)")
    f.add_argument("--chains", type=int, default=4, help="nuts: number of chains (default 4)")
    f.add_argument("--seed", type=int, default=None, help="nuts: random seed")
    f.add_argument("--sampler", default="auto", choices=["auto", "pymc", "nutpie"],
                   help="nuts: sampler (default auto: pymc for small models, nutpie for big ones)")
    f.add_argument("--ci-prob", type=float, default=None, metavar="P",
                   help="probability of the intervals (posterior summary, comparison table, caterpillar plots); "
                        "default: ArviZ's 0.89 for the posterior and the comparison, 0.95 for REML/ML "
                        "caterpillar plots")
    f.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")
    f.add_argument("--out", metavar="DIR",
                   help="write the results (summary.txt, JSON, saved fits, comparison and pooling tables as CSV) "
                        "and the plots (PNG) into the folder DIR, created if needed")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _check_json_path(path: str | None) -> None:
    if path and path != "-" and not Path(path).resolve().parent.is_dir():
        raise BayesLMMError(f"--json {path!r}: the folder {str(Path(path).parent)!r} does not "
                            "exist; create it or give another path")


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


def _check_ci_prob(p: float | None) -> None:
    if p is not None and not (0 < p < 1):  # NaN fails too
        raise BayesLMMError(f"--ci-prob must be a probability strictly between 0 and 1, got {p!r}")


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "datasets":
            from .datasets import dataset_info, list_datasets

            for name in list_datasets():
                first = dataset_info(name).strip().splitlines()[0]
                print(f"{name:12s} {first}")
            return 0
        from .model import Model

        _check_json_path(args.json)
        _check_out_dir(args.out)
        _check_ci_prob(args.ci_prob)
        if use_dask(args.data, args.dask):
            model = Model(args.formula, args.data, missing=args.missing)
            name = Path(args.data).name
        else:
            data, name = read_data(args.data)
            model = Model(args.formula, data, missing=args.missing)
        model.data_name = name
        fits: dict[str, object] = {}  # "reml" | "ml" | "nuts" -> fit, in the order fitted
        printed: list[str] = []

        def show(text: str) -> None:
            print(text, flush=True)
            printed.append(text)

        if args.method in ("reml", "ml", "both"):
            key = "ml" if args.method == "ml" else "reml"
            fits[key] = model.fit(method=key)
            show(str(fits[key].summary()))
        if args.method in ("nuts", "both"):
            if fits:
                show("")
            fits["nuts"] = model.fit(method="nuts", draws=args.draws, tune=args.tune, chains=args.chains,
                                     random_seed=args.seed, sampler=args.sampler,
                                     progressbar=sys.stderr.isatty())
            show(str(fits["nuts"].summary(args.ci_prob)))
        comparison = None
        if args.method == "both":
            from .compare import compare

            comparison = compare(fits["nuts"], fits["reml"], ci_prob=args.ci_prob)
            show("")
            show(str(comparison))
        if args.json:
            _write_json(args.json, _json_results(fits, comparison, args.ci_prob))
        if args.out:
            written, skipped = write_outputs(Path(args.out), fits, comparison, "\n".join(printed) + "\n",
                                             ci_prob=args.ci_prob)
            print(f"\nWrote {len(written)} files to {args.out}: {', '.join(written)}")
            if skipped:
                print(f"Skipped (see the warnings on stderr): {', '.join(skipped)}")
        return 0
    except BayesLMMError as exc:
        print(f"bayeslmm: error: {exc}", file=sys.stderr)
        return 2


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


def fit_dict(fit, ci_prob: float | None = None) -> dict:
    """``fit.to_dict()``; for a NUTS fit with the posterior intervals at ``ci_prob`` when given."""
    out = fit.to_dict()
    if ci_prob is not None and "posterior" in out:
        table = fit.summary_table(ci_prob)
        out["interval"] = table.attrs["interval"]
        out["posterior"] = {k: {c: float(v) for c, v in row.items()} for k, row in table.iterrows()}
    return out


def _json_results(fits: dict, comparison, ci_prob: float | None = None) -> dict:
    """One fit's results, or for ``--method both`` both fits and the comparison."""
    if len(fits) == 1:
        return fit_dict(next(iter(fits.values())), ci_prob)
    out = {key: fit_dict(fit, ci_prob) for key, fit in fits.items()}
    if comparison is not None:
        out["comparison"] = comparison_records(comparison)
        out["comparison_ci_prob"] = comparison.attrs["ci_prob"]
    return out


def _write_json(path: str, result: dict) -> None:
    text = json.dumps(result, indent=2)
    if path == "-":
        print(text)
        return
    try:
        Path(path).write_text(text + "\n")
    except OSError as exc:
        raise BayesLMMError(f"--json {path!r}: could not write the results ({exc.strerror})") from exc


def _safe_name(text: str) -> str:
    """A file-name part: letters, digits, '-' and '_' only (``a:b`` -> ``a_b``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "group"


def _flat_columns(table):
    """A pooling table with one header row: ``n``, ``complete[(Intercept)]``, ..., ``note``."""
    out = table.copy()
    out.columns = [f"{kind}[{col}]" if col else kind for kind, col in table.columns]
    return out


def write_outputs(folder: Path, fits: dict, comparison, summary_text: str, ci_prob: float | None = None,
                  dpi: int = 100) -> tuple[list[str], list[str]]:
    """Write the results and figures of ``fits`` into ``folder``; return (files written, files skipped).

    ``fits`` maps ``"reml"``/``"ml"``/``"nuts"`` to fits of one model.  An output the
    model cannot give (it raises a :class:`~bayeslmm.errors.BayesLMMError`, e.g. a plot
    that needs rows the model does not keep) is warned about and listed as skipped;
    a file that cannot be written raises.
    """
    from .plots import caterpillar_plot, ppc_plot, shrinkage_plot, variance_plot
    from .pooling import pooling_table

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BayesLMMError(f"--out {str(folder)!r}: could not create the folder ({exc.strerror})") from exc
    written: list[str] = []
    skipped: list[str] = []

    def attempt(name: str, make) -> None:
        path = folder / name
        try:
            make(path)
        except BayesLMMError as exc:
            warnings.warn(f"--out: {name} not written: {exc}", stacklevel=2)
            skipped.append(name)
            return
        except OSError as exc:
            raise BayesLMMError(f"--out: could not write {str(path)!r} ({exc.strerror or exc})") from exc
        written.append(name)

    def figure(make_fig):
        def write(path: Path) -> None:
            make_fig().savefig(path, dpi=dpi)
        return write

    attempt("summary.txt", lambda p: p.write_text(summary_text))
    for key, fit in fits.items():
        attempt(f"{key}.json", lambda p, fit=fit: p.write_text(json.dumps(fit_dict(fit, ci_prob), indent=2) + "\n"))
        attempt(f"{key}.nc", lambda p, fit=fit: fit.save(p))
    if comparison is not None:
        attempt("comparison.csv", lambda p: comparison.to_frame().rename_axis("parameter").to_csv(p))
    main_fit = fits.get("reml", fits.get("ml", fits.get("nuts")))
    groups = list(dict.fromkeys(b.group for b in main_fit.spec.blocks))
    for group in groups:
        g = _safe_name(group)
        attempt(f"pooling_{g}.csv", lambda p, group=group: _flat_columns(pooling_table(main_fit, group)).to_csv(p))
        attempt(f"shrinkage_{g}.png", figure(lambda group=group: shrinkage_plot(main_fit, group)))
        for key, fit in fits.items():
            prob = ci_prob
            attempt(f"caterpillar_{g}_{key}.png",
                    figure(lambda fit=fit, group=group, prob=prob: caterpillar_plot(fit, group, prob)))
    if "nuts" in fits:
        freq = fits.get("reml", fits.get("ml"))
        attempt("variance.png", figure(lambda: variance_plot(fits["nuts"], freq)))
        attempt("ppc.png", figure(lambda: ppc_plot(fits["nuts"])))
    return written, skipped


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
