"""Publish: once every table and shard is written, write the manifest (last) and swap ``CURRENT``.

It runs as one element whose side inputs are the written files, so the runner
cannot start it before they are complete.
"""

from __future__ import annotations

import datetime as dt
import os

import apache_beam as beam

from retrieval_core import io as rio
from retrieval_core.index.build import IndexSpec
from retrieval_core.index.publish import publish
from schemas import FileEntry, Manifest


def relative_to(root: str, path: str) -> str:
    """``path`` relative to the output root, with ``/`` separators."""
    if rio.is_local(root):
        return os.path.relpath(rio.local_path(path), os.path.abspath(rio.local_path(root))).replace(os.sep, "/")
    prefix = root.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise ValueError(f"{path} is not under {root}")
    return path[len(prefix):]


def file_entry(root: str, path: str, rows: int = 0) -> FileEntry:
    digest, size = rio.sha256_file(path)
    return FileEntry(path=relative_to(root, path), sha256=digest, bytes=size, rows=rows)


def build_manifest(*, output_root: str, generation: str, run_id: str, model_id: str, model_name: str, dim: int,
                   hash_bits: int, spec: IndexSpec, shard_results: list[dict], feature_files: list[str],
                   dead_letter_files: list[str], counts: dict[str, int]) -> Manifest:
    """Assemble the manifest: shards in shard order with running offsets; table files hashed here."""
    vec, ham, ids, offset = [], [], [], 0
    for result in sorted(shard_results, key=lambda r: r["shard"]):
        for kind, out in (("vectors", vec), ("hamming", ham), ("ids", ids)):
            out.append(FileEntry(offset=offset, **result[kind]))
        offset += result["vectors"]["rows"]
    return Manifest(
        generation=generation,
        run_id=run_id,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        model_id=model_id,
        model_name=model_name,
        embedding_dim=dim,
        hash_bits=hash_bits,
        metric=spec.metric,
        vector_factory=spec.vector_factory,
        binary_factory=spec.binary_factory,
        nprobe=spec.nprobe,
        vector_shards=tuple(vec),
        hamming_shards=tuple(ham),
        id_files=tuple(ids),
        feature_files=tuple(file_entry(output_root, p) for p in sorted(feature_files)),
        dead_letter_files=tuple(file_entry(output_root, p) for p in sorted(dead_letter_files)),
        counts={**counts, "indexed": offset},
    )


class Publish(beam.PTransform):
    """Side inputs in, one published manifest path out."""

    def __init__(self, **manifest_fields) -> None:
        super().__init__()
        self.fields = manifest_fields

    def expand(self, inputs):
        shards, spec, feature_files, dead_letter_files, dead_count = inputs
        fields = self.fields

        def _publish(_, shard_results, spec, feature_files, dead_letter_files, dead_count):
            manifest = build_manifest(spec=spec, shard_results=shard_results, feature_files=feature_files,
                                      dead_letter_files=dead_letter_files, counts={"dead_letter": dead_count},
                                      **fields)
            return publish(fields["output_root"], manifest)

        return (
            shards.pipeline
            | "Once" >> beam.Create([None])
            | "WriteManifestThenCurrent" >> beam.Map(
                _publish,
                shard_results=beam.pvalue.AsList(shards),
                spec=beam.pvalue.AsSingleton(spec),
                feature_files=beam.pvalue.AsList(feature_files),
                dead_letter_files=beam.pvalue.AsList(dead_letter_files),
                dead_count=beam.pvalue.AsSingleton(dead_count),
            )
        )
