"""The ``circuitexplain`` command line.

Subcommands come from the entry-point group ``circuitexplain.commands``: every package registers its own
(``zoo``, ``tasks``, ``discover``, ``export``, ``bench``, ``eval`` ...) with a ``register(subparsers)``
function, so no upstream package imports a downstream one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitexplain",
        description="Circuit discovery, circuit evaluation and explanation for TransformerLens bridges.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="circuitexplain.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except (ImportError, AttributeError) as e:  # a broken plug-in must not take the whole CLI down
            broken = sub.add_parser(ep.name, help=f"(unavailable: {e})")
            broken.set_defaults(func=_unavailable(ep.name, e))
            continue
        register(sub)
    return parser


def _unavailable(name: str, error: Exception):
    def run(args: argparse.Namespace) -> int:
        raise ValueError(f"command {name!r} could not be loaded: {error}")

    return run


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        # a command group given without its subcommand prints that group's help
        (getattr(args, "_group_parser", None) or parser).print_help()
        return 2
    try:
        return int(func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"circuitexplain: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitexplain: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
