"""A small expression language for searched functions: grammar, expression trees, parser and token encoding.

Grid Search Network learns two kinds of function by reinforcement learning, both written in this language:

* an elementwise embedding transform over the variable ``x`` (an embedding array), e.g. ``mul(tanh(x), x)``;
* an SVM kernel over pairwise matrices of two sets of vectors (:func:`pairwise_variables`: ``dot``, ``l2sq``,
  ``l1``, ``cosine``), e.g. ``exp(neg(mul(0.5, l2sq)))``, the RBF kernel with gamma 0.5.

An expression is a tree of frozen dataclasses (:class:`Var`, :class:`Const`, :class:`Unary`, :class:`Binary`).
Its canonical string (``str(expr)``) is what a bundle stores; :func:`parse` reads it back with a
recursive-descent parser (never ``eval``), so ``parse(str(e), grammar) == e``.

The controller does not emit trees but a fixed-length token sequence, as in "Searching for activation
functions" (Ramachandran et al., 2017): ``units`` core units, each ``binary(unary(a), unary(b))`` where the
operands ``a`` and ``b`` are a variable, a constant, or (from the second unit on) the previous unit's output.
The last unit is the expression. With the default two units that is 10 tokens, the length METHODS.md gives.
:func:`decode` turns tokens into a tree literally: no simplification, so a unit the last one does not use is
simply absent from the tree, and ``add(id(x), id(x))`` stays as it is.

No sequence describes a constant: a constant transform or kernel carries no information, and with uniform
tokens about half of the embedding grammar's sequences (51%; 16% of the kernel grammar's) would be one, a
wasted sample. A unit is *live* when one of its operands is a variable, or ``prev`` of a live unit; the
expression uses a variable exactly when the last unit is live. So one position is constrained: the last unit's
second operand, when its first operand is not live, must be a variable, or ``prev`` if the previous unit is
live (:func:`allowed_tokens`). Every other choice stays open, so every non-constant expression of the layout
can still be written, and nothing else. The controller masks that position accordingly (its probabilities are
renormalised over what is allowed), :func:`random_tokens` samples under the same rule, and :func:`decode`
refuses a sequence that breaks it.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist
from scipy.special import expit

# exp's input is clipped so exp cannot overflow (e^20 ~ 4.9e8 fits float32); chained ops can still overflow,
# which the finiteness check of Expr.evaluate turns into an ExpressionError.
EXP_CLIP = 20.0


def _exp(x: np.ndarray) -> np.ndarray:
    return np.exp(np.clip(x, -EXP_CLIP, EXP_CLIP))


UNARY_OPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda x: x,
    "neg": np.negative,
    "square": np.square,
    "cube": lambda x: x * x * x,
    "abs": np.abs,
    "sqrt_abs": lambda x: np.sqrt(np.abs(x)),
    "exp": _exp,
    "log1p_abs": lambda x: np.log1p(np.abs(x)),
    "sin": np.sin,
    "tanh": np.tanh,
    "sign": np.sign,
    "sigmoid": expit,
}

BINARY_OPS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "max": np.maximum,
    "min": np.minimum,
}

# The operand token that stands for the previous core unit's output.
PREV = "prev"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class ExpressionError(ValueError):
    """An expression that cannot be parsed, decoded or evaluated to finite values."""


def format_constant(value: float) -> str:
    """Canonical text of a constant: the shortest round-tripping float, without a trailing ``.0`` (``0.5``, ``2``)."""
    text = repr(float(value))
    return text.removesuffix(".0")


@dataclass(frozen=True)
class Grammar:
    """Which variables, constants and operators exist, and the shape of the controller's token sequence.

    Args:
        variables: variable names, bound by the ``env`` of :meth:`Expr.evaluate`.
        constants: constant leaves (finite, distinct).
        unary_ops: names from :data:`UNARY_OPS`, in vocabulary order.
        binary_ops: names from :data:`BINARY_OPS`, in vocabulary order.
        units: core units per token sequence (5 tokens each).
        max_depth: deepest tree :func:`parse` accepts (a leaf has depth 1).
        max_nodes: most nodes :func:`parse` accepts.
    """

    variables: tuple[str, ...]
    constants: tuple[float, ...] = (1.0, 0.5, 2.0)
    unary_ops: tuple[str, ...] = tuple(UNARY_OPS)
    binary_ops: tuple[str, ...] = tuple(BINARY_OPS)
    units: int = 2
    max_depth: int = 16
    max_nodes: int = 256

    def __post_init__(self) -> None:
        if not self.variables:
            raise ValueError("a grammar needs at least one variable")
        reserved = {PREV, *UNARY_OPS, *BINARY_OPS}
        for name in self.variables:
            if not _NAME.match(name) or name in reserved:
                raise ValueError(f"bad variable name {name!r}: not an identifier, or an operator name or {PREV!r}")
        if len(set(self.variables)) != len(self.variables):
            raise ValueError(f"duplicate variables in {self.variables}")
        if any(not math.isfinite(c) for c in self.constants) or len(set(self.constants)) != len(self.constants):
            raise ValueError(f"constants must be finite and distinct, got {self.constants}")
        for ops, table in ((self.unary_ops, UNARY_OPS), (self.binary_ops, BINARY_OPS)):
            unknown = [op for op in ops if op not in table]
            if unknown or not ops or len(set(ops)) != len(ops):
                raise ValueError(f"ops {ops} must be distinct, non-empty, from {sorted(table)}")
        if self.units < 1:
            raise ValueError(f"units must be >= 1, got {self.units}")
        # Every decoded sequence must parse back: depth 2u+1, at most 4 * 2^u - 3 nodes (both operands = prev).
        if self.max_depth < 2 * self.units + 1 or self.max_nodes < 4 * 2**self.units - 3:
            raise ValueError(
                f"max_depth={self.max_depth} / max_nodes={self.max_nodes} are too small for {self.units} units"
            )

    @property
    def leaves(self) -> tuple[Expr, ...]:
        """Operand vocabulary of the first unit: the variables, then the constants."""
        return tuple(Var(v) for v in self.variables) + tuple(Const(float(c)) for c in self.constants)

    @property
    def token_kinds(self) -> tuple[str, ...]:
        """Kind of each token position: ``operand, unary, operand, unary, binary`` per unit."""
        return ("operand", "unary", "operand", "unary", "binary") * self.units

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        """Number of choices at each token position (operands of later units add ``prev``, the last choice)."""
        n_leaves = len(self.variables) + len(self.constants)
        sizes = {"unary": len(self.unary_ops), "binary": len(self.binary_ops)}
        return tuple(
            n_leaves + (i >= 5) if kind == "operand" else sizes[kind] for i, kind in enumerate(self.token_kinds)
        )

    @property
    def prev_token(self) -> int:
        """The operand token that stands for ``prev``: the last one of an operand position from the second unit on."""
        return len(self.variables) + len(self.constants)

    @property
    def guarded_position(self) -> int:
        """The position whose choices :func:`allowed_tokens` may restrict: the last unit's second operand."""
        return 5 * (self.units - 1) + 2

    @property
    def kind_sizes(self) -> dict[str, int]:
        """Largest vocabulary of each token kind: the width of the controller's output head for it."""
        sizes: dict[str, int] = {}
        for kind, size in zip(self.token_kinds, self.vocab_sizes):
            sizes[kind] = max(sizes.get(kind, 0), size)
        return sizes


