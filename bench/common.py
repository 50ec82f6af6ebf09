"""What every benchmark records beside its numbers: the machine, the commit, and where the rows go."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

from retrieval_core.io import atomic_local_file

RESULTS_DIR = os.path.join("bench", "results")


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.split("\n", 1)[0].strip() or None


def machine() -> str:
    """CPU count, architecture, GPUs and Python version, in one line.

    With a GPU: torch's device name and count, its CUDA version, the NVIDIA driver, and how many GPUs faiss sees
    (torch 2.14.1 is built for CUDA 13 and faiss-gpu 1.15.1 for CUDA 12, so a driver can serve one and not the
    other).
    """
    parts = []
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(
                f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})"
            )
    except ImportError:
        pass
    try:
        import faiss

        faiss_gpus = faiss.get_num_gpus()
    except (ImportError, AttributeError):
        faiss_gpus = 0
    if faiss_gpus or parts:
        parts = parts or ["torch sees no GPU"]
        parts.append(f"faiss sees {faiss_gpus} GPU(s)")
        driver = _nvidia_driver()
        if driver:
            parts.append(f"driver {driver}")
    gpu = ", ".join(parts) if parts else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()}, {gpu}, Python {platform.python_version()}"


def commit() -> str:
    """Short hash of HEAD, with ``+dirty`` when the code in the working tree differs from it.

    Results and docs (``bench/results/``, ``docs/``) do not count: benchmarks run one after another write them.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!docs"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty.stdout.strip() else "") if head else "unknown"


def timed(fn, repeats: int = 3):
    """(best wall seconds of ``repeats`` calls of ``fn``, the last result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def pipeline_argv(catalog: str, output: str, bundle: str, run_id: str, *extra: str) -> list[str]:
    """Flags of an indexing run on the local runner (what ``make index`` uses), plus ``extra``."""
    from pipelines.run_default import LOCAL_RUNNER

    return [
        f"--catalog={catalog}",
        f"--output={output}",
        f"--bundle={bundle}",
        f"--runner={LOCAL_RUNNER}",
        f"--run_id={run_id}",
        *extra,
    ]


def write_rows(name: str, rows: list[dict], out: str | None = None) -> str:
    """Write ``rows`` (the CONVENTIONS.md row shape) to ``bench/results/<name>.json``; returns the path."""
    path = out or os.path.join(RESULTS_DIR, f"{name}.json")
    with atomic_local_file(path) as f:  # a run killed mid-write leaves the previous rows, never half a file
        f.write((json.dumps(rows, indent=2) + "\n").encode())
    return path
