"""Model bundles: one directory with ``weights.pt`` and ``bundle.json``.

``bundle.json`` says everything needed to rebuild and use the model: the
registered architecture name and its config, the preprocessing, the output
sizes, the class and attribute vocabularies, an optional elementwise embedding
transform (an expression, see :mod:`retrieval_core.embedding_transform`),
training metadata, and the ``model_id``: a digest of the weights and of
everything that changes what the model outputs. Weights load with
``torch.load(weights_only=True)``, so a bundle cannot run code on the machine
that opens it.

``format_version`` is the oldest format that can express the bundle: 1 without
an embedding transform (such a file is exactly what code from before transforms
writes and reads), 2 with one, so code that would ignore the transform, and
silently produce other embeddings, refuses the bundle instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from retrieval_core import io as rio
from retrieval_core.embedding_transform import EmbeddingTransformError, parse_embedding_transform
from retrieval_core.models import create_model
from retrieval_core.preprocess import Preprocessing

BUNDLE_FORMAT = 2
"""Newest format this code reads and writes; it reads every format from 1 on."""
TRANSFORM_FORMAT = 2
"""First format with ``embedding_transform``."""
CONFIG_FILE = "bundle.json"
WEIGHTS_FILE = "weights.pt"


class BundleError(ValueError):
    """A bundle that is missing, malformed, or whose weights do not match its model id."""


@dataclass(frozen=True)
class BundleConfig:
    """The contents of ``bundle.json``.

    ``embedding_transform`` is the canonical text of an expression over ``x`` applied elementwise to the
    L2-normalised embedding before it is normalised again and indexed or searched; "" for none.
    ``format_version`` is derived from the contents (see the module docstring), never passed.

    Raises:
        BundleError: an ``embedding_transform`` that is not a string or fails ``parse_embedding_transform``.
    """

    model_name: str
    model_config: dict
    preprocessing: Preprocessing
    embedding_dim: int
    hash_bits: int
    categories: tuple[str, ...]
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    model_id: str = ""
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    embedding_transform: str = ""
    format_version: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.embedding_transform, str):
            raise BundleError(f"embedding_transform must be a string, got {self.embedding_transform!r}")
        if self.embedding_transform:
            try:
                parse_embedding_transform(self.embedding_transform)
            except EmbeddingTransformError as e:
                raise BundleError(f"bad embedding_transform: {e}") from e
        object.__setattr__(self, "format_version", TRANSFORM_FORMAT if self.embedding_transform else 1)

    def identity(self) -> dict:
        """What, with the weights, determines the model's outputs (training metadata excluded).

        ``embedding_transform`` is included only when set, so a bundle without one keeps the id it always had.
        """
        identity = {
            "model_name": self.model_name,
            "model_config": self.model_config,
            "preprocessing": self.preprocessing.to_dict(),
            "embedding_dim": self.embedding_dim,
            "hash_bits": self.hash_bits,
            "categories": list(self.categories),
            "attributes": {k: list(v) for k, v in self.attributes.items()},
        }
        if self.embedding_transform:
            identity["embedding_transform"] = self.embedding_transform
        return identity

    def to_json(self) -> str:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        if not self.embedding_transform:
            del d["embedding_transform"]  # a format-1 file, as code from before transforms writes it
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> BundleConfig:
        try:
            d = json.loads(text)
            version = d.pop("format_version", None)
            if type(version) is not int or not 1 <= version <= BUNDLE_FORMAT:
                raise BundleError(
                    f"bundle format {version!r} is not one this code reads (1 to {BUNDLE_FORMAT}): "
                    "a newer format needs newer code"
                )
            d["preprocessing"] = Preprocessing.from_dict(d["preprocessing"])
            d["categories"] = tuple(d["categories"])
            d["attributes"] = {k: tuple(v) for k, v in d.get("attributes", {}).items()}
            config = cls(**d)
            if config.format_version != version:
                raise BundleError(
                    f"{CONFIG_FILE} says format {version}, but its contents are format {config.format_version} "
                    f"(embedding_transform needs format {TRANSFORM_FORMAT})"
                )
            return config
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"malformed {CONFIG_FILE}: {e}") from e


def compute_model_id(config: BundleConfig, weights: bytes) -> str:
    """``<model_name>-<first 16 hex of sha256(weights || canonical identity json)>``."""
    h = hashlib.sha256(weights)
    h.update(json.dumps(config.identity(), sort_keys=True).encode())
    return f"{config.model_name}-{h.hexdigest()[:16]}"


def _state_dict_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def save_bundle(out_dir: str, model: nn.Module, config: BundleConfig) -> BundleConfig:
    """Write a bundle directory atomically (a temp dir renamed into place); returns the config with its model_id."""
    weights = _state_dict_bytes(model)
    config = replace(config, model_id=compute_model_id(config, weights))
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".bundle-", dir=parent)
    try:
        os.chmod(tmp, rio.DIR_MODE)  # mkdtemp makes it 0700: unreadable to a worker or server running as another user
        with open(os.path.join(tmp, WEIGHTS_FILE), "wb") as f:
            f.write(weights)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(config.to_json())
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return config


def read_bundle_config(bundle_dir: str) -> BundleConfig:
    """Read ``bundle.json`` only (cheap: no weights), e.g. to size a pipeline's schema."""
    path = rio.join(bundle_dir, CONFIG_FILE)
    if not rio.exists(path):
        raise BundleError(f"no {CONFIG_FILE} in {bundle_dir}: not a model bundle")
    return BundleConfig.from_json(rio.read_bytes(path))


def verify_bundle(bundle_dir: str) -> BundleConfig:
    """Check a bundle without building its model: config parses, weights exist and hash to ``model_id``.

    Cheap enough to run at the start of a pipeline, so a corrupt bundle is a clear error before any work,
    not a crash on every worker.
    """
    config = read_bundle_config(bundle_dir)
    weights_path = rio.join(bundle_dir, WEIGHTS_FILE)
    if not rio.exists(weights_path):
        raise BundleError(f"no {WEIGHTS_FILE} in {bundle_dir}")
    if compute_model_id(config, rio.read_bytes(weights_path)) != config.model_id:
        raise BundleError(f"{bundle_dir}: weights do not match model_id {config.model_id} (corrupt or edited bundle)")
    return config


def load_bundle(bundle_dir: str, device: str = "cpu") -> tuple[BundleConfig, nn.Module]:
    """Load a bundle's config and model (eval mode, on ``device``), checking the weights against the model id.

    Raises:
        BundleError: missing or malformed files, or weights that do not hash to the stored ``model_id``.
    """
    config = verify_bundle(bundle_dir)
    weights = rio.read_bytes(rio.join(bundle_dir, WEIGHTS_FILE))
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        model = create_model(config.model_name, **config.model_config)
        model.load_state_dict(state)
    except (pickle.UnpicklingError, RuntimeError, KeyError, TypeError, EOFError, ValueError) as e:
        raise BundleError(f"{bundle_dir}: cannot load weights: {e}") from e
    return config, model.to(device).eval()
