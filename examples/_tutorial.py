"""What the tutorial scripts share: their NUTS settings and where their figures go."""

import os
import tempfile
from functools import partial
from pathlib import Path


def settings() -> dict:
    """NUTS settings: the tutorial's (4 chains × 1000 draws), or short ones with BAYESLMM_QUICK=1."""
    if os.environ.get("BAYESLMM_QUICK", "") not in ("", "0"):
        return {"draws": 200, "tune": 200, "chains": 2}
    return {"draws": 1000, "tune": 1000, "chains": 4}


def _figure_dir(out_dir=None, *, prefix: str) -> Path:
    folder = Path(out_dir or os.environ.get("BAYESLMM_FIGURES") or tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def figure_dir_for(name: str):
    """``figure_dir(out_dir=None)``: the argument, else BAYESLMM_FIGURES, else a new temporary folder."""
    return partial(_figure_dir, prefix=f"bayeslmm-{name}-")