EMBEDDING_GRAMMAR = Grammar(variables=("x",))
"""Elementwise embedding transforms f(x)."""

KERNEL_GRAMMAR = Grammar(variables=("dot", "l2sq", "l1", "cosine"))
"""SVM kernels k(a, b) over the matrices of :func:`pairwise_variables`."""


class Expr(ABC):
    """Base of the expression tree nodes."""

    def evaluate(self, env: Mapping[str, np.ndarray]) -> np.ndarray:
        """Value of the expression, elementwise over the arrays bound in ``env``.

        Integer inputs are computed in float64; float32 inputs stay float32. The result has the broadcast shape
        of all ``env`` arrays, also for an expression without variables.

        Raises:
            ExpressionError: some value is NaN or infinite (an overflow such as ``cube(cube(exp(x)))`` in
                float32, or inf - inf); a reward function can score such an expression 0. An infinite
                intermediate whose limit is finite (``tanh(square(1e300))`` = 1) is accepted.
            KeyError: a variable of the expression is missing from ``env`` (a caller's bug, not a bad expression).
        """
        arrays = {k: np.asarray(v) for k, v in env.items()}
        arrays = {k: v if np.issubdtype(v.dtype, np.floating) else v.astype(np.float64) for k, v in arrays.items()}
        dtype = np.result_type(*arrays.values()) if arrays else np.dtype(np.float64)
        with np.errstate(all="ignore"):
            value = np.asarray(self._eval(arrays, dtype), dtype=dtype)
        shape = np.broadcast_shapes(*(v.shape for v in arrays.values()))
        if value.shape != shape:
            value = np.array(np.broadcast_to(value, shape))
        bad = np.size(value) - int(np.count_nonzero(np.isfinite(value)))
        if bad:
            raise ExpressionError(f"{self} is not finite on {bad} of {np.size(value)} values")
        return value

    @abstractmethod
    def _eval(self, env: Mapping[str, np.ndarray], dtype: np.dtype) -> np.ndarray: ...

    @abstractmethod
    def to_string(self) -> str:
        """Canonical text, e.g. ``mul(tanh(x), x)``; :func:`parse` reads it back."""
        ...

    def __str__(self) -> str:
        return self.to_string()

    @abstractmethod
    def variables(self) -> frozenset[str]:
        """Names of the variables the expression uses; empty for a constant (useless) function."""
        ...

    @abstractmethod
    def depth(self) -> int:
        """Height of the tree; a leaf has depth 1."""
        ...

    @abstractmethod
    def size(self) -> int:
        """Number of nodes."""
        ...


