"""Command line: ``bayeslmm fit DATA FORMULA --method reml|ml [--json PATH]``.

DATA is a CSV or Parquet file, or the name of a bundled dataset
(``bayeslmm datasets`` lists them).  Parquet data go through Dask, partition by
partition (:mod:`bayeslmm.outofcore`), when DATA is a glob, a folder of several
files or above ``DASK_BYTES`` on disk, or when ``--dask`` asks for it.
"""

from __future__ import annotations

import argparse
import json
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
    f.add_argument("--method", default="reml", choices=["reml", "ml", "nuts"],
                   help="estimation method (default: reml); nuts samples the posterior")
    f.add_argument("--draws", type=int, default=1000, help="nuts: draws per chain (default 1000)")
    f.add_argument("--tune", type=int, default=1000, help="nuts: tuning steps per chain (default 1000)")
    f.add_argument("--chains", type=int, default=4, help="nuts: number of chains (default 4)")
    f.add_argument("--seed", type=int, default=None, help="nuts: random seed")
    f.add_argument("--sampler", default="auto", choices=["auto", "pymc", "nutpie"],
                   help="nuts: sampler (default auto: pymc for small models, nutpie for big ones)")
    f.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")
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


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "datasets":
            from .datasets import dataset_info, list_datasets

            for name in list_datasets():
                first = dataset_info(name).strip().splitlines()[0]
                print(f"{name:12s} {first}")
            return 0
        from .model import Model

        if args.json and args.json != "-" and not Path(args.json).resolve().parent.is_dir():
            raise BayesLMMError(f"--json {args.json!r}: the folder {str(Path(args.json).parent)!r} does not "
                                "exist; create it or give another path")
        if use_dask(args.data, args.dask):
            model = Model(args.formula, args.data, missing=args.missing)
            name = Path(args.data).name
        else:
            data, name = read_data(args.data)
            model = Model(args.formula, data, missing=args.missing)
        model.data_name = name
        if args.method == "nuts":
            fit = model.fit(method="nuts", draws=args.draws, tune=args.tune, chains=args.chains,
                            random_seed=args.seed, sampler=args.sampler, progressbar=sys.stderr.isatty())
        else:
            fit = model.fit(method=args.method)
        print(fit.summary())
        if args.json:
            text = json.dumps(fit.to_dict(), indent=2)
            if args.json == "-":
                print(text)
            else:
                try:
                    Path(args.json).write_text(text + "\n")
                except OSError as exc:
                    raise BayesLMMError(f"--json {args.json!r}: could not write the results ({exc.strerror})") from exc
        return 0
    except BayesLMMError as exc:
        print(f"bayeslmm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
