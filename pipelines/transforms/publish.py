"""Publish: once every table and shard is written, write the manifest (last) and swap ``CURRENT``.

It runs as one element whose side inputs are the written files, so the runner
cannot start it before they are complete.
"""

from __future__ import annotations

import apache_beam as beam

from retrieval_core.index.publish import build_manifest, publish


class Publish(beam.PTransform):
    """Side inputs in, one published manifest path out."""

    def __init__(self, **manifest_fields) -> None:
        super().__init__()
        self.fields = manifest_fields

    def expand(self, inputs):
        shards, spec, feature_files, dead_letter_files, dead_count = inputs
        fields = self.fields

        def _publish(_, shard_results, spec, feature_files, dead_letter_files, dead_count):
            manifest = build_manifest(
                spec=spec,
                shard_results=shard_results,
                feature_files=feature_files,
                dead_letter_files=dead_letter_files,
                counts={"dead_letter": dead_count},
                **fields,
            )
            return publish(fields["output_root"], manifest)

        return (
            shards.pipeline
            | "Once" >> beam.Create([None])
            | "WriteManifestThenCurrent"
            >> beam.Map(
                _publish,
                shard_results=beam.pvalue.AsList(shards),
                spec=beam.pvalue.AsSingleton(spec),
                feature_files=beam.pvalue.AsList(feature_files),
                dead_letter_files=beam.pvalue.AsList(dead_letter_files),
                dead_count=beam.pvalue.AsSingleton(dead_count),
            )
        )
