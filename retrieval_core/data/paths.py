"""Where the real (downloaded, not generated) datasets live.

``$RETRIEVAL_DATA_DIR`` wins; otherwise the shared folder next to the checkout,
``<repo root>/../shared/datasets``, which is where the project keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path

_ENV_VAR = "RETRIEVAL_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the retrieval_core package


def data_root() -> Path:
    """The folder of real datasets: ``$RETRIEVAL_DATA_DIR`` if set, else ``<repo root>/../shared/datasets``."""
    env = os.environ.get(_ENV_VAR)
    if env:
        return Path(env)
    return _REPO_ROOT.parent / "shared" / "datasets"


def dataset_dir(name: str) -> Path:
    """The folder of one dataset, e.g. ``dataset_dir("clothing-small")``; it may not exist."""
    return data_root() / name
