"""``circuitexplain export``: convert a saved circuit graph to another format.

Registered through the entry point ``export = "graphs.cli:register"`` in the group
``circuitexplain.commands``.
"""

from __future__ import annotations

import argparse
import sys

from graphs.circuit import load, node_ids
from graphs.export import EXPORTERS, export, format_for
from graphs.ops import prune

EPILOG = """formats:
  graphml      GraphML (yEd, Gephi, Cytoscape desktop, igraph)
  gexf         GEXF 1.2 with layer layout (Gephi)
  nodelink     networkx node-link JSON (this package's own format)
  cytoscape    Cytoscape.js JSON with positions (.cyjs)
  dot          Graphviz DOT (render with: dot -Tsvg FILE.dot > FILE.svg)
  neuronpedia  Neuronpedia attribution-graph JSON
  html         self-contained interactive viewer (opens offline in any browser)

examples:
  circuitexplain export out/ioi.json --out out/ioi.html
  circuitexplain export out/ioi.json --format neuronpedia --out out/ioi.np.json --in-circuit-only
  circuitexplain export out/ioi.json --out out/top50.dot --topk 50
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser(
        "export",
        help="convert a circuit graph (JSON from `discover`) to GraphML, GEXF, DOT, Cytoscape, Neuronpedia or HTML",
        description="Convert a saved circuit graph (networkx node-link JSON, as written by `circuitexplain "
                    "discover`) to another format. The format defaults to the one implied by --out's suffix "
                    "(.graphml .gexf .json .cyjs .dot .gv .html .np.json).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("graph", metavar="GRAPH.json", help="circuit graph file (node-link JSON)")
    p.add_argument("--format", "-f", choices=sorted(EXPORTERS), default=None,
                   help="output format (default: from the --out suffix)")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="file to write")
    p.add_argument("--in-circuit-only", action="store_true",
                   help="export only the circuit: the in-circuit edges on a path from the embeddings to the "
                        "logits (graphs.ops.prune) instead of every scored edge")
    p.add_argument("--topk", type=int, default=None, metavar="K",
                   help="keep only the K edge inputs (or nodes, for node-level graphs) of largest |score|, "
                        "then drop parts not connected to the logits")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="keep only edge inputs (or nodes) with |score| >= T, then drop unconnected parts")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Load, optionally prune, export; print what was written. Errors raise one-line ValueErrors."""
    fmt = args.format or format_for(args.out)
    if args.topk is not None and args.topk < 0:
        raise ValueError(f"--topk must be >= 0, got {args.topk}")
    if args.threshold is not None and args.threshold < 0:
        raise ValueError(f"--threshold must be >= 0, got {args.threshold}")
    G = load(args.graph)
    if args.in_circuit_only or args.topk is not None or args.threshold is not None:
        G = prune(G, threshold=args.threshold, topk=args.topk, keep_connected=True)
    try:
        path = export(G, args.out, format=fmt)
    except OSError as e:
        raise ValueError(f"cannot write {args.out}: {e.strerror or e}") from None
    print(f"wrote {path} ({fmt}: {G.number_of_nodes()} nodes, {G.number_of_edges()} edges, "
          f"{len(node_ids(G))} nodes in circuit)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``export`` on its own (``python -m graphs.cli GRAPH.json --out FILE``), same errors as the CLI."""
    parser = argparse.ArgumentParser(prog="circuitexplain")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"circuitexplain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
