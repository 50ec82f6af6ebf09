"""Publish: once every table and shard is written, write the manifest (last) and swap ``CURRENT``.

It runs as one element whose side inputs are the written files, so the runner
cannot start it before they are complete.
"""

from __future__ import annotations

import apache_beam as beam

from retrieval_core.index.publish import build_manifest, publish


def error_rate(indexed: int, failed: int) -> float:
    """Fraction of catalog rows that ended as dead letters."""
    return failed / (indexed + failed) if indexed + failed else 0.0


class Publish(beam.PTransform):
    """Side inputs in, one manifest path out. ``CURRENT`` is swapped only if the error rate is acceptable.

    Args:
        max_error_rate: above this fraction of dead-letter rows the generation is written but not published.
        current_generation: GCS generation of ``CURRENT`` at the start of the run (see ``publish``).
        manifest_fields: the remaining keyword arguments of ``build_manifest``.
    """

    def __init__(self, max_error_rate: float = 1.0, current_generation: int | None = None, **manifest_fields) -> None:
        super().__init__()
        self.max_error_rate = max_error_rate
        self.current_generation = current_generation
        self.fields = manifest_fields

    def expand(self, inputs):
        shards, spec, feature_files, dead_letter_files = inputs
        fields, max_error_rate, current_generation = self.fields, self.max_error_rate, self.current_generation

        def _publish(_, shard_results, spec, feature_files, dead_letter_files):
            manifest = build_manifest(
                spec=spec,
                shard_results=shard_results,
                feature_files=feature_files,
                dead_letter_files=dead_letter_files,
                **fields,
            )
            acceptable = error_rate(manifest.ntotal, manifest.counts["dead_letter"]) <= max_error_rate
            return publish(
                fields["output_root"], manifest, swap_current=acceptable, current_generation=current_generation
            )

        return (
            shards.pipeline
            | "Once" >> beam.Create([None], reshuffle=False)
            | "WriteManifestThenCurrent"
            >> beam.Map(
                _publish,
                shard_results=beam.pvalue.AsList(shards),
                spec=beam.pvalue.AsSingleton(spec),
                feature_files=beam.pvalue.AsList(feature_files),
                dead_letter_files=beam.pvalue.AsList(dead_letter_files),
            )
        )
