"""lme4 bar syntax: split a mixed-model formula into its fixed part and its bar terms.

The fixed part is handed to formulae afterwards; the bar terms keep lme4's meaning
(``(1 + x | g)`` is ONE correlated block, ``(x || g)`` independent effects,
``(1 | a/b)`` nesting, ``(1 | a:b)`` an interaction factor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from formulae.parser import Parser
from formulae.scanner import ScanError, Scanner

from ..errors import FormulaError

# a letter or "_" (any script: formulae reads Größe as a name too), then letters, digits, "_" and "."
_IDENT = re.compile(r"`[^`]+`|[^\W\d][\w.]*")


@dataclass(frozen=True)
class BarTerm:
    """One random-effect term as written: ``(lhs | group)`` or ``(lhs || group)``.

    Attributes
    ----------
    lhs : str
        The left side, a formula right-hand side such as ``"1 + x"`` or ``"0 + x"``.
    factors : tuple of tuple of str
        The grouping factors after expanding ``/``: each is a tuple of column names
        whose interaction defines the levels (``("a",)``, ``("a", "b")``).
    independent : bool
        ``True`` for ``||`` (independent effects, no correlations).
    text : str
        The term as the user wrote it.
    """

    lhs: str
    factors: tuple[tuple[str, ...], ...]
    independent: bool
    text: str


@dataclass(frozen=True)
class ParsedFormula:
    """A formula split into response, fixed right-hand side and bar terms."""

    formula: str
    response: str
    fixed: str
    bars: tuple[BarTerm, ...]


def _caret(formula: str, pos: int, message: str) -> FormulaError:
    pointer = " " * pos + "^"
    return FormulaError(f"{message}\n  {formula}\n  {pointer}")


def _check_parentheses(formula: str) -> None:
    depth = 0
    for i, ch in enumerate(formula):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise _caret(formula, i, "unmatched ')' in formula")
    if depth:
        raise _caret(formula, formula.rfind("(") if "(" in formula else len(formula),
                     "unclosed '(' in formula: add the missing ')'")


def split_top_level(text: str, sep: str) -> list[tuple[int, str]]:
    """Split ``text`` at ``sep`` outside parentheses/brackets; return (offset, piece) pairs."""
    pieces: list[tuple[int, str]] = []
    depth = 0
    start = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            pieces.append((start, text[start:i]))
            i += len(sep)
            start = i
            continue
        i += 1
    pieces.append((start, text[start:]))
    return pieces


def _strip_outer(text: str) -> str | None:
    """Return the inside of ``text`` if it is one parenthesised group, else None."""
    t = text.strip()
    if not (t.startswith("(") and t.endswith(")")):
        return None
    depth = 0
    for i, ch in enumerate(t):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0 and i != len(t) - 1:
                return None
    return t[1:-1]


def _find_bar(inner: str) -> tuple[int, bool] | None:
    """Position of the top-level ``|`` or ``||`` in ``inner`` and whether it is double."""
    depth = 0
    for i, ch in enumerate(inner):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "|" and depth == 0:
            double = inner[i + 1 : i + 2] == "|"
            return i, double
    return None


def _name(token: str) -> str:
    token = token.strip()
    if token.startswith("`") and token.endswith("`"):
        return token[1:-1]
    return token


def _parse_group(group: str, formula: str, offset: int) -> tuple[tuple[str, ...], ...]:
    """Expand ``a/b/c`` into ``a``, ``a:b``, ``a:b:c``; ``a:b`` stays one factor."""
    group = group.strip()
    if not group:
        raise _caret(formula, offset, "a bar term needs a grouping factor after '|'")
    nested = [p.strip() for _, p in split_top_level(group, "/")]
    factors: list[tuple[str, ...]] = []
    prefix: tuple[str, ...] = ()
    for part in nested:
        names = tuple(_name(p) for _, p in split_top_level(part, ":"))
        if any(not n for n in names):
            raise _caret(formula, offset, f"empty grouping factor in {group!r}")
        for _, raw in split_top_level(part, ":"):
            if not _IDENT.fullmatch(raw.strip()):
                where = formula.find(raw.strip(), offset)
                raise _caret(
                    formula, where if where >= 0 else offset,
                    f"the grouping factor {raw.strip()!r} is not a column name: a grouping factor is a "
                    "column, an interaction 'a:b' or a nesting 'a/b' (make other groupings a column first)",
                )
        prefix = prefix + names
        factors.append(prefix)
    return tuple(factors)


class _PositionScanner(Scanner):
    """formulae's scanner, also recording where each token starts."""

    def __init__(self, code: str):
        super().__init__(code)
        self.starts: list[int] = []

    def add_token(self, kind, literal=None):
        self.starts.append(self.start)
        super().add_token(kind, literal)


