"""Our EAP next to a published implementation's, on the same model and the same prompts.

The reference is auto-circuit (Miller, Chughtai & Saunders 2024, "Transformer Circuit Faithfulness Metrics are
not Robust"; PyPI ``auto-circuit`` 1.0.1), run on TransformerLens 2.18's ``HookedTransformer`` in a venv of its
own (``make autocircuit-env``; scripts/autocircuit_worker.py): it cannot share ours (TransformerLens 4).

Both sides read one prompt file (JSON Lines of token ids, so tokenization cannot differ) and one HF directory.
Methods compared, all with resample ablation (the corrupt prompts' activations) and the logit difference:

* ``eap``: ours ``patching.eap`` vs auto-circuit's ``mask_gradient_prune_scores(grad_function="logit",
  answer_function="avg_diff", mask_val=0)``, the method its EAP registry entry uses;
* ``eap_syed`` (``--syed``): vs auto-circuit's ``edge_attribution_patching_prune_scores``, its literal
  replication of Syed et al.'s code (gradients cached by backward hooks, one Python loop over edges);
* ``exact`` (``--exact K``): exact single-edge patching (``EdgePatcher``) vs auto-circuit's ``patch_mode`` with
  that one edge's mask at 1, on the K/2 edges with the largest |EAP| and K/2 random others.

Edge names (auto-circuit -> ours): ``Resid Start`` (``blocks.0.hook_resid_pre``; on a model without learned
positions exactly the token embedding) -> ``embed``; ``A{L}.{H}`` (``blocks.L.attn.hook_result`` head H) ->
``a{L}.h{H}``; ``MLP {L}`` -> ``m{L}``; destinations ``A{L}.{H}.Q|K|V`` (``blocks.L.hook_{q,k,v}_input`` head
H, per query head thanks to ``ungroup_grouped_query_attention``) -> ``a{L}.h{H}<q|k|v>``; ``MLP {L}``
(``hook_mlp_in``) -> ``m{L}``; ``Resid End`` (last ``hook_resid_post``) -> ``logits``. Sign: an auto-circuit
mask of 1 ablates the edge and its loss is ``-mean logit difference``, so its EAP score is
``d(-LD)/d mask = -(ours)`` where ours is ``m(ablated) - m(clean)`` estimated to first order: we compare
``ours`` with ``-theirs``. Exact patching scores have the same sign on both sides.

Usage:
  python scripts/compare_eap_external.py --model smollm2-135m -n 4 --exact 40 --syed \\
      --out benchmarks/eap-external-smollm2-135m.json
  python scripts/compare_eap_external.py --model tiny-gqa --out benchmarks/eap-external-tiny-gqa.json
Prints a table and writes JSON (figures of agreement, the strongest edges side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("CIRCUITEXPLAIN_AUTOCIRCUIT_VENV", ROOT / ".venv-autocircuit"))
WORKER = ROOT / "scripts" / "autocircuit_worker.py"
SIGN = -1.0  # ours = SIGN * auto-circuit's EAP score (module docstring)
TINY_CFG = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                intermediate_size=96, vocab_size=64, max_position_embeddings=32, initializer_range=0.15,
                bos_token_id=0, eos_token_id=0, pad_token_id=1, rope_theta=500.0, tie_word_embeddings=False)

_SRC = [(re.compile(r"^Resid Start$"), lambda m: "embed"),
        (re.compile(r"^A(\d+)\.(\d+)$"), lambda m: f"a{m[1]}.h{m[2]}"),
        (re.compile(r"^MLP (\d+)$"), lambda m: f"m{m[1]}")]
_DEST = [(re.compile(r"^A(\d+)\.(\d+)\.([QKV])$"), lambda m: (f"a{m[1]}.h{m[2]}", m[3].lower())),
         (re.compile(r"^MLP (\d+)$"), lambda m: (f"m{m[1]}", None)),
         (re.compile(r"^Resid End$"), lambda m: ("logits", None))]


def _match(table: list, name: str, what: str) -> Any:
    for rx, fn in table:
        m = rx.match(name)
        if m:
            return fn(m)
    raise ValueError(f"auto-circuit {what} node {name!r} has no counterpart in our graph")


def theirs_to_ours(src: str, dest: str) -> str:
    """auto-circuit's (src, dest) node names -> our edge id, e.g. ``("A0.1", "A3.2.K") -> "a0.h1->a3.h2<k>"``."""
    receiver, inp = _match(_DEST, dest, "destination")
    return f"{_match(_SRC, src, 'source')}->{receiver}" + (f"<{inp}>" if inp else "")