@dataclass(frozen=True)
class Var(Expr):
    """A variable, bound by name in ``env``."""

    name: str

    def _eval(self, env, dtype):
        return env[self.name]

    def to_string(self) -> str:
        return self.name

    def variables(self) -> frozenset[str]:
        return frozenset((self.name,))

    def depth(self) -> int:
        return 1

    def size(self) -> int:
        return 1


@dataclass(frozen=True)
class Const(Expr):
    """A constant."""

    value: float

    def _eval(self, env, dtype):
        return np.asarray(self.value, dtype=dtype)

    def to_string(self) -> str:
        return format_constant(self.value)

    def variables(self) -> frozenset[str]:
        return frozenset()

    def depth(self) -> int:
        return 1

    def size(self) -> int:
        return 1


@dataclass(frozen=True)
class Unary(Expr):
    """``op(arg)``, ``op`` a name from :data:`UNARY_OPS`."""

    op: str
    arg: Expr

    def _eval(self, env, dtype):
        return UNARY_OPS[self.op](self.arg._eval(env, dtype))

    def to_string(self) -> str:
        return f"{self.op}({self.arg.to_string()})"

    def variables(self) -> frozenset[str]:
        return self.arg.variables()

    def depth(self) -> int:
        return 1 + self.arg.depth()

    def size(self) -> int:
        return 1 + self.arg.size()


@dataclass(frozen=True)
class Binary(Expr):
    """``op(left, right)``, ``op`` a name from :data:`BINARY_OPS`."""

    op: str
    left: Expr
    right: Expr

    def _eval(self, env, dtype):
        return BINARY_OPS[self.op](self.left._eval(env, dtype), self.right._eval(env, dtype))

    def to_string(self) -> str:
        return f"{self.op}({self.left.to_string()}, {self.right.to_string()})"

    def variables(self) -> frozenset[str]:
        return self.left.variables() | self.right.variables()

    def depth(self) -> int:
        return 1 + max(self.left.depth(), self.right.depth())

    def size(self) -> int:
        return 1 + self.left.size() + self.right.size()


