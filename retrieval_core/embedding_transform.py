"""A bundle's elementwise embedding transform: validated from its text, applied the same way by serving and search.

A bundle may carry ``embedding_transform``, an expression over ``x`` in
:data:`~retrieval_core.rl.expressions.EMBEDDING_GRAMMAR` (e.g. ``mul(tanh(x), x)``), found by the RL search of
:mod:`retrieval_core.rl`. It is stored as its canonical text and read back with the expression parser, never as
pickled code and never through ``eval``. The features of an image are then
``normalise(f(normalise(raw)))``: f applied elementwise, in float32, to the L2-normalised embedding, and the
result L2-normalised again because the index searches by inner product. :func:`apply_embedding_transform` is that
computation; the encoder (pipeline and searcher) calls it, and so should any reward or evaluation that scores a
transform, so that what is scored is what is served.
"""

from __future__ import annotations

import numpy as np

from retrieval_core.rl.expressions import EMBEDDING_GRAMMAR, Expr, ExpressionError, parse, safe_evaluate

NORM_EPS = 1e-12
"""Smallest norm divided by, as in ``torch.nn.functional.normalize``: a zero row stays zero."""

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
            spellings of one function would give one model two ids), does not use ``x``, or is not finite or is
            zero everywhere on [-1, 1] (float32), the range of an L2-normalised embedding's coordinates.
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
    if not np.any(values):
        raise EmbeddingTransformError(f"embedding transform {text!r} is zero on all of [-1, 1]")
    return expr


def l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, as float32 (a zero row stays zero).

    The norm is taken in float64, so a row of values near float32's largest cannot overflow it.
    """
    rows = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return (rows / np.maximum(norms, NORM_EPS)).astype(np.float32)


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