def ours_to_theirs(edge_id: str) -> tuple[str, str]:
    """Our edge id -> auto-circuit's (src, dest) node names (the inverse of :func:`theirs_to_ours`)."""
    m = re.fullmatch(r"(.+)->([^<]+)(?:<([qkv])>)?", edge_id)
    if not m:
        raise ValueError(f"not an edge id: {edge_id!r}")
    s, r, inp = m.groups()
    src = "Resid Start" if s == "embed" else (
        re.sub(r"^a(\d+)\.h(\d+)$", r"A\1.\2", s) if s.startswith("a") else re.sub(r"^m(\d+)$", r"MLP \1", s))
    if r == "logits":
        dest = "Resid End"
    elif r.startswith("m"):
        dest = re.sub(r"^m(\d+)$", r"MLP \1", r)
    else:
        dest = re.sub(r"^a(\d+)\.h(\d+)$", r"A\1.\2", r) + f".{inp.upper()}"
    if theirs_to_ours(src, dest) != edge_id:
        raise ValueError(f"edge {edge_id!r} has no auto-circuit counterpart")
    return src, dest


# ----------------------------------------------------------------------------------------------- prompts, models
def equal_length(batch: Any, n: int) -> Any:
    """The first ``n`` prompts of the most frequent token length (ties: the longer), trimmed to it: auto-circuit
    reads the logits at the last position, so its batches cannot be right-padded."""
    lengths = (batch.pos + 1).tolist()
    counts = {L: lengths.count(L) for L in set(lengths)}
    L = max(counts, key=lambda k: (counts[k], k))
    if counts[L] < n:
        raise ValueError(f"only {counts[L]} prompts share the most common length {L}; ask for fewer than {n} "
                         f"or generate more")
    rows = torch.tensor([i for i, x in enumerate(lengths) if x == L][:n])
    return type(batch)(batch.clean[rows, :L], batch.corrupt[rows, :L], batch.answer[rows], batch.wrong[rows],
                       batch.pos[rows])


def write_prompts(path: Path, batch: Any, tokenizer: Any | None) -> None:
    with open(path, "w") as f:
        for i in range(len(batch)):
            row = {"clean_ids": batch.clean[i].tolist(), "corrupt_ids": batch.corrupt[i].tolist(),
                   "answer_id": int(batch.answer[i]), "wrong_id": int(batch.wrong[i])}
            if tokenizer is not None:
                row.update(clean=tokenizer.decode(batch.clean[i]), corrupt=tokenizer.decode(batch.corrupt[i]),
                           answer=tokenizer.decode(batch.answer[i : i + 1]),
                           wrong=tokenizer.decode(batch.wrong[i : i + 1]))
            f.write(json.dumps(row) + "\n")


