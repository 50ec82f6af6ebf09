"""Dead-letter rows: a bad record is data (stage, error type, message), never a crash that loses other rows."""

from __future__ import annotations

import datetime as dt
import json

import apache_beam as beam

from schemas import DEAD_LETTER_STAGES

DEAD_LETTER_TAG = "dead_letter"


def dead_letter_row(
    stage: str,
    error_type: str,
    message: str,
    *,
    run_id: str,
    item_id: str | None = None,
    image_uri: str | None = None,
    row: dict | None = None,
) -> dict:
    """One row of the dead-letter table (``schemas.DEAD_LETTER_SCHEMA``)."""
    if stage not in DEAD_LETTER_STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    return {
        "item_id": item_id,
        "image_uri": image_uri,
        "stage": stage,
        "error_type": error_type,
        "error_message": message[:2000],
        "row_json": json.dumps(row, default=str, ensure_ascii=False)[:10000] if row is not None else None,
        "run_id": run_id,
        "at": dt.datetime.now(dt.UTC),
    }


def tagged_dead_letter(*args, **kwargs) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, dead_letter_row(*args, **kwargs))
