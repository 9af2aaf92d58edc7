"""The command line under faults: no traceback, the right exit status, and no lost or half-written file.

Each fault is provoked for real where it can be: a full disk by a limit on file size
(``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored so that a write fails with ``EFBIG``, as it
fails with ``ENOSPC`` on a full disk), Ctrl-C by a real ``SIGINT``.  A failing
comparison or plot, and the exceptions no test can provoke on demand (out of memory,
an internal error), are injected by replacing the function in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bayeslmm import load
from bayeslmm.cli import main

DYE = ["fit", "Dyestuff", "Yield ~ 1 + (1 | Batch)"]
SLEEP = ["fit", "sleepstudy", "Reaction ~ Days + (Days | Subject)"]
SMALL_NUTS = ["--draws", "100", "--tune", "100", "--chains", "2", "--seed", "3"]


def _cli(args, file_size: int | None = None, patch: str = "", timeout: float = 300):
    """``python -m bayeslmm ARGS`` (or, with ``patch``, that code run first and then ``main(ARGS)``)."""
    def limit():
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    if patch:
        code = textwrap.dedent(patch) + f"\nimport sys\nfrom bayeslmm.cli import main\nsys.exit(main({args!r}))\n"
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, "-m", "bayeslmm", *args]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, preexec_fn=limit, env=env)


def _no_temporaries(folder) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def _one_error_line(stderr: str) -> str:
    """The stderr's only ``bayeslmm: error:`` line; no traceback anywhere."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("bayeslmm: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


# --------------------------------------------------------------------------------------
# --out and --json are checked before fitting
# --------------------------------------------------------------------------------------

def test_out_on_a_full_disk_fails_before_fitting(tmp_path):
    """The probe write into --out fails (file size limit 0): exit 2, nothing fitted or printed."""
    result = _cli([*DYE, "--out", str(tmp_path / "res")], file_size=0)
    line = _one_error_line(result.stderr)
    assert result.returncode == 2 and "--out" in line and "cannot write into" in line and "File too large" in line
    assert result.stdout == ""  # no summary: the fit never ran
    assert not (tmp_path / "res").exists()  # the folder it created for nothing is removed again


