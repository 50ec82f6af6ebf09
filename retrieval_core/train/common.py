"""What every training job shares: flags from its config dataclass, atomic checkpoints, image augmentation."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F


def config_args_parser(config_cls: type, description: str) -> argparse.ArgumentParser:
    """One ``--<field>`` flag per field of a config dataclass, defaulting to the field's default.

    Booleans become ``--<field>`` / ``--no-<field>`` pairs (so a field that defaults to True can be turned off,
    and the default is the dataclass's), tuples ``nargs="+"`` lists of their first element's type.
    """
    p = argparse.ArgumentParser(description=description)
    defaults = asdict(config_cls())
    for f in fields(config_cls):
        default = defaults[f.name]
        if isinstance(default, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            p.add_argument(f"--{f.name}", type=type(default[0]), nargs="+", default=list(default))
        else:
            p.add_argument(f"--{f.name}", type=type(default), default=default)
    return p


def config_from_args(config_cls: type, args: argparse.Namespace):
    """The config dataclass from parsed flags (lists back to tuples)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    return config_cls(**values)


def work_dir(out: str, config) -> str:
    """``<out>.work/``, beside the bundle: the checkpoint and the dumped config of the run writing ``out``."""
    work = out.rstrip("/") + ".work"
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "train_config.json"), "w") as f:
        json.dump(saved_config(config), f, indent=2)
    return work


RESUME_IGNORES = ("out", "resume", "threads", "cache_dir")  # settings that do not change what is trained
PATH_SETTINGS = ("data", "data_dir", "train_catalog", "eval_catalog")  # compared as absolute paths


def _absolute_paths(values: dict) -> dict:
    """``values`` with every non-empty ``PATH_SETTINGS`` entry made absolute ("" keeps its meaning: the default)."""
    return {k: os.path.abspath(v) if k in PATH_SETTINGS and isinstance(v, str) and v else v for k, v in values.items()}


def saved_config(config) -> dict:
    """The config as checkpoints and ``train_config.json`` record it: JSON values, paths absolute, so a resumed
    run from another working directory compares the folders it means, not how they were spelled."""
    return _absolute_paths(json.loads(json.dumps(asdict(config))))  # tuples as lists


def resume_mismatch(saved: dict, config, ignore: tuple[str, ...] = RESUME_IGNORES) -> str:
    """What differs between a checkpoint's config and this run's ("" when nothing that matters does).

    Resuming with other epochs, data or losses would silently mix two runs (or fail deep in the scheduler).
    Paths compare as absolute paths (``data`` and ``./data`` are the same folder); a relative one in an older
    checkpoint is taken from the current directory.
    """
    saved, current = _absolute_paths(saved), saved_config(config)
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k))


def save_checkpoint(path: str, state: dict) -> None:
    """Write a checkpoint atomically: an interrupted save never leaves a torn file behind."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict | None:
    """The checkpoint at ``path`` (tensors and plain values only), or None when there is none."""
    if not os.path.exists(path):
        return None
    return torch.load(path, weights_only=True)


@dataclass
class RunProgress:
    """Where a resumable training run stands: its checkpoint, the next epoch, the history and time so far."""

    ckpt_path: str
    start_epoch: int = 0
    history: list = field(default_factory=list)
    train_s: float = 0.0

    def save(self, trainer, config, epoch: int) -> None:
        """Checkpoint ``trainer`` (its ``state_dict()``) after ``epoch`` (0-based) with the history and time."""
        save_checkpoint(
            self.ckpt_path,
            {
                **trainer.state_dict(),
                "epoch": epoch + 1,
                "history": json.dumps(self.history),
                "train_s": self.train_s,
                "config": json.dumps(saved_config(config)),
            },
        )


def resume_or_start(config, trainer, ignore: tuple[str, ...] = RESUME_IGNORES) -> RunProgress:
    """Load ``<out>.work/checkpoint.pt`` into ``trainer`` when ``config.resume`` and it exists, else start fresh.

    Writes the config beside the checkpoint either way.

    Raises:
        ValueError: the checkpoint was written by a configuration that differs in a field not in ``ignore``.
    """
    progress = RunProgress(os.path.join(config.out.rstrip("/") + ".work", "checkpoint.pt"))
    ckpt = load_checkpoint(progress.ckpt_path) if config.resume else None
    if ckpt is not None:
        mismatch = resume_mismatch(json.loads(ckpt["config"]), config, ignore)
        if mismatch:
            raise ValueError(f"--resume: {progress.ckpt_path} was written by another configuration ({mismatch})")
        trainer.load_state_dict(ckpt)
        progress.start_epoch = int(ckpt["epoch"])
        progress.history = json.loads(ckpt["history"])
        progress.train_s = float(ckpt["train_s"])
        print(f"resumed from {progress.ckpt_path} at epoch {progress.start_epoch}")
    work_dir(config.out, config)  # the config beside the checkpoint
    return progress


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    max_angle: float = 0.3,
    scale: tuple[float, float] = (0.8, 1.2),
    max_shift: float = 0.15,
    brightness: tuple[float, float] = (0.7, 1.3),
    max_offset: float = 0.4,
    flip: bool = True,
) -> torch.Tensor:
    """Random flip, rotation, scale, shift and brightness/contrast of a normalised (N, C, H, W) batch.

    Args:
        x: the batch.
        gen: the random stream (seeded by the caller, so a resumed run replays the same batches).
        max_angle: rotation in radians, uniform in [-max_angle, max_angle].
        scale: zoom range.
        max_shift: translation as a fraction of the half-width.
        brightness: multiplicative contrast range.
        max_offset: additive brightness range, in normalised units.
        flip: horizontal flips with probability one half.
    """
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    angle, zoom = u(-max_angle, max_angle), u(*scale)
    mirror = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos * mirror, -sin, u(-max_shift, max_shift)], 1),
            torch.stack([sin * mirror, cos, u(-max_shift, max_shift)], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return x * u(*brightness)[:, None, None, None] + u(-max_offset, max_offset)[:, None, None, None]
