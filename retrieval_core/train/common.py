"""What every training job shares: flags from its config dataclass, atomic checkpoints, image augmentation."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, fields

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
        json.dump(asdict(config), f, indent=2)
    return work


def resume_mismatch(saved: dict, config, ignore: tuple[str, ...] = ("out", "resume", "threads", "cache_dir")) -> str:
    """What differs between a checkpoint's config and this run's ("" when nothing that matters does).

    Resuming with other epochs, data or losses would silently mix two runs (or fail deep in the scheduler).
    """
    current = json.loads(json.dumps(asdict(config)))  # tuples as lists, like the saved copy
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
