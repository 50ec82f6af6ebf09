"""Apache Beam pipelines: ``index_catalog`` and the named PTransforms it is built from."""
