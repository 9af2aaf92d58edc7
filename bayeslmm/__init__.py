"""bayeslmm: linear mixed models with lme4 formulas, fitted by REML/ML and by NUTS."""

from .bayes.priors import Prior
from .bayes.results import BayesFit
from .compare import compare
from .errors import BayesLMMError, DataError, FormulaError, ModelError
from .io import load
from .model import Model
from .plots import caterpillar_plot, ppc_plot, shrinkage_plot, variance_plot
from .pooling import pooling_table
from .reml import FreqFit
from .reml.anova import anova
from .spec import ModelSpec, RandomBlock

__version__ = "0.1.0"

__all__ = ["BayesLMMError", "Prior", "DataError", "FormulaError", "FreqFit", "load", "Model", "ModelError",
           "ModelSpec", "RandomBlock", "__version__", "caterpillar_plot", "pooling_table", "ppc_plot", "shrinkage_plot",
           "variance_plot", "BayesFit", "anova", "compare"]
