#!/usr/bin/env python
"""Benchmark the patching engine: the same as ``circuitexplain bench patching`` (see patching/bench.py).

Usage: python scripts/bench_patching.py --model ioi-2l --out bench-ioi.json [--threads 2] [--n 32]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from evals.cli_bench import register

    parser = argparse.ArgumentParser(prog="bench_patching.py")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "patching", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"bench_patching: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