def _check_syntax(text: str, formula: str, offset: int, where: str) -> None:
    """Parse one right-hand-side expression as formulae will; a caret marks where it fails.

    formulae stops quietly at a token it cannot continue with (``x z`` is read as
    ``x``), so a leftover token is an error here rather than a dropped term.
    """
    lead = len(text) - len(text.lstrip())
    body = text.strip()
    if not body:
        return
    scanner = _PositionScanner(body)
    try:
        tokens = scanner.scan(add_intercept=False)
    except ScanError as exc:
        char = body[scanner.start] if scanner.start < len(body) else ""
        hint = " (R's '^' for interaction powers is not supported: write the interactions out)" if char == "^" else ""
        raise _caret(formula, offset + lead + scanner.start,
                     f"unexpected character {char!r} in {where}{hint}") from exc
    parser = Parser(tokens)
    try:
        parser.parse()
    except Exception as exc:  # formulae's ParseError and friends
        at = scanner.starts[parser.current] if parser.current < len(scanner.starts) else len(body)
        raise _caret(formula, offset + lead + at, f"could not parse {where}: {exc}") from exc
    if not parser.at_end():
        at = scanner.starts[parser.current]
        raise _caret(formula, offset + lead + at,
                     f"unexpected {tokens[parser.current].lexeme!r} in {where}: is a '+' or an "
                     "operator missing?")


def parse_formula(formula: str) -> ParsedFormula:
    """Split an lme4 formula into response, fixed part and bar terms.

    Parameters
    ----------
    formula : str
        For example ``"Reaction ~ Days + (Days | Subject)"``.

    Returns
    -------
    ParsedFormula

    Raises
    ------
    FormulaError
        With a caret pointing at the offending place.
    """
    cut, response = _split_response(formula)
    fixed_terms: list[str] = []
    removed: list[str] = []
    bars: list[BarTerm] = []
    for off, piece in split_top_level(formula[cut:], "+"):
        start = cut + off
        if not piece.strip():
            raise _caret(formula, start + len(piece), "empty term: two '+' in a row, or a '+' at an end")
        piece, minus = _split_removals(formula, start, piece)
        removed += minus
        term = _parse_term(formula, start, piece)
        if isinstance(term, BarTerm):
            bars.append(term)
        else:
            fixed_terms.append(term)
    fixed = " + ".join(fixed_terms) if fixed_terms else "1"
    if removed:
        fixed += "".join(f" - {r}" for r in removed)
    return ParsedFormula(formula=formula, response=response, fixed=fixed, bars=tuple(bars))