def safe_evaluate(expr: Expr, env: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """:meth:`Expr.evaluate`, or None where the values are not finite."""
    try:
        return expr.evaluate(env)
    except ExpressionError:
        return None


def pairwise_variables(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """The kernel variables of :data:`KERNEL_GRAMMAR` for (n, d) ``a`` and (m, d) ``b``, each an (n, m) float64 matrix.

    ``dot`` = a_i . b_j, ``l2sq`` = ||a_i - b_j||^2, ``l1`` = sum |a_i - b_j|, ``cosine`` = cos(a_i, b_j) (0 where
    a vector is zero). The distances come from ``scipy.spatial.distance.cdist``, exact (no ``|a|^2 + |b|^2 - 2ab``
    cancellation) and without an (n, m, d) intermediate.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (n, d) and (m, d) arrays, got {a.shape} and {b.shape}")
    dot = a @ b.T
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = np.outer(norm_a, norm_b)
    cosine = np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)
    return {
        "dot": dot,
        "l2sq": cdist(a, b, "sqeuclidean"),
        "l1": cdist(a, b, "cityblock"),
        "cosine": cosine,
    }


# ----------------------------------------------------------------------------------------------- parsing

_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<p>[(),]))"
)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, offset) triples, kind one of ``num``, ``name``, ``(``, ``)``, ``,``."""
    tokens, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return tokens
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ExpressionError(f"unexpected character {text[pos]!r} at offset {pos} in {text!r}")
        kind = match.lastgroup
        value = match.group(kind)
        tokens.append((value if kind == "p" else kind, value, match.start(kind)))
        pos = match.end()


class _Parser:
    def __init__(self, text: str, grammar: Grammar):
        self.text, self.grammar = text, grammar
        self.tokens = _tokenize(text)
        self.i = 0
        self.nodes = 0

    def _fail(self, message: str, offset: int | None = None) -> ExpressionError:
        if offset is None:
            offset = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        return ExpressionError(f"{message} at offset {offset} in {self.text!r}")

    def _expect(self, kind: str) -> None:
        if self.i >= len(self.tokens) or self.tokens[self.i][0] != kind:
            found = repr(self.tokens[self.i][1]) if self.i < len(self.tokens) else "end of text"
            raise self._fail(f"expected {kind!r}, found {found}")
        self.i += 1

    def parse(self) -> Expr:
        if not self.tokens:
            raise ExpressionError("empty expression")
        expr = self._expr(1)
        if self.i != len(self.tokens):
            raise self._fail(f"trailing {self.tokens[self.i][1]!r} after a complete expression")
        return expr

    def _expr(self, depth: int) -> Expr:
        if depth > self.grammar.max_depth:
            raise self._fail(f"expression deeper than max_depth={self.grammar.max_depth}")
        self.nodes += 1
        if self.nodes > self.grammar.max_nodes:
            raise self._fail(f"expression longer than max_nodes={self.grammar.max_nodes}")
        if self.i >= len(self.tokens):
            raise self._fail("expected an operand, found end of text")
        kind, value, offset = self.tokens[self.i]
        self.i += 1
        if kind == "num":
            number = float(value)
            for c in self.grammar.constants:
                if number == c:
                    return Const(float(c))
            allowed = ", ".join(format_constant(c) for c in self.grammar.constants)
            raise self._fail(f"constant {value} is not in the grammar (allowed: {allowed})", offset)
        if kind != "name":
            raise self._fail(f"expected an operand, found {value!r}", offset)
        called = self.i < len(self.tokens) and self.tokens[self.i][0] == "("
        if not called:
            if value in self.grammar.variables:
                return Var(value)
            if value in self.grammar.unary_ops or value in self.grammar.binary_ops:
                raise self._fail(f"operator {value!r} needs arguments", offset)
            raise self._fail(f"unknown variable {value!r} (known: {', '.join(self.grammar.variables)})", offset)
        if value in self.grammar.unary_ops:
            arity = 1
        elif value in self.grammar.binary_ops:
            arity = 2
        else:
            known = ", ".join(self.grammar.unary_ops + self.grammar.binary_ops)
            raise self._fail(f"unknown operator {value!r} (known: {known})", offset)
        self._expect("(")
        args = [self._expr(depth + 1)]
        while self.i < len(self.tokens) and self.tokens[self.i][0] == ",":
            self.i += 1
            args.append(self._expr(depth + 1))
        if len(args) != arity:
            raise self._fail(f"{value} takes {arity} argument(s), got {len(args)}", offset)
        self._expect(")")
        return Unary(value, args[0]) if arity == 1 else Binary(value, args[0], args[1])


def parse(text: str, grammar: Grammar) -> Expr:
    """Read an expression written as :meth:`Expr.to_string` writes it (whitespace is free).

    Raises:
        ExpressionError: unknown operator, variable or constant, wrong number of arguments, unbalanced
            parentheses, empty text, trailing tokens, or a tree deeper or larger than the grammar allows.
    """
    if len(text) > 64 * grammar.max_nodes:
        raise ExpressionError(f"expression text of {len(text)} characters is too long")
    return _Parser(text, grammar).parse()


# ----------------------------------------------------------------------------------------- token encoding


def _live_operand(token: int, grammar: Grammar, prev_live: bool) -> bool:
    """Whether an operand token brings a variable: a variable itself, or ``prev`` of a live unit."""
    return token < len(grammar.variables) or (token == grammar.prev_token and prev_live)


def allowed_tokens(grammar: Grammar, prefix: Sequence[int]) -> np.ndarray:
    """Which tokens may follow ``prefix``: a bool mask over the vocabulary of position ``len(prefix)``.

    Everything is allowed except at :attr:`Grammar.guarded_position` when the last unit's first operand is not
    live: there only the variables, and ``prev`` if the previous unit is live, so that the sequence cannot
    describe a constant (see the module docstring).
    """
    position = len(prefix)
    if position >= len(grammar.vocab_sizes):
        raise ExpressionError(f"a sequence has {len(grammar.vocab_sizes)} tokens; there is no position {position}")
    allowed = np.ones(grammar.vocab_sizes[position], dtype=bool)
    if position != grammar.guarded_position:
        return allowed
    prev_live = False
    for unit in range(grammar.units - 1):
        a, _, b = (int(t) for t in prefix[5 * unit : 5 * unit + 3])
        prev_live = _live_operand(a, grammar, prev_live) or _live_operand(b, grammar, prev_live)
    if _live_operand(int(prefix[position - 2]), grammar, prev_live):
        return allowed
    allowed[len(grammar.variables) :] = False
    if grammar.units > 1 and prev_live:
        allowed[grammar.prev_token] = True
    return allowed


def decode(tokens: Sequence[int], grammar: Grammar) -> Expr:
    """The expression a controller's token sequence describes (see the module docstring for the layout).

    Raises:
        ExpressionError: wrong length, a token outside its position's vocabulary, or a sequence that describes
            a constant (one :func:`allowed_tokens` rules out).
    """
    sizes = grammar.vocab_sizes
    if len(tokens) != len(sizes):
        raise ExpressionError(f"expected {len(sizes)} tokens for {grammar.units} units, got {len(tokens)}")
    for position, (token, size) in enumerate(zip(tokens, sizes)):
        if not 0 <= int(token) < size:
            raise ExpressionError(f"token {token} at position {position} is outside 0..{size - 1}")
    leaves = grammar.leaves
    prev: Expr | None = None
    for unit in range(grammar.units):
        a, ua, b, ub, op = (int(t) for t in tokens[5 * unit : 5 * unit + 5])
        left = Unary(grammar.unary_ops[ua], leaves[a] if a < len(leaves) else prev)
        right = Unary(grammar.unary_ops[ub], leaves[b] if b < len(leaves) else prev)
        prev = Binary(grammar.binary_ops[op], left, right)
    if not prev.variables():
        raise ExpressionError(
            f"tokens {[int(t) for t in tokens]} describe a constant, {prev}: the last unit must use a variable"
        )
    return prev


def random_tokens(grammar: Grammar, rng: np.random.Generator) -> list[int]:
    """A random token sequence, each token uniform over what :func:`allowed_tokens` allows after the ones before:
    for tests, and for a random-search baseline to compare the controller to."""
    tokens: list[int] = []
    for _ in grammar.vocab_sizes:
        tokens.append(int(rng.choice(np.flatnonzero(allowed_tokens(grammar, tokens)))))
    return tokens
