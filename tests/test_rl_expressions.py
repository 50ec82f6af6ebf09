"""The expression language of the RL search: ops vs numpy formulas, parse/print round trips, rejections, kernels."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_core.rl.expressions import (
    EMBEDDING_GRAMMAR,
    KERNEL_GRAMMAR,
    Binary,
    Const,
    ExpressionError,
    Grammar,
    Unary,
    Var,
    allowed_tokens,
    decode,
    pairwise_variables,
    parse,
    random_tokens,
    safe_evaluate,
)

X = np.array([-50.0, -3.0, -1.0, -0.25, 0.0, 0.25, 1.0, 3.0, 50.0])
Y = np.array([2.0, -4.0, 0.5, -0.25, 1.0, 0.0, -1.0, 3.5, -50.0])

UNARY_FORMULAS = {
    "id": lambda x: x,
    "neg": lambda x: -x,
    "square": lambda x: x**2,
    "cube": lambda x: x**3,
    "abs": np.abs,
    "sqrt_abs": lambda x: np.abs(x) ** 0.5,
    "exp": lambda x: np.exp(np.minimum(np.maximum(x, -20.0), 20.0)),
    "log1p_abs": lambda x: np.log(1.0 + np.abs(x)),
    "sin": np.sin,
    "tanh": np.tanh,
    "sign": lambda x: (x > 0).astype(float) - (x < 0),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
}

BINARY_FORMULAS = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "max": lambda x, y: np.where(x >= y, x, y),
    "min": lambda x, y: np.where(x <= y, x, y),
}

XY_GRAMMAR = Grammar(variables=("x", "y"))


def test_the_default_grammars_have_every_op():
    assert set(EMBEDDING_GRAMMAR.unary_ops) == set(UNARY_FORMULAS)
    assert set(EMBEDDING_GRAMMAR.binary_ops) == set(BINARY_FORMULAS)
    assert KERNEL_GRAMMAR.variables == ("dot", "l2sq", "l1", "cosine")


@pytest.mark.parametrize("op", sorted(UNARY_FORMULAS))
def test_unary_op_matches_its_formula(op):
    got = parse(f"{op}(x)", EMBEDDING_GRAMMAR).evaluate({"x": X})
    np.testing.assert_allclose(got, UNARY_FORMULAS[op](X), rtol=1e-12, atol=0)


@pytest.mark.parametrize("op", sorted(BINARY_FORMULAS))
def test_binary_op_matches_its_formula(op):
    got = parse(f"{op}(x, y)", XY_GRAMMAR).evaluate({"x": X, "y": Y})
    np.testing.assert_array_equal(got, BINARY_FORMULAS[op](X, Y))


def test_exp_is_clipped_so_it_cannot_overflow():
    got = parse("exp(x)", EMBEDDING_GRAMMAR).evaluate({"x": np.array([1e6, -1e6], dtype=np.float32)})
    np.testing.assert_allclose(got, np.exp([20.0, -20.0]), rtol=1e-6)


def test_constants_and_composition():
    e = parse("add(mul(0.5, square(x)), sub(x, 2))", EMBEDDING_GRAMMAR)
    np.testing.assert_allclose(e.evaluate({"x": X}), 0.5 * X**2 + X - 2.0, rtol=1e-12)


def test_float32_stays_float32_and_integers_become_float64():
    e = parse("mul(sigmoid(x), add(x, 0.5))", EMBEDDING_GRAMMAR)
    x32 = X.astype(np.float32)
    got = e.evaluate({"x": x32})
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, UNARY_FORMULAS["sigmoid"](X) * (X + 0.5), rtol=1e-5)
    assert e.evaluate({"x": np.arange(-3, 4)}).dtype == np.float64


def test_a_constant_expression_has_the_shape_of_the_variables():
    e = parse("mul(2, 0.5)", EMBEDDING_GRAMMAR)
    got = e.evaluate({"x": np.zeros((3, 4), dtype=np.float32)})
    assert got.shape == (3, 4) and got.dtype == np.float32
    np.testing.assert_array_equal(got, 1.0)
    assert e.variables() == frozenset()
    assert parse("add(0.5, tanh(x))", EMBEDDING_GRAMMAR).variables() == {"x"}
    assert parse("add(l1, mul(dot, cosine))", KERNEL_GRAMMAR).variables() == {"l1", "dot", "cosine"}


def test_non_finite_values_raise_and_safe_evaluate_returns_none():
    # exp is clipped at e^20; cube four times gives e^1620, beyond float64.
    huge = "cube(cube(cube(cube(exp(x)))))"
    x = np.array([-1.0, 0.0, 30.0])
    for text in (huge, f"sub({huge}, {huge})", "mul(x, sign(x))"):
        e = parse(text, EMBEDDING_GRAMMAR)
        if text.startswith("mul"):  # the control: finite everywhere
            assert safe_evaluate(e, {"x": x}) is not None
            continue
        with pytest.raises(ExpressionError, match="not finite on 1 of 3"):
            e.evaluate({"x": x})
        assert safe_evaluate(e, {"x": x}) is None
    # An infinite intermediate with a finite limit is fine.
    with np.errstate(over="ignore"):
        want = np.tanh(np.exp(81 * np.clip(x, -20, 20)))
    np.testing.assert_allclose(parse(f"tanh({huge})", EMBEDDING_GRAMMAR).evaluate({"x": x}), want, rtol=1e-12)
    # e^160 fits float64 but not float32: finiteness is judged in the dtype computed.
    e = parse("square(square(square(exp(x))))", EMBEDDING_GRAMMAR)
    assert safe_evaluate(e, {"x": np.array([30.0])}) is not None
    assert safe_evaluate(e, {"x": np.array([30.0], dtype=np.float32)}) is None


def test_a_missing_variable_is_a_key_error_not_a_bad_expression():
    with pytest.raises(KeyError):
        parse("add(x, y)", XY_GRAMMAR).evaluate({"x": X})


def test_rbf_kernel_expression_equals_the_gram_matrix():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    env = pairwise_variables(a, b)
    got = parse("exp(neg(mul(0.5, l2sq)))", KERNEL_GRAMMAR).evaluate(env)
    want = np.array([[np.exp(-0.5 * sum((ai - bi) ** 2 for ai, bi in zip(u, v))) for v in b] for u in a])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    poly = parse("square(add(dot, 1))", KERNEL_GRAMMAR).evaluate(env)
    np.testing.assert_allclose(poly, np.array([[(u @ v + 1.0) ** 2 for v in b] for u in a]), rtol=1e-12)


def test_pairwise_variables_against_loops():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    a[2] = 0.0  # a zero vector: cosine 0, not NaN
    env = pairwise_variables(a, b)
    for i, u in enumerate(a):
        for j, v in enumerate(b):
            assert env["dot"][i, j] == pytest.approx(float(np.sum(u * v)))
            assert env["l2sq"][i, j] == pytest.approx(float(np.sum((u - v) ** 2)))
            assert env["l1"][i, j] == pytest.approx(float(np.sum(np.abs(u - v))))
            norm = np.sqrt(np.sum(u * u) * np.sum(v * v))
            assert env["cosine"][i, j] == pytest.approx(0.0 if norm == 0 else float(np.sum(u * v) / norm))
    with pytest.raises(ValueError):
        pairwise_variables(a, b[:, :5])


def test_canonical_strings():
    e = Binary("mul", Unary("tanh", Var("x")), Var("x"))
    assert str(e) == e.to_string() == "mul(tanh(x), x)"
    assert str(Unary("exp", Unary("neg", Binary("mul", Const(0.5), Var("l2sq"))))) == "exp(neg(mul(0.5, l2sq)))"
    assert str(parse("  max( abs(x) ,2.0 )", EMBEDDING_GRAMMAR)) == "max(abs(x), 2)"


@pytest.mark.parametrize("grammar", [EMBEDDING_GRAMMAR, KERNEL_GRAMMAR, Grammar(("x",), (1.0, -1.5, 1e-3), units=3)])
def test_parse_of_str_round_trips_on_random_decoded_expressions(grammar):
    rng = np.random.default_rng(0)
    env = {v: rng.normal(size=7) for v in grammar.variables}
    for _ in range(300):
        e = decode(random_tokens(grammar, rng), grammar)
        assert parse(str(e), grammar) == e
        assert parse(str(e).replace(" ", ""), grammar) == e
        value = safe_evaluate(e, env)
        again = safe_evaluate(parse(str(e), grammar), env)
        assert (value is None) == (again is None)
        if value is not None:
            np.testing.assert_array_equal(value, again)


def test_decode_builds_the_core_units():
    g = EMBEDDING_GRAMMAR
    u, b, leaf = g.unary_ops.index, g.binary_ops.index, ("x", 1.0, 0.5, 2.0).index
    prev = len(g.leaves)
    tokens = [leaf("x"), u("tanh"), leaf("x"), u("id"), b("mul"), prev, u("id"), leaf(0.5), u("square"), b("max")]
    assert str(decode(tokens, g)) == "max(id(mul(tanh(x), id(x))), square(0.5))"
    # Both operands of the second unit may be the first unit; an unused first unit is dropped.
    tokens[5:8] = [prev, u("neg"), prev]
    assert str(decode(tokens, g)) == "max(neg(mul(tanh(x), id(x))), square(mul(tanh(x), id(x))))"
    tokens[5:8] = [leaf(2.0), u("neg"), leaf("x")]
    assert str(decode(tokens, g)) == "max(neg(2), square(x))"


def test_decode_refuses_a_sequence_that_describes_a_constant():
    g = EMBEDDING_GRAMMAR
    u, b, leaf = g.unary_ops.index, g.binary_ops.index, ("x", 1.0, 0.5, 2.0).index
    prev = len(g.leaves)
    constant_unit = [leaf(1.0), u("exp"), leaf(2.0), u("id"), b("add")]
    with pytest.raises(ExpressionError, match="describe a constant"):
        decode(constant_unit + [prev, u("tanh"), leaf(0.5), u("id"), b("mul")], g)  # prev is a constant too
    with pytest.raises(ExpressionError, match="describe a constant"):
        decode([leaf("x"), u("id"), leaf("x"), u("id"), b("add"), leaf(2.0), u("id"), leaf(1.0), u("id"), b("add")], g)
    # A constant unit is fine where the expression still uses x.
    assert (
        str(decode(constant_unit + [prev, u("id"), leaf("x"), u("id"), b("mul")], g))
        == "mul(id(add(exp(1), id(2))), id(x))"
    )


@pytest.mark.parametrize(
    "grammar",
    [
        Grammar(("x",), (1.0,), unary_ops=("id",), binary_ops=("add",), units=1),
        Grammar(("x",), (1.0, 2.0), unary_ops=("id",), binary_ops=("add",), units=2),
        Grammar(("x", "y"), (1.0,), unary_ops=("id",), binary_ops=("add",), units=3),
    ],
)
def test_allowed_tokens_rule_out_exactly_the_constant_sequences(grammar):
    """Over every token combination: the mask allows it at every position if and only if it decodes."""
    import itertools

    n_allowed = 0
    for combo in itertools.product(*(range(n) for n in grammar.vocab_sizes)):
        allowed = all(allowed_tokens(grammar, combo[:i])[t] for i, t in enumerate(combo))
        try:
            decode(combo, grammar)
            decodes = True
        except ExpressionError:
            decodes = False
        assert allowed == decodes, combo
        n_allowed += allowed
    assert 0 < n_allowed < np.prod(grammar.vocab_sizes)


@pytest.mark.parametrize("grammar", [EMBEDDING_GRAMMAR, KERNEL_GRAMMAR])
def test_random_tokens_never_describe_a_constant(grammar):
    rng = np.random.default_rng(1)
    exprs = [decode(random_tokens(grammar, rng), grammar) for _ in range(2000)]
    assert all(e.variables() for e in exprs)
    assert any(any(isinstance(n, Const) for n in _nodes(e)) for e in exprs)  # constants are still used


def _nodes(e):
    yield e
    for child in (getattr(e, "arg", None), getattr(e, "left", None), getattr(e, "right", None)):
        if child is not None:
            yield from _nodes(child)


def test_token_layout():
    g = EMBEDDING_GRAMMAR  # 1 variable + 3 constants, 12 unary, 5 binary, 2 units
    assert len(g.token_kinds) == 10
    assert g.vocab_sizes == (4, 12, 4, 12, 5, 5, 12, 5, 12, 5)
    assert g.kind_sizes == {"operand": 5, "unary": 12, "binary": 5}


@pytest.mark.parametrize(
    "tokens",
    [[0] * 9, [0] * 11, [4, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 12, 0, 0, 0, 0, 0, 0, 0, 0], [0] * 9 + [-1]],
)
def test_decode_rejects_bad_tokens(tokens):
    with pytest.raises(ExpressionError):
        decode(tokens, EMBEDDING_GRAMMAR)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("relu(x)", "unknown operator 'relu'"),
        ("tanh(z)", "unknown variable 'z'"),
        ("x(1)", "unknown operator 'x'"),
        ("mul(0.3, x)", "constant 0.3 is not in the grammar"),
        ("tanh(x, x)", "tanh takes 1 argument"),
        ("add(x)", "add takes 2 argument"),
        ("add(x, x, x)", "add takes 2 argument"),
        ("tanh", "needs arguments"),
        ("tanh(x", "expected ')'"),
        ("tanh(x))", "trailing ')'"),
        ("tanh x)", "'tanh' needs arguments"),
        ("(x)", "expected an operand"),
        ("add(x,)", "expected an operand"),
        ("x x", "trailing 'x'"),
        ("tanh(x) + 1", "unexpected character"),
        ("__import__('os')", "unexpected character"),
    ],
)
def test_parse_rejects_invalid_text(text, message):
    with pytest.raises(ExpressionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(text, EMBEDDING_GRAMMAR)


def test_parse_rejects_too_deep_and_too_long_expressions():
    g = Grammar(("x",), max_depth=6, max_nodes=13)
    assert parse("neg(" * 5 + "x" + ")" * 5, g).depth() == 6
    with pytest.raises(ExpressionError, match="deeper than max_depth=6"):
        parse("neg(" * 6 + "x" + ")" * 6, g)
    assert parse("add(add(add(x, x), add(x, x)), add(add(x, x), x))", g).size() == 13
    with pytest.raises(ExpressionError, match="longer than max_nodes=13"):
        parse("add(add(add(x, x), add(x, x)), add(add(x, x), add(x, x)))", g)  # 15 nodes
    with pytest.raises(ExpressionError, match="too long"):
        parse("x" + " " * 10_000, g)
    # Far deeper than Python's recursion limit: still a clean ExpressionError.
    with pytest.raises(ExpressionError, match="deeper"):
        parse("neg(" * 2000 + "x" + ")" * 2000, EMBEDDING_GRAMMAR)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"variables": ()},
        {"variables": ("prev",)},
        {"variables": ("tanh",)},
        {"variables": ("1x",)},
        {"variables": ("x", "x")},
        {"variables": ("x",), "constants": (1.0, 1.0)},
        {"variables": ("x",), "constants": (float("inf"),)},
        {"variables": ("x",), "unary_ops": ("relu",)},
        {"variables": ("x",), "binary_ops": ()},
        {"variables": ("x",), "units": 0},
        {"variables": ("x",), "units": 3, "max_depth": 6},
        {"variables": ("x",), "units": 3, "max_nodes": 28},
    ],
)
def test_grammar_rejects_bad_definitions(kwargs):
    with pytest.raises(ValueError):
        Grammar(**kwargs)
