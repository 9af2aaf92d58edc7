"""bayeslmm: linear mixed models with lme4 formulas, fitted by REML/ML and by NUTS.

The names below are imported when first used (PEP 562), so that ``import bayeslmm`` —
and the command line's start — does not pay for formulae, scipy.stats, PyMC and
xarray before a call needs them.
"""

from importlib import import_module

from .compare import compare  # eager: the function shares its module's name, which a later import would rebind
from .errors import BayesLMMError, DataError, FormulaError, ModelError
from .version import __version__

#: public name → the module that defines it
_LAZY = {
    "Prior": "bayeslmm.bayes.priors",
    "BayesFit": "bayeslmm.bayes.results",
    "load": "bayeslmm.io",
    "Model": "bayeslmm.model",
    "caterpillar_plot": "bayeslmm.plots",
    "conditional_effects_plot": "bayeslmm.plots",
    "ppc_plot": "bayeslmm.plots",
    "shrinkage_plot": "bayeslmm.plots",
    "variance_plot": "bayeslmm.plots",
    "pooling_table": "bayeslmm.pooling",
    "FreqFit": "bayeslmm.reml.results",
    "anova": "bayeslmm.reml.anova",
    "ModelSpec": "bayeslmm.spec",
    "VarIdent": "bayeslmm.residual",
    "VarPower": "bayeslmm.residual",
    "VarExp": "bayeslmm.residual",
    "VarFixed": "bayeslmm.residual",
    "CorAR1": "bayeslmm.residual",
    "CorCAR1": "bayeslmm.residual",
    "CorCompSymm": "bayeslmm.residual",
    "RandomBlock": "bayeslmm.spec",
}

__all__ = ["BayesLMMError", "DataError", "FormulaError", "ModelError", "__version__", "compare", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'bayeslmm' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
