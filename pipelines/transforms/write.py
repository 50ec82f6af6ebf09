"""WriteFeatures / WriteDeadLetter: rows -> sharded Parquet under ``<output>/<table>/run=<run_id>/``.

Both return the PCollection of written file paths, which ``Publish`` takes as a
side input: that is what orders publishing after the tables are complete.
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
from apache_beam.coders import Coder, registry
from apache_beam.transforms.window import GlobalWindows

from retrieval_core import io as rio

ROW_GROUP_BYTES = 64 * 1024 * 1024  # what WriteToParquet buffers into one row group from dict rows


def table_prefix(output_root: str, table: str, run_id: str) -> str:
    return rio.join(output_root, table, f"run={run_id}", "part")


class ArrowTableCoder(Coder):
    """``pa.Table`` <-> Arrow IPC stream bytes, with a size estimate that encodes nothing.

    Runners sample elements to estimate each PCollection's size; with the default (pickle) coder that pickles a
    whole table, about 0.2 s for a 20 MB one, to throw the bytes away.
    """

    def encode(self, value: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, value.schema) as writer:
            writer.write_table(value)
        return sink.getvalue().to_pybytes()

    def decode(self, encoded: bytes) -> pa.Table:
        return pa.ipc.open_stream(encoded).read_all()

    def estimate_size(self, value: pa.Table) -> int:
        return value.nbytes

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return pa.Table


registry.register_coder(pa.Table, ArrowTableCoder)


class _CoalesceFn(beam.DoFn):
    """Record batches -> tables of about ``row_group_bytes`` each (one Parquet row group apiece), as WriteToParquet
    buffers dict rows: small batches written one by one would give row groups of a few dozen rows.

    Bounded input in the global window (a batch job): what is left at the end of a bundle goes out there.
    """

    def __init__(self, schema: pa.Schema, row_group_bytes: int) -> None:
        self.schema, self.row_group_bytes = schema, row_group_bytes
        self.batches: list[pa.RecordBatch] = []
        self.nbytes = 0

    def start_bundle(self) -> None:
        self.batches, self.nbytes = [], 0

    def process(self, batch: pa.RecordBatch):
        self.batches.append(batch)
        self.nbytes += batch.nbytes
        if self.nbytes >= self.row_group_bytes:
            yield self._table()

    def finish_bundle(self):
        if self.batches:
            yield GlobalWindows.windowed_value_at_end_of_window(self._table())

    def _table(self) -> pa.Table:
        table = pa.Table.from_batches(self.batches, self.schema)
        self.batches, self.nbytes = [], 0
        return table


class WriteTable(beam.PTransform):
    """Write rows to Parquet with a schema from ``schemas/`` (its metadata carries the schema version).

    The rows are dicts, or with ``batched=True`` Arrow record batches of the schema (the feature table: built
    column-wise by ``Embed``, so no per-row Python object exists on the way).
    """

    def __init__(
        self,
        output_root: str,
        table: str,
        run_id: str,
        schema: pa.Schema,
        num_shards: int = 0,
        batched: bool = False,
        row_group_bytes: int = ROW_GROUP_BYTES,
    ) -> None:
        super().__init__()
        self.prefix = table_prefix(output_root, table, run_id)
        self.schema, self.num_shards, self.batched, self.row_group_bytes = schema, num_shards, batched, row_group_bytes

    def expand(self, rows):
        files = dict(
            num_shards=self.num_shards, shard_name_template="-SSSSS-of-NNNNN", file_name_suffix=".parquet", codec="zstd"
        )
        if not self.batched:
            return rows | "WriteParquet" >> beam.io.WriteToParquet(
                self.prefix, self.schema, row_group_buffer_size=self.row_group_bytes, **files
            )
        coalesce = beam.ParDo(_CoalesceFn(self.schema, self.row_group_bytes)).with_output_types(pa.Table)
        tables = rows | "Coalesce" >> coalesce
        return tables | "WriteParquet" >> beam.io.WriteToParquetBatched(self.prefix, self.schema, **files)
