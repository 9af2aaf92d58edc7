"""Progress of PyMC's sampler in a notebook that lacks ipywidgets: a line of text instead of a warning.

PyMC 6 draws its progress bar with rich (``pymc.progress_bar``: marimo's widget in a
marimo notebook, rich's ``Live`` display everywhere else).  In a Jupyter kernel rich
renders through an ipywidgets ``Output``; without ipywidgets it shows nothing and
warns ``install "ipywidgets" for Jupyter support`` at every refresh.  There, PyMC's
bar is turned off and :class:`TextProgress` reports through ``pm.sample``'s per-draw
``callback`` on one line of stderr, which Jupyter rewrites in place (``\\r``).
nutpie needs no fallback: it writes its notebook progress as HTML through IPython.
"""

from __future__ import annotations

import sys


def notebook_without_widgets() -> bool:
    """Whether this is a Jupyter kernel (as rich detects it) in which ipywidgets cannot be imported."""
    try:
        from rich.console import Console  # PyMC's own dependency
    except ImportError:
        return False
    if not Console().is_jupyter:
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython.display import display  # noqa: F401
    except ImportError:
        return True
    return False


class TextProgress:
    """``pm.sample``'s per-draw callback: ``chain 2/4: draw 350/2000 (tuning)`` on one rewritten line.

    The line is rewritten every 5 % of a chain's iterations (tuning and draws), so the
    output does not depend on speed, and ends with a newline after the last chain.
    """

    def __init__(self, chains: int, tune: int, draws: int, stream=None):
        self.chains, self.tune, self.total = chains, tune, tune + draws
        self.step = max(1, self.total // 20)
        self.stream = stream
        self.done: set[int] = set()

    def __call__(self, trace=None, draw=None) -> None:
        i = draw.draw_idx + 1
        if i % self.step and i != self.total:
            return
        stage = "tuning" if draw.tuning else "sampling"
        out = self.stream if self.stream is not None else sys.stderr
        out.write(f"\rNUTS (PyMC) chain {draw.chain + 1}/{self.chains}: iteration {i}/{self.total} ({stage})   ")
        if i == self.total:
            self.done.add(draw.chain)
            if len(self.done) == self.chains:
                out.write("\n")
        out.flush()


def pymc_progress_options(progressbar: bool, chains: int, tune: int, draws: int) -> dict:
    """``pm.sample``'s ``progressbar`` (and ``callback``) for this environment."""
    if progressbar and notebook_without_widgets():
        return {"progressbar": False, "callback": TextProgress(chains, tune, draws)}
    return {"progressbar": progressbar}
