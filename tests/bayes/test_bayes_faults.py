"""NUTS under faults: Ctrl-C, a read-only install with no writable home, a memory limit (issue 14)."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import xarray as xr

import bayeslmm
from bayeslmm import Model
from bayeslmm.bayes import fit as bayes_fit
from bayeslmm.bayes.fit import DrawCounter, check_complete, check_memory, memory_needed
from bayeslmm.errors import BayesLMMError, IncompleteTraceError, InsufficientMemoryError

SLEEP = "Reaction ~ Days + (Days | Subject)"
ROOT = pathlib.Path(bayeslmm.__file__).resolve().parent.parent

# ---------------------------------------------------------------- Ctrl-C


def _trace(chains=2, draws=50, nan_chain=None, nan_from=0):
    x = np.random.default_rng(0).normal(size=(chains, draws, 3))
    if nan_chain is not None:
        x[nan_chain, nan_from:] = np.nan  # what nutpie hands back for a chain an interrupt cut short
    return xr.Dataset({"x": (("chain", "draw", "x_dim"), x), "sigma": (("chain", "draw"), x[..., 0] ** 2)})


def test_check_complete_passes_a_complete_trace():
    check_complete(_trace(), chains=2, draws=50)
    check_complete(xr.DataTree(_trace()), chains=2, draws=50)


@pytest.mark.parametrize("case", ["all-NaN chain", "NaN-padded chain", "fewer draws", "fewer chains"])
def test_check_complete_rejects_an_incomplete_trace(case):
    trace, chains, draws = {"all-NaN chain": (_trace(nan_chain=1), 2, 50),
                            "NaN-padded chain": (_trace(nan_chain=0, nan_from=30), 2, 50),
                            "fewer draws": (_trace(draws=40), 2, 50),
                            "fewer chains": (_trace(chains=1), 2, 50)}[case]
    with pytest.raises(IncompleteTraceError, match="incomplete trace"):
        check_complete(trace, chains=chains, draws=draws)


def test_a_partial_chain_is_named_with_its_complete_draws():
    with pytest.raises(IncompleteTraceError, match="chain 0: 30, chain 1: 50"):
        check_complete(_trace(nan_chain=0, nan_from=30), chains=2, draws=50)


def test_interrupt_message_counts_draws_after_tuning():
    counter = DrawCounter(chains=2, tune=100, draws=1000)
    counter.done[:] = [250, 120]  # iterations, tuning included
    msg = str(counter.interrupted())
    assert "after 170 of 2,000 draws" in msg and "nothing was returned" in msg
    counter.done[:] = [40, 0]
    assert "while tuning (40 of 100 tuning iterations)" in str(counter.interrupted())
    counter.done[:] = 0
    assert "before sampling began" in str(counter.interrupted())


CHILD = textwrap.dedent('''
    """Start a NUTS fit on sleepstudy; create MARKER once sampling reaches PHASE."""
    import pathlib, sys
    import bayeslmm.bayes.fit as F
    from bayeslmm import Model

    route, phase, marker = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
    options = {"kernel": {}, "pymc": {"sampler": "pymc"},
               "pytensor": {"sampler": "nutpie", "route": "graph"}}[route]
    # long enough that the interrupt lands in PHASE whatever the machine's speed
    tune, draws = (1_000_000, 1_000_000) if phase == "tuning" else (50, 10_000_000)

    def mark(counter):
        done = counter.done.max()
        if (done >= 1 if phase == "tuning" else done > counter.tune) and not marker.exists():
            marker.write_text("started")

    nutpie_progress, pymc_callback = F.DrawCounter.nutpie_progress, F.DrawCounter.pymc_callback

    def watched_progress(self, progress):
        nutpie_progress(self, progress)
        mark(self)

    def watched_callback(self, sigint, then=None):
        inner = pymc_callback(self, sigint, then)
        def callback(trace=None, draw=None):
            inner(trace=trace, draw=draw)
            mark(self)
        return callback

    F.DrawCounter.nutpie_progress, F.DrawCounter.pymc_callback = watched_progress, watched_callback
    fit = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy").fit(
        method="nuts", chains=2, tune=tune, draws=draws, random_seed=1, progressbar=False, warn=False, **options)
    print("RETURNED A FIT", flush=True)
''')


def _interrupt(tmp_path, route, phase):
    """Run the child, send SIGINT once its sampler has reached ``phase``; (return code, stdout, stderr)."""
    script, marker = tmp_path / "child.py", tmp_path / "started"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), route, phase, str(marker)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # compilation on a busy machine; the marker, not the clock, decides
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the sampler never reached {phase}: {proc.poll()=}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


ROUTES = [("kernel", "tuning"), ("kernel", "drawing"), ("pymc", "drawing"),
          pytest.param("pymc", "tuning", marks=pytest.mark.slow),
          pytest.param("pytensor", "drawing", marks=pytest.mark.slow)]


@pytest.mark.parametrize("route, phase", ROUTES)
def test_ctrl_c_stops_the_fit_with_a_clear_keyboard_interrupt(tmp_path, route, phase):
    rc, out, err = _interrupt(tmp_path, route, phase)
    assert "RETURNED A FIT" not in out
    assert rc == -signal.SIGINT, err[-2000:]  # how Python exits on an uncaught KeyboardInterrupt
    last = err.strip().splitlines()[-1]
    assert last.startswith("KeyboardInterrupt: the fit was interrupted after "), err[-2000:]
    assert "nothing was returned" in last
    done = int(last.split("after ")[1].split(" of ")[0].replace(",", ""))
    if phase == "tuning":
        assert done == 0 and "while tuning" in last
    else:
        assert done > 0


# ---------------------------------------------------------------- read-only install

READ_ONLY_CHILD = textwrap.dedent('''
    import os, sys
    import bayeslmm.bayes.kernel as kernel
    from bayeslmm import Model
    assert kernel.__file__.startswith(sys.argv[1]), kernel.__file__
    fit = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy").fit(
        method="nuts", sampler=sys.argv[2], chains=1, draws=50, tune=50, random_seed=1, progressbar=False, warn=False)
    print("FIT", fit.sampler, float(fit.posterior["sigma"].mean()))
''')


def _read_only_run(tmp_path, sampler):
    """Run a tiny fit from a read-only copy of the package with a read-only home (no writable cache)."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "bayeslmm", site / "bayeslmm", ignore=shutil.ignore_patterns("__pycache__"))
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    (site / "child.py").write_text(READ_ONLY_CHILD)
    subprocess.run(["chmod", "-R", "a-w", str(site), str(home)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "PYTENSOR", "XDG_", "MPLCONFIG"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(site), MPLBACKEND="Agg")
    cmd = [sys.executable, str(site / "child.py"), str(site), sampler]
    if os.geteuid() == 0:
        # root writes through chmod; in a user namespace without a mapping it no longer can
        if shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "true"]).returncode:
            pytest.skip("running as root without user namespaces: a read-only folder cannot be simulated")
        cmd = ["unshare", "--user"] + cmd
    try:
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600), tmp
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(site), str(home)], check=True)


