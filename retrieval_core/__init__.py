"""Models, losses, training jobs, evaluation, model bundles, index building and search."""