def test_json_in_a_folder_that_cannot_be_written_fails_before_fitting(tmp_path, capsys, monkeypatch):
    import bayeslmm.model

    monkeypatch.setattr(bayeslmm.model.Model, "fit", lambda *a, **k: pytest.fail("fitted before checking"))
    real_open = os.open

    def refuse(path, *args, **kwargs):  # a read-only folder, also for root (who ignores permissions)
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", refuse)
    assert main([*DYE, "--json", str(tmp_path / "ro" / "fit.json")]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "--json" in err and "cannot write into" in err and "Permission denied" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_fails_before_fitting(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    result = _cli([*DYE, "--out", str(ro / "res")])
    assert result.returncode == 2 and "cannot write into" in _one_error_line(result.stderr)


def test_non_empty_out_names_the_files_it_replaces(tmp_path, capsys):
    (tmp_path / "reml.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*DYE, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"--out '{tmp_path}' is not empty: this run replaces reml.json; 1 other file(s) there stay" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "reml.json").read_text())["method"] == "REML"
    assert main([*DYE, "--out", str(tmp_path)]) == 0  # a second run replaces all it wrote
    assert "replaces summary.txt, reml.json, reml.nc, pooling_Batch.csv" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# a full disk while writing
# --------------------------------------------------------------------------------------

def test_a_full_disk_while_saving_ends_with_a_message_and_complete_files(tmp_path):
    """5 kB per file: summary.txt and reml.json (< 1 kB) fit, reml.nc (about 8 kB) does not."""
    folder = tmp_path / "res"
    result = _cli([*DYE, "--out", str(folder)], file_size=5000)
    line = _one_error_line(result.stderr)
    assert result.returncode == 1, result.stderr
    assert "could not save to" in line and "reml.nc" in line and "File too large" in line
    assert "the files of the steps that finished were written: summary.txt, reml.json" in line
    assert sorted(p.name for p in folder.iterdir()) == ["reml.json", "summary.txt"]  # no temporary, no partial .nc
    assert json.loads((folder / "reml.json").read_text())["method"] == "REML"


# --------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------

def test_ctrl_c_during_nuts_writes_nothing_of_it_and_exits_130(tmp_path):
    """A real SIGINT, sent by the process itself when NUTS starts (so at a known moment)."""
    folder, out_json = tmp_path / "res", tmp_path / "fit.json"
    patch = """
        import os, signal, time
        import bayeslmm.bayes.fit

        def interrupted(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)

        bayeslmm.bayes.fit.fit_bayes = interrupted
    """
    result = _cli([*SLEEP, "--method", "both", "--out", str(folder), "--json", str(out_json)], patch=patch)
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert ("bayeslmm: interrupted while sampling by NUTS: nothing of that step was written; kept from the steps "
            "that finished: summary.txt, reml.json, reml.nc") in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["reml.json", "reml.nc", "summary.txt"]
    assert set(json.loads(out_json.read_text())) == {"reml"}  # the REML fit, finished before, is kept
    assert load(folder / "reml.nc").objective == pytest.approx(1743.6283, abs=1e-4)  # lme4's REML criterion


@pytest.mark.slow
def test_ctrl_c_during_a_real_nuts_run(tmp_path):
    """SIGINT while nutpie samples (which keeps a partial trace): still exit 130 and no NUTS file."""
    folder, out_json = tmp_path / "res", tmp_path / "fit.json"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bayeslmm", *SLEEP, "--method", "both", "--draws", "1000000",
                             "--chains", "2", "--seed", "1", "--out", str(folder), "--json", str(out_json)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(1200):  # the --json file is written last of the REML fit's outputs
            if out_json.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        time.sleep(3)  # into the sampling (compilation, tuning or draws: every moment must end the same way)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err and "bayeslmm: interrupted while" in err
    assert sorted(p.name for p in folder.iterdir()) == ["reml.json", "reml.nc", "summary.txt"]


# --------------------------------------------------------------------------------------
# the comparison or a plot fails after the fits: the fits' files are still written
# --------------------------------------------------------------------------------------

def test_a_failing_comparison_and_plot_keep_the_fits(tmp_path):
    folder, out_json = tmp_path / "res", tmp_path / "fit.json"
    patch = """
        import sys
        import bayeslmm.compare, bayeslmm.plots

        def broken_compare(*args, **kwargs):
            print("compare called with", sorted(kwargs.items()), file=sys.stderr)
            raise RuntimeError("f(a) and f(b) must have different signs")

        def broken_ppc(*args, **kwargs):
            raise ZeroDivisionError("no plot")

        sys.modules["bayeslmm.compare"].compare = broken_compare  # (bayeslmm.compare is the function)
        bayeslmm.plots.ppc_plot = broken_ppc
    """
    result = _cli([*DYE, "--method", "both", *SMALL_NUTS, "--intervals", "wald", "--target-accept", "0.9",
                   "--out", str(folder), "--json", str(out_json)], patch=patch)
    assert result.returncode == 0 and "Traceback" not in result.stderr and "bayeslmm: error" not in result.stderr
    assert "compare called with [('ci_prob', None), ('intervals', 'wald')]" in result.stderr
    assert ("bayeslmm: warning: the comparison table was not made (internal error, please report: RuntimeError: "
            f"f(a) and f(b) must have different signs); skipped: comparison.csv, the comparison in --json {out_json}"
            ) in result.stderr
    assert "bayeslmm: warning: --out: ppc.png not written: internal error, please report: ZeroDivisionError" \
        in result.stderr
    assert "Skipped (see the warnings on stderr): comparison.csv, ppc.png" in result.stdout
    names = {p.name for p in folder.iterdir()}
    assert {"summary.txt", "reml.json", "reml.nc", "nuts.json", "nuts.nc", "variance.png"} <= names
    assert not names & {"comparison.csv", "ppc.png"} and _no_temporaries(folder)
    assert set(json.loads(out_json.read_text())) == {"reml", "nuts"}
    assert load(folder / "nuts.nc").posterior["beta"].shape == (2, 100, 1)


@pytest.mark.slow
def test_a_profile_that_fails_on_orthodont_loses_nothing(tmp_path):
    """Orthodont, whose profile used to raise in compare(): every fit's file is written, no traceback (25 s)."""
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "data" / "Orthodont.csv"  # tests/data's copy
    folder = tmp_path / "res"
    result = _cli(["fit", str(data), "distance ~ age + Sex + (age | Subject)", "--method", "both", *SMALL_NUTS,
                   "--out", str(folder)])
    assert result.returncode == 0 and "Traceback" not in result.stderr and "bayeslmm: error" not in result.stderr
    names = {p.name for p in folder.iterdir()}
    assert {"summary.txt", "reml.json", "reml.nc", "nuts.json", "nuts.nc"} <= names
    # either the comparison was made (the profile fixed, or compare fell back) or it is reported as skipped
    assert "comparison.csv" in names or "skipped: comparison.csv" in result.stderr


# --------------------------------------------------------------------------------------
# whatever else goes wrong: one line, an exit status, never a traceback
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("error, status, words", [
    (MemoryError(), 1, "out of memory while fitting by REML; try fewer --draws or --chains"),
    (RecursionError("maximum recursion depth exceeded"), 1, "recursion too deep while fitting by REML"),
    (PermissionError(13, "Permission denied", "/somewhere/x"), 1,
     "fitting by REML: Permission denied (/somewhere/x); check its permissions"),
    (OSError(28, "No space left on device"), 1, "fitting by REML: No space left on device; free disk space"),
    (ZeroDivisionError("float division by zero"), 1,
     "internal error while fitting by REML: ZeroDivisionError: float division by zero; please report it"),
    (KeyboardInterrupt(), 130, "interrupted while fitting by REML: nothing of that step was written"),
])
def test_every_failure_is_one_line_and_an_exit_status(error, status, words, tmp_path, capsys, monkeypatch):
    import bayeslmm.model

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(bayeslmm.model.Model, "fit", fail)
    folder = tmp_path / "res"
    assert main([*DYE, "--out", str(folder)]) == status
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in captured.err
    assert not folder.exists()  # the folder this run created and left empty is removed


def test_an_internal_error_in_a_subprocess_prints_no_traceback(tmp_path):
    patch = """
        import bayeslmm.model

        def fail(*args, **kwargs):
            raise IndexError("index 3 is out of bounds")

        bayeslmm.model.Model.fit = fail
    """
    result = _cli([*DYE], patch=patch)
    assert result.returncode == 1
    assert _one_error_line(result.stderr) == ("bayeslmm: error: internal error while fitting by REML: IndexError: "
                                              "index 3 is out of bounds; please report it with the command line")


# --------------------------------------------------------------------------------------
# the new options
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--target-accept", "1"], "--target-accept must be a probability strictly between 0 and 1, got 1.0"),
    (["--target-accept", "nan"], "--target-accept must be a probability strictly between 0 and 1, got nan"),
])
def test_bad_target_accept_fails_before_fitting(args, message, capsys, monkeypatch):
    import bayeslmm.model

    monkeypatch.setattr(bayeslmm.model.Model, "fit", lambda *a, **k: pytest.fail("fitted before checking"))
    assert main([*DYE, "--method", "nuts", *args]) == 2
    assert capsys.readouterr().err.strip() == f"bayeslmm: error: {message}"


def test_intervals_accepts_only_profile_wald_none(capsys):
    with pytest.raises(SystemExit) as exc:
        main([*DYE, "--method", "both", "--intervals", "auto"])
    assert exc.value.code == 2 and "invalid choice: 'auto'" in capsys.readouterr().err


def test_route_help_says_what_runs(capsys):
    """The help's claim, checked: auto samples one term with ≤ 2 columns on the compiled kernel by nutpie."""
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = re.sub(r"- ", "-", " ".join(capsys.readouterr().out.split()))  # argparse wraps after hyphens
    assert ("auto (default): the fastest exact route that applies: a compiled (numba, cached) kernel sampled by "
            "nutpie where one applies, else the PyMC graph") in help_text
    assert ("one-factor: the kernel for one random-effect term with at most two columns, its effects integrated "
            "out") in help_text
    assert "--route {auto,kernel,one-factor,blocked,partial,structured,graph,graph-explicit}" in help_text
    assert "--target-accept P" in help_text and "--intervals {profile,wald,none}" in help_text
    assert "130 interrupted" in help_text
    from bayeslmm import Model

    fit = Model("Yield ~ 1 + (1 | Batch)", "Dyestuff").fit(method="nuts", draws=50, tune=50, chains=1,
                                                            random_seed=1, progressbar=False, warn=False)
    assert fit.sampler == "nutpie" and fit.route == "one-factor"


def test_ctrl_c_while_a_fits_files_are_written_completes_them_first(tmp_path):
    """SIGINT arrives in the middle of the REML fit's writes: they finish, then the run stops with 130."""
    folder = tmp_path / "res"
    patch = """
        import os, signal
        from bayeslmm.reml.results import FreqFit

        real_save = FreqFit.save

        def save_interrupted(self, path):
            os.kill(os.getpid(), signal.SIGINT)  # after summary.txt and reml.json, before reml.nc
            return real_save(self, path)

        FreqFit.save = save_interrupted
    """
    result = _cli([*DYE, "--method", "both", "--out", str(folder)], patch=patch)
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert ("bayeslmm: interrupted after writing the REML fit's files; kept from the steps that finished: "
            "summary.txt, reml.json, reml.nc") in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["reml.json", "reml.nc", "summary.txt"]
    assert load(folder / "reml.nc").objective == pytest.approx(319.6543, abs=1e-4)  # lme4's REML criterion
