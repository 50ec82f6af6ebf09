"""``retrieval-train <method> [flags]``: one entry point for every training job."""

from __future__ import annotations

import importlib
import sys

JOBS = {
    "baseline": "retrieval_core.train.baseline",
    "hashing": "retrieval_core.train.hashing",
    "gsn": "retrieval_core.train.gsn",
    "svm-kernel": "retrieval_core.train.svm_kernel",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in JOBS:
        print(f"usage: retrieval-train {{{','.join(JOBS)}}} [flags]   (retrieval-train <method> --help for flags)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(JOBS[argv[0]]).cli(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