def _split_response(formula) -> tuple[int, str]:
    """Check the formula's outline (one '~', a response, a right side); (where the right side starts, response)."""
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string such as 'y ~ x + (1 | g)', got {type(formula).__name__}")
    if not formula.strip():
        raise FormulaError("formula is empty: write it as 'y ~ x + (1 | g)'")
    _check_parentheses(formula)
    tilde = [off for off, _ in split_top_level(formula, "~")][1:]
    if not tilde:
        raise FormulaError(f"formula {formula!r} has no '~': write it as 'response ~ predictors'")
    if len(tilde) > 1:
        raise _caret(formula, tilde[1] - 1, "formula has more than one '~'")
    cut = tilde[0]
    response = formula[: cut - 1].strip()
    if not response:
        raise _caret(formula, 0, "formula has no response on the left of '~'")
    if not formula[cut:].strip():
        raise _caret(formula, len(formula), "formula has nothing on the right of '~'")
    _check_syntax(formula[: cut - 1], formula, 0, "the response")
    return cut, response


def _split_removals(formula: str, start: int, piece: str) -> tuple[str, list[str]]:
    """``(1 | g) - 1``: a bar term followed by removals from the fixed part; (the bar term, the removals).

    Only after a parenthesised head: ``x - 1`` is a fixed term formulae reads itself.
    """
    minus = split_top_level(piece, "-")
    if len(minus) == 1 or _strip_outer(minus[0][1]) is None:
        return piece, []
    removed = []
    for moff, rest in minus[1:]:
        if not rest.strip():
            raise _caret(formula, start + moff, "nothing after '-'")
        _check_syntax(rest, formula, start + moff, "the fixed effects")
        removed.append(rest.strip())
    return minus[0][1], removed


def _unwrap(piece: str, pos: int) -> tuple[str | None, int]:
    """The inside of a parenthesised term and where it starts; ``((1 | g))`` loses its extra parentheses."""
    inner = _strip_outer(piece)
    inner_pos = pos + 1
    while inner is not None and _find_bar(inner) is None and _strip_outer(inner) is not None:
        inner_pos += len(inner) - len(inner.lstrip()) + 1
        inner = _strip_outer(inner)
    return inner, inner_pos


def _parse_term(formula: str, start: int, piece: str) -> BarTerm | str:
    """One term of the right side (at ``start`` in ``formula``): a bar term, or a fixed term's text."""
    pos = start + (len(piece) - len(piece.lstrip()))
    inner, inner_pos = _unwrap(piece, pos)
    bar = _find_bar(inner) if inner is not None else None
    if bar is None:
        if "|" in piece:
            raise _caret(formula, pos + piece.strip().find("|"),
                         "a random-effect term must be in parentheses: '(lhs | group)'")
        _check_syntax(piece, formula, start, "the fixed effects")
        return piece.strip()
    i, double = bar
    lhs = inner[:i].strip()
    group = inner[i + (2 if double else 1) :]
    if not lhs:
        raise _caret(formula, inner_pos, "a bar term needs a left side, e.g. '(1 | g)'")
    _check_syntax(inner[:i], formula, inner_pos, f"the left side of {piece.strip()}")
    factors = _parse_group(group, formula, inner_pos + i)
    return BarTerm(lhs=lhs, factors=factors, independent=double, text=piece.strip())


def referenced_names(expression: str) -> list[tuple[str, int]]:
    """Variable names an expression refers to, with their offsets.

    Function names (an identifier followed by ``(``), keyword-argument names and
    names inside string literals are skipped; what is left should be columns.
    """
    names: list[tuple[str, int]] = []
    # blank out string literals so names inside them are not taken for columns
    masked = re.sub(r"(['\"])(?:\\.|(?!\1).)*\1", lambda m: " " * len(m.group(0)), expression)
    for m in _IDENT.finditer(masked):
        tok = m.group(0)
        rest = masked[m.end():].lstrip()
        if rest.startswith("(") and not tok.startswith("`"):
            continue  # a function call
        if rest.startswith("=") and not rest.startswith("=="):
            continue  # a keyword argument
        before = masked[: m.start()].rstrip()
        if before.endswith(".") or (before and before[-1].isdigit() and tok[0] in "eE"):
            continue  # attribute access or exponent (1e5)
        names.append((_name(tok), m.start()))
    return names