def tiny_gqa_dir(path: Path, seed: int = 1) -> Path:
    """A random 3-layer Llama with grouped-query attention (6 query heads, 2 k/v heads) and a word-level tokenizer,
    saved as an HF directory both sides can load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**TINY_CFG)).save_pretrained(path)
    words = {"<bos>": 0, "<pad>": 1, **{f"t{i}": i for i in range(2, TINY_CFG["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<pad>",
                            eos_token="<bos>").save_pretrained(path)
    return path


def first_layers_dir(src: Path, dst: Path, n_layers: int) -> Path:
    """A copy of the HF Llama directory ``src`` keeping only its first ``n_layers`` decoder layers (real weights,
    the final norm and the unembedding unchanged): a CPU-cheap subset of a real model for the test."""
    import shutil

    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    if not 1 <= n_layers <= cfg["num_hidden_layers"]:
        raise ValueError(f"--layers must be in 1..{cfg['num_hidden_layers']}, got {n_layers}")
    dst.mkdir(parents=True, exist_ok=True)
    keep = {}
    for k, v in load_file(str(src / "model.safetensors")).items():
        m = re.match(r"model\.layers\.(\d+)\.", k)
        if m is None or int(m[1]) < n_layers:
            keep[k] = v
    save_file(keep, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": n_layers}, indent=1))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, dst / f.name)
    return dst


def tiny_batch(n: int, seed: int, P: int = 8) -> Any:
    """Random clean/corrupt token rows (BOS first); answer/wrong: the clean/corrupt second token."""
    from patching.batch import TaskBatch

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, TINY_CFG["vocab_size"], (n, P), generator=g)
    corrupt = torch.randint(2, TINY_CFG["vocab_size"], (n, P), generator=g)
    clean[:, 0] = corrupt[:, 0] = 0
    return TaskBatch(clean, corrupt, clean[:, 1].clone(), corrupt[:, 1].clone(), torch.full((n,), P - 1))


# ------------------------------------------------------------------------------------------------------ the sides
def run_theirs(model_dir: Path, prompts: Path, out: Path, *, exact_edges: list[str] | None = None,
               syed: bool = False, threads: int = 1, timeout: float | None = None, stream: bool = False,
               venv: Path = VENV) -> dict:
    """Run scripts/autocircuit_worker.py in the auto-circuit venv; its JSON with edge names mapped to our ids.

    ``out`` keeps the worker's finished stages: a rerun on the same inputs resumes. ``stream``: the worker's
    progress goes to our stderr (else it is captured and shown only on failure)."""
    py = venv / "bin" / "python"
    if not py.is_file():
        raise FileNotFoundError(f"no auto-circuit venv at {venv}: run `make autocircuit-env`")
    cmd = [str(py), str(WORKER), "--model-dir", str(model_dir), "--prompts", str(prompts), "--out", str(out),
           "--threads", str(threads)]
    if exact_edges:
        edges_file = out.with_name(out.stem + "-exact-edges.json")
        edges_file.write_text(json.dumps([ours_to_theirs(e) for e in exact_edges]))
        cmd += ["--exact-edges", str(edges_file)]
    if syed:
        cmd.append("--syed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("PYTHONPATH", None)
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if stream else subprocess.PIPE, text=True,
                         timeout=timeout, env=env)
    if res.returncode != 0:
        why = (res.stderr or "").strip()[-2000:] or "see its messages above"
        raise RuntimeError(f"auto-circuit worker failed (exit {res.returncode}): {why}")
    raw = json.loads(out.read_text())
    for key in ("eap", "eap_syed", "exact"):
        if key in raw:
            raw[key] = {theirs_to_ours(s, d): v for s, d, v in raw[key]}
    if "exact" in raw:
        raw["exact"] = {e: raw["exact"][e] for e in exact_edges or []}
    return raw


def run_ours(model: Any, batch: Any) -> dict:
    """Our EAP on every edge, and the clean logit differences."""
    from patching import ComponentGraph, eap
    from patching.metrics import gather_pos, logit_diff

    graph = ComponentGraph.from_model(model)
    t0 = time.perf_counter()
    s = eap(model, graph, batch, ablation="resample", metric="logit_diff")
    out: dict[str, Any] = {"eap": dict(zip(s.ids, s.values.tolist(), strict=True)),
                           "eap_s": time.perf_counter() - t0, "n_edges": graph.n_edges}
    with torch.no_grad():
        out["clean_logit_diff"] = logit_diff(gather_pos(model(batch.clean), batch.pos).float(), batch).tolist()
    return out


def run_ours_exact(model: Any, batch: Any, edges: list[str]) -> dict:
    """Exact single-edge patching (``EdgePatcher``): mean over prompts of ``m(edge ablated) - m(clean)``."""
    from patching import ComponentGraph, EdgePatcher

    graph = ComponentGraph.from_model(model)
    patcher = EdgePatcher(model, graph, batch, ablation="resample", metric="logit_diff")
    masks = torch.zeros(len(edges), graph.n_edges, dtype=torch.bool)
    for k, e in enumerate(edges):
        masks[k, graph.edge_index[e]] = True
    t0 = time.perf_counter()
    vals = (patcher.run(masks) - patcher.clean_metric).mean(dim=1)
    return {"exact": dict(zip(edges, vals.tolist(), strict=True)), "exact_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------- agreement
def agreement(ours: dict[str, float], theirs: dict[str, float], ks: tuple[int, ...] = (10, 100, 1000)) -> dict:
    """Figures of agreement between two score dicts over the same edge ids (``theirs`` already in our sign)."""
    from scipy import stats

    if set(ours) != set(theirs):
        only = sorted(set(ours) ^ set(theirs))
        raise ValueError(f"edge sets differ ({len(set(ours) - set(theirs))} only ours, "
                         f"{len(set(theirs) - set(ours))} only theirs), e.g. {only[:3]}")
    ids = sorted(ours)
    a = np.array([ours[i] for i in ids], dtype=np.float64)
    b = np.array([theirs[i] for i in ids], dtype=np.float64)
    d = np.abs(a - b)
    scale = float(np.abs(a).max())
    out = {"n": len(ids), "max_abs_score": scale, "max_abs_diff": float(d.max()),
           "rel_diff_to_max": float(d.max() / scale) if scale else float("nan"),
           "p99_abs_diff": float(np.quantile(d, 0.99)), "worst_edge": ids[int(d.argmax())]}
    big = np.abs(a) >= 0.01 * scale
    out["max_rel_diff_edges_above_1pct"] = float((d[big] / np.abs(a[big])).max()) if big.any() else float("nan")
    out["pearson"] = float(stats.pearsonr(a, b).statistic) if len(ids) > 1 else float("nan")
    out["spearman"] = float(stats.spearmanr(a, b).statistic) if len(ids) > 1 else float("nan")
    ra, rb = np.argsort(-np.abs(a), kind="stable"), np.argsort(-np.abs(b), kind="stable")
    for k in ks:
        if k <= len(ids):
            out[f"top{k}_overlap"] = len(set(ra[:k].tolist()) & set(rb[:k].tolist())) / k
    return out


def compare(model: Any, model_dir: Path, batch: Any, tokenizer: Any | None, workdir: Path, *, n_exact: int = 0,
            syed: bool = False, seed: int = 0, threads: int = 1, stream: bool = False, log=print) -> dict:
    """Run both sides on ``batch`` and return the report (see the module docstring).

    ``workdir`` keeps both sides' finished results (``ours.json``, ``theirs.json``, keyed by the prompts and the
    model's config and weight size): a rerun with the same inputs resumes where it stopped."""
    prompts = workdir / "prompts.jsonl"
    write_prompts(prompts, batch, tokenizer)
    key = {"prompts": prompts.read_text(), "config": (Path(model_dir) / "config.json").read_text(),
           "weights_bytes": (Path(model_dir) / "model.safetensors").stat().st_size, "engine": _engine_digest()}
    cache = workdir / "ours.json"
    ours = json.loads(cache.read_text()) if cache.is_file() else {}
    if ours.get("key") != key or "eap" not in ours:
        log(f"ours: EAP on {len(batch)} prompts x {batch.clean.shape[1]} tokens ...")
        ours = {"key": key, **run_ours(model, batch)}
        _save(cache, ours)
    else:
        log(f"ours: EAP from {cache}")
    exact_edges: list[str] = []
    if n_exact:
        ranked = sorted(ours["eap"], key=lambda e: -abs(ours["eap"][e]))
        exact_edges = ranked[: n_exact // 2]
        rest = sorted(set(ranked) - set(exact_edges))
        exact_edges += random.Random(seed).sample(rest, n_exact - len(exact_edges))
        if set(exact_edges) - set(ours.get("exact", {})):
            log(f"ours: exact patching of {len(exact_edges)} edges ...")
            ours.update(run_ours_exact(model, batch, exact_edges))
            _save(cache, ours)
    log("auto-circuit (TransformerLens 2.18, its own venv) ...")
    theirs = run_theirs(model_dir, prompts, workdir / "theirs.json", exact_edges=exact_edges or None, syed=syed,
                        threads=threads, stream=stream)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    report: dict[str, Any] = {
        "reference": "auto-circuit (Miller et al. 2024) on TransformerLens HookedTransformer",
        "versions": theirs["versions"], "n_prompts": len(batch), "seq_len": int(batch.clean.shape[1]),
        "prompts": [{k: r[k] for k in ("clean", "corrupt", "answer", "wrong") if k in r} for r in rows],
        "ablation": "resample", "metric": "logit_diff", "n_edges": {"ours": ours["n_edges"], "theirs":
                                                                     theirs["n_edges"]},
        "checks": {"their_tl_vs_hf_max_abs_logit": theirs["tl_vs_hf_max_abs_logit"],
                   "their_hooked_vs_plain_max_abs_logit": theirs["hooked_vs_plain_max_abs_logit"],
                   "clean_logit_diff_ours": ours["clean_logit_diff"],
                   "clean_logit_diff_theirs": theirs["clean_logit_diff"],
                   "clean_logit_diff_max_abs_diff": float(np.abs(np.array(ours["clean_logit_diff"])
                                                                 - np.array(theirs["clean_logit_diff"])).max())},
        "sign": "ours = -auto-circuit (mask gradient of -logit difference); exact: same sign",
        "methods": {}, "seconds": {"ours_eap": ours["eap_s"], "theirs_eap": theirs["eap_s"],
                                   "theirs_load": theirs["load_s"]},
    }
    for key in ("eap", "eap_syed"):
        if key in theirs:
            flipped = {e: SIGN * v for e, v in theirs[key].items()}
            report["methods"][key] = agreement(ours["eap"], flipped)
    if exact_edges:
        ours_exact = {e: ours["exact"][e] for e in exact_edges}
        report["methods"]["exact"] = agreement(ours_exact, theirs["exact"], ks=(10,))
        report["exact_edges"] = [{"edge": e, "ours": ours["exact"][e], "theirs": theirs["exact"][e],
                                  "ours_eap": ours["eap"][e]} for e in exact_edges]
        report["checks"]["their_all_edges_ablated_vs_corrupt_max_abs"] = theirs["exact_all_ablated_vs_corrupt_max_abs"]
        report["seconds"].update(ours_exact=ours["exact_s"], theirs_exact=theirs["exact_s"])
    if "eap_syed_s" in theirs:
        report["seconds"]["theirs_eap_syed"] = theirs["eap_syed_s"]
    top = sorted(ours["eap"], key=lambda e: -abs(ours["eap"][e]))[:25]
    report["top_edges"] = [{"edge": e, "ours": ours["eap"][e], "theirs_sign_flipped": SIGN * theirs["eap"][e]}
                           for e in top]
    return report


def _engine_digest() -> str:
    """sha256 of patching/*.py: cached results of ours are reused only for the same engine source."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "patching").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def table(report: dict) -> str:
    cols = ("method", "edges", "max|ours|", "max|diff|", "rel", "pearson", "spearman", "top10", "top100", "top1000")
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for name, m in report["methods"].items():
        lines.append(" | ".join([name, str(m["n"]), f"{m['max_abs_score']:.4g}", f"{m['max_abs_diff']:.2e}",
                                 f"{m['rel_diff_to_max']:.2e}", f"{m['pearson']:.7f}", f"{m['spearman']:.7f}"]
                                + [f"{m[k]:.2f}" if k in m else "-" for k in ("top10_overlap", "top100_overlap",
                                                                                  "top1000_overlap")]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare our EAP with auto-circuit's on the same prompts (module doc).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="smollm2-135m",
                    help="smollm2-135m (the real model), or tiny-gqa (a random 3-layer GQA Llama built here)")
    ap.add_argument("-n", "--prompts", type=int, default=4, help="prompts (all of one token length)")
    ap.add_argument("--layers", type=int, default=None,
                    help="smollm2-135m only: keep its first N layers (real weights; a cheaper subset)")
    ap.add_argument("--seed", type=int, default=0, help="task seed (IOI names/templates) and exact-edge sample")
    ap.add_argument("--exact", type=int, default=0, help="also exact-patch K edges (K/2 top-|EAP|, K/2 random)")
    ap.add_argument("--syed", action="store_true", help="also auto-circuit's literal Syed et al. EAP replication")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: benchmarks/eap-external-MODEL.json)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where both sides keep finished stages, so an interrupted run resumes "
                         "(default: out/eap-external/MODEL)")
    args = ap.parse_args(argv)
    if args.model not in ("smollm2-135m", "tiny-gqa"):
        ap.error(f"--model: give smollm2-135m or tiny-gqa, not {args.model!r}")
    if args.layers is not None and args.model != "smollm2-135m":
        ap.error("--layers applies to smollm2-135m only")
    if args.prompts < 1 or args.exact < 0:
        ap.error("-n must be >= 1 and --exact >= 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from circuits.models import load_model

    tag = args.model + (f"-{args.layers}l" if args.layers else "")
    out = args.out or ROOT / "benchmarks" / f"eap-external-{tag}.json"
    work = args.workdir or ROOT / "out" / "eap-external" / tag
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny-gqa":
        model_dir = tiny_gqa_dir(work / "model")
        model = load_model(model_dir, device="cpu", dtype="float32")
        batch, tok = tiny_batch(args.prompts, args.seed), None
    else:
        from circuits.pretrained import ensure_model
        from circuits.tasks import get_task

        model_dir = ensure_model("smollm2-135m")
        if args.layers is not None:
            model_dir = first_layers_dir(model_dir, work / "model", args.layers)
        model = load_model(model_dir, device="cpu", dtype="float32")
        tok = model.tokenizer
        task = get_task("ioi", n=max(8 * args.prompts, 32), seed=args.seed, tokenizer=tok)
        batch = equal_length(task.batch(tok), args.prompts)
    report = compare(model, model_dir, batch, tok, work, n_exact=args.exact, syed=args.syed, seed=args.seed,
                     threads=args.threads, stream=True, log=lambda s: print(s, file=sys.stderr, flush=True))
    report["model"] = args.model
    report["layers"] = args.layers or "all"
    report["command"] = "python scripts/compare_eap_external.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table(report))
    print(json.dumps({"checks": report["checks"], "seconds": report["seconds"]}, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=1))
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
