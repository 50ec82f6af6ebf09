"""WriteFeatures / WriteDeadLetter: rows -> sharded Parquet under ``<output>/<table>/run=<run_id>/``.

Both return the PCollection of written file paths, which ``Publish`` takes as a
side input: that is what orders publishing after the tables are complete.
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

from retrieval_core import io as rio


def table_prefix(output_root: str, table: str, run_id: str) -> str:
    return rio.join(output_root, table, f"run={run_id}", "part")


class WriteTable(beam.PTransform):
    """Write dict rows to Parquet with a schema from ``schemas/`` (its metadata carries the schema version)."""

    def __init__(self, output_root: str, table: str, run_id: str, schema: pa.Schema, num_shards: int = 0) -> None:
        super().__init__()
        self.prefix = table_prefix(output_root, table, run_id)
        self.schema, self.num_shards = schema, num_shards

    def expand(self, rows):
        return rows | "WriteParquet" >> beam.io.WriteToParquet(
            self.prefix,
            self.schema,
            num_shards=self.num_shards,
            shard_name_template="-SSSSS-of-NNNNN",
            file_name_suffix=".parquet",
            codec="zstd",
        )
