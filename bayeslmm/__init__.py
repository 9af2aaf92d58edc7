"""bayeslmm: linear mixed models with lme4 formulas, fitted by REML/ML and by NUTS."""

from .bayes.priors import Prior
from .errors import BayesLMMError, DataError, FormulaError, ModelError
from .model import Model
from .reml import FreqFit
from .spec import ModelSpec, RandomBlock

__version__ = "0.1.0"

__all__ = ["BayesLMMError", "Prior", "DataError", "FormulaError", "FreqFit", "Model", "ModelError", "ModelSpec",
           "RandomBlock", "__version__"]
