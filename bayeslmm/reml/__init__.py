"""The frequentist twin: REML / ML by the profiled deviance (lme4's algorithm)."""

from .deviance import Factorization, ProfiledDeviance
from .fit import fit_frequentist
from .optimize import OptimizationRecord, minimize_bobyqa
from .results import FreqFit

__all__ = ["Factorization", "FreqFit", "OptimizationRecord", "ProfiledDeviance", "fit_frequentist",
           "minimize_bobyqa"]
