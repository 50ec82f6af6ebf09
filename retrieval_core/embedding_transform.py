"""A bundle's elementwise embedding transform: validated from its text, applied the same way by serving and search.

A bundle may carry ``embedding_transform``, an expression over ``x`` in
:data:`~retrieval_core.rl.expressions.EMBEDDING_GRAMMAR` (e.g. ``mul(tanh(x), x)``), found by the RL search of
:mod:`retrieval_core.rl`. It is stored as its canonical text and read back with the expression parser, never as
pickled code and never through ``eval``. The features of an image are then
``normalise(f(normalise(raw)))``: f applied elementwise, in float32, to the L2-normalised embedding, and the
result L2-normalised again because the index searches by inner product; without a transform they are
``normalise(raw)``. :func:`serve_embeddings` is that computation, with or without a transform: the encoder
(pipeline and searcher) calls it, and so does every evaluation and reward that scores features, so that what is
scored is what is served.

Normalising divides each row by its largest magnitude before taking the norm (:func:`l2_normalise`): a strong
power such as ``x^24`` maps a unit embedding to values near 1e-15 whose norm is below any fixed epsilon, and
dividing by ``max(norm, eps)`` would serve vectors of norm << 1. Every non-zero row comes out with norm 1.
"""

from __future__ import annotations

import numpy as np

from retrieval_core.rl.expressions import EMBEDDING_GRAMMAR, Expr, ExpressionError, parse, safe_evaluate

PROBE = np.linspace(-1.0, 1.0, 2001, dtype=np.float32)
"""Where a transform is checked when a bundle is read: every coordinate of a unit vector lies in [-1, 1]."""


class EmbeddingTransformError(ValueError):
    """An embedding transform that is not a usable function of ``x``, or rows it maps to non-finite or zero vectors."""


def parse_embedding_transform(text: str) -> Expr:
    """Parse and check a bundle's ``embedding_transform``.

    Args:
        text: the expression's canonical text (``str(expr)``), e.g. ``mul(tanh(x), x)``.

    Returns:
        The expression tree.

    Raises:
        EmbeddingTransformError: the text does not parse under ``EMBEDDING_GRAMMAR``, is not canonical (two
            spellings of one function would give one model two ids), does not use ``x``, is not finite on
            [-1, 1] (float32), the range of an L2-normalised embedding's coordinates, or is constant there (zero
            spread on :data:`PROBE` without the point 0): a constant f gives every image the same vector (or the
            zero vector), whatever it uses ``x`` for, e.g. ``sign(exp(x))``. The point 0 is left out of the
            spread because a coordinate of a real embedding is practically never exactly 0, so ``abs(sign(x))``,
            1 everywhere but there, is as useless as a constant.
    """
    try:
        expr = parse(text, EMBEDDING_GRAMMAR)
    except ExpressionError as e:
        raise EmbeddingTransformError(f"embedding transform {text!r} does not parse: {e}") from e
    if str(expr) != text:
        raise EmbeddingTransformError(f"embedding transform {text!r} is not canonical: write it as {str(expr)!r}")
    if "x" not in expr.variables():
        raise EmbeddingTransformError(
            f"embedding transform {text!r} does not use x: every image would get the same embedding"
        )
    try:
        values = expr.evaluate({"x": PROBE})
    except ExpressionError as e:
        raise EmbeddingTransformError(f"embedding transform {text!r} is not finite on [-1, 1]: {e}") from e
    spread = np.ptp(values[PROBE != 0])
    if spread == 0:
        raise EmbeddingTransformError(
            f"embedding transform {text!r} is constant on [-1, 1] (apart from x = 0): every image would get the "
            "same embedding"
        )
    return expr


def l2_normalise(embeddings: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero), as ``dtype``.

    Each row is first divided by its largest magnitude, in float64, so that its norm lies in [1, sqrt(D)]:
    neither tiny values (an underflowing norm) nor huge ones (an overflowing one) can leave a row that is not
    unit. Every row with a non-zero value comes out with norm 1 (to ``dtype``'s precision).
    """
    rows = np.asarray(embeddings, dtype=np.float64)
    peak = np.max(np.abs(rows), axis=-1, keepdims=True, initial=0.0)
    scaled = np.divide(rows, peak, out=np.zeros_like(rows), where=peak > 0)
    norms = np.linalg.norm(scaled, axis=-1, keepdims=True)
    return np.divide(scaled, norms, out=np.zeros_like(scaled), where=norms > 0).astype(dtype)


def apply_embedding_transform(embeddings: np.ndarray, expression: Expr | str) -> np.ndarray:
    """``normalise(f(normalise(embeddings)))`` for an (N, D) batch: the features a transformed bundle serves.

    Args:
        embeddings: (N, D) raw or already L2-normalised embeddings (they are normalised first either way).
        expression: the transform f, a tree (used as is) or text (checked by :func:`parse_embedding_transform`).

    Returns:
        (N, D) float32, each row of norm 1, or 0 where the input row is zero.

    Raises:
        EmbeddingTransformError: a bad expression text; f is NaN or infinite on some row; or f maps a non-zero
            row to the zero vector, which has no direction and so no cosine to anything. The message names the
            rows. A reward function can score such a transform 0.
    """
    expr = parse_embedding_transform(expression) if isinstance(expression, str) else expression
    x = l2_normalise(embeddings)
    if x.ndim != 2:
        raise ValueError(f"expected (N, D) embeddings, got shape {x.shape}")
    try:
        y = expr.evaluate({"x": x})
    except ExpressionError as e:
        bad = [i for i in range(len(x)) if safe_evaluate(expr, {"x": x[i]}) is None]
        raise EmbeddingTransformError(
            f"embedding transform {expr} is not finite on rows {bad[:10]} of {len(x)}: {e}"
        ) from e
    erased = np.flatnonzero(~np.any(y, axis=1) & np.any(x, axis=1))
    if erased.size:
        raise EmbeddingTransformError(
            f"embedding transform {expr} maps rows {erased[:10].tolist()} of {len(x)} to the zero vector"
        )
    return l2_normalise(y)


def serve_embeddings(raw: np.ndarray, transform: Expr | str | None = None) -> np.ndarray:
    """The features a bundle serves for (N, D) model embeddings: ``normalise(raw)``, or, with a transform,
    ``normalise(f(normalise(raw)))`` (:func:`apply_embedding_transform`).

    The one place this is computed: the encoder (what the pipeline indexes and the searcher queries with), the
    training job's evaluation and the transform search's reward all call it.

    Args:
        raw: (N, D) embeddings as the model outputs them.
        transform: the bundle's transform (a tree, or text checked by :func:`parse_embedding_transform`);
            None or "": no transform.

    Returns:
        (N, D) float32, each non-zero row of norm 1.

    Raises:
        EmbeddingTransformError: see :func:`apply_embedding_transform`.
    """
    if transform is None or transform == "":
        x = l2_normalise(raw)
        if x.ndim != 2:
            raise ValueError(f"expected (N, D) embeddings, got shape {x.shape}")
        return x
    return apply_embedding_transform(raw, transform)
