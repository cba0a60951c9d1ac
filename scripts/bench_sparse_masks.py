"""Exact edge masks on sparse circuits: the complement form and runs relative to a base circuit.

For EAP's top-k connected circuits of each size, CPU seconds per mask of ``EdgePatcher.run`` on

* the circuit itself (3 copies) and the circuit minus one edge each (greedy's step), with the complement
  form on and off (``complement=True / False``), and
* 24 single-edge removals, plain against ``with patcher.based_on(circuit)`` (the base run included),

with the largest difference between the two numbers of each pair (they must agree to float rounding). Each
timing follows one warm-up run of the same masks. Prints a table and writes JSON (docs/engine.md quotes it).

  python scripts/bench_sparse_masks.py --model smollm2-135m -n 8 --sizes 400,2000,6000 \\
      --out benchmarks/sparse-masks-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def cpu_per_mask(fn, n: int) -> tuple[float, torch.Tensor]:
    fn()  # warm-up
    t = time.process_time()
    out = fn()
    return (time.process_time() - t) / n, out


def main() -> None:
    from circuits.algorithms.select import top_connected
    from circuits.discover import build_graph, make_task
    from circuits.models import load_model
    from patching.attribution import eap
    from patching.exact import EdgePatcher

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="ioi")
    p.add_argument("-n", type=int, default=8, help="prompts")
    p.add_argument("--sizes", default="400,2000,6000", help="circuit sizes in edges (comma-separated)")
    p.add_argument("--removals", type=int, default=24, help="single-edge removals for the based runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/sparse-masks.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model, device="cpu", dtype="float32")
    batch = make_task(a.task, a.n, 0, model).batch(model.tokenizer)
    graph = build_graph(model, "edge")
    scores = eap(model, graph, batch, ablation="resample", metric="logit_diff").values
    fast = EdgePatcher(model, graph, batch, ablation="resample", metric="logit_diff")
    slow = EdgePatcher(model, graph, batch, ablation="resample", metric="logit_diff", complement=False)
    rows = []
    with torch.no_grad():
        for k in (int(x) for x in a.sizes.split(",")):
            C = top_connected(graph, scores, k)
            edges = C.nonzero()[:, 0]
            pick = edges[torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))[:a.removals]]
            minus = C.repeat(len(pick), 1)
            minus[torch.arange(len(pick)), pick] = False
            row = {"edges": int(C.sum())}
            for name, masks in (("circuit", C.repeat(3, 1)), ("minus_one", minus[:6])):
                tc, xc = cpu_per_mask(lambda m=masks: fast.run(~m), len(masks))
                td, xd = cpu_per_mask(lambda m=masks: slow.run(~m), len(masks))
                row.update({f"{name}_complement_s": tc, f"{name}_direct_s": td,
                            f"{name}_max_diff": float((xc - xd).abs().max())})

            def based(m=minus, c=C):
                with fast.based_on(~c):
                    return fast.run(~m)
            tp, xp = cpu_per_mask(lambda m=minus: fast.run(~m), len(minus))
            tb, xb = cpu_per_mask(based, len(minus))
            row.update({"removal_plain_s": tp, "removal_based_s": tb, "removal_max_diff": float((xp - xb).abs().max())})
            rows.append(row)
            print(f"{row['edges']:>6} edges | circuit {row['circuit_complement_s']:.2f} vs {row['circuit_direct_s']:.2f} s"
                  f" | minus one {row['minus_one_complement_s']:.2f} vs {row['minus_one_direct_s']:.2f} s"
                  f" | removals based {tb:.2f} vs plain {tp:.2f} s | max diff "
                  f"{max(row['circuit_max_diff'], row['minus_one_max_diff'], row['removal_max_diff']):.1e}", flush=True)
    out = {"model": a.model, "task": a.task, "n_prompts": a.n, "threads": a.threads, "n_edges": graph.n_edges,
           "load_average": list(os.getloadavg()), "unit": "CPU seconds per mask", "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