def test_read_only_install_without_writable_home_fits_with_the_kernel(tmp_path):
    # before the fix: RuntimeError: cannot cache function '_scale_logp': no locator available
    proc, tmp = _read_only_run(tmp_path, "nutpie")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FIT nutpie" in proc.stdout
    cache = list(tmp.glob("bayeslmm-numba-cache-*"))
    assert len(cache) == 1 and any(cache[0].rglob("*.nbi")), "the kernel was not cached in the private folder"


@pytest.mark.slow
def test_read_only_install_without_writable_home_fits_with_pymc(tmp_path):
    # before: the numba error at import, then PyTensor's "Unable to create the compiledir directory"
    proc, tmp = _read_only_run(tmp_path, "pymc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FIT pymc" in proc.stdout
    assert len(list(tmp.glob("bayeslmm-pytensor-cache-*"))) == 1


# ---------------------------------------------------------------- memory limit


def test_memory_needed_counts_trace_posterior_and_loglik():
    spec = Model(SLEEP, "sleepstudy").spec  # p = 2, one block q = 2 (correlated), 18 levels, 180 rows
    sampled = 2 + 1 + 2 + 4
    stored = sampled + 36
    per_draw = bayes_fit.TRACE_GROWTH * (sampled + bayes_fit.STATS_PER_DRAW) + stored
    assert memory_needed(spec, 4, 1000, "collapsed", "auto", None) == 8 * 4000 * (per_draw + 2 * 180)
    assert memory_needed(spec, 4, 1000, "collapsed", "auto", False) == 8 * 4000 * per_draw
    assert memory_needed(spec, 4, 1000, "collapsed", "summary", None) == 8 * 4000 * (per_draw - 36)


def test_check_memory_refuses_before_sampling(monkeypatch):
    monkeypatch.setattr(bayes_fit, "memory_available", lambda: (10 * 2**20, "a test limit"))
    spec = Model(SLEEP, "sleepstudy").spec
    with pytest.raises(InsufficientMemoryError, match="a test limit.*fewer draws") as info:
        check_memory(spec, 4, 100_000, "collapsed", "auto", None)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, BayesLMMError)
    check_memory(spec, 1, 100, "collapsed", "auto", None)  # 1 MB: fits


def test_memory_error_while_sampling_becomes_a_clear_error(monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 3.05 MiB")
    monkeypatch.setattr(bayes_fit, "sample_kernel", exhausted)
    with pytest.raises(InsufficientMemoryError, match="ran out of memory.*3.05 MiB.*nothing was returned"):
        Model(SLEEP, "sleepstudy").fit(method="nuts", chains=1, draws=10, tune=10, progressbar=False)


MEMORY_CHILD = textwrap.dedent('''
    import resource, sys
    from bayeslmm import Model
    model = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")
    model.fit(method="nuts", chains=1, draws=10, tune=10, progressbar=False, warn=False)  # compiled, loaded
    size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    limit = size + 2**29  # 0.5 GiB more than the process already maps
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        model.fit(method="nuts", chains=2, tune=50, draws=3_000_000, progressbar=False, warn=False)
    except MemoryError as exc:
        print(type(exc).__name__, exc)
        sys.exit(3)
    print("FITTED")
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_address_space_limit_gives_a_clear_error_not_an_abort(tmp_path):
    # before: nutpie's Rust allocator aborted the process (exit 134, "memory allocation of 144004800 bytes failed")
    script = tmp_path / "child.py"
    script.write_text(MEMORY_CHILD)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-3000:])  # not 134 (abort) nor -11/139 (segfault)
    assert proc.stdout.startswith("InsufficientMemoryError storing 2 chains × 3,000,000 draws needs at least")
    assert "address-space limit (ulimit -v)" in proc.stdout and "nothing was sampled" in proc.stdout
