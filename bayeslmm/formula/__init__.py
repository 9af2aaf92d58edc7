"""lme4 formulas: bar-term parsing and the design of a :class:`~bayeslmm.spec.ModelSpec`."""

from .design import build_spec, formula_with_groups
from .parse import BarTerm, ParsedFormula, parse_formula

__all__ = ["BarTerm", "ParsedFormula", "build_spec", "formula_with_groups", "parse_formula"]
