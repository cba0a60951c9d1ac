"""Run auto-circuit's EAP (and exact edge patching) on an HF Llama-style directory; the external side of
scripts/compare_eap_external.py. Runs ONLY in the auto-circuit venv (scripts/autocircuit_env.sh): it imports
TransformerLens 2.x (HookedTransformer) and auto-circuit, never this project.

The model is built the way TransformerLens 2.x builds a Llama (its ``LlamaForCausalLM`` config branch and
``convert_llama_weights``) from the HF directory's config.json and weights, loaded by that venv's own
transformers; the TL logits are checked against that HF model's logits before anything is scored. GQA is
handled by TransformerLens' ``ungroup_grouped_query_attention`` (each query head gets its own k/v input hook,
which auto-circuit's per-head destination nodes need).

Input (``--prompts``): JSON Lines with ``clean_ids``, ``corrupt_ids`` (equal lengths, all prompts of one
length: auto-circuit reads the logits at the last position), ``answer_id``, ``wrong_id``.
Output (``--out``, JSON): the check figures, and for each method a list ``[src_name, dest_name, score]`` in
auto-circuit's own names and sign (the gradient of ``-mean logit difference`` with respect to each edge mask).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch as t


def llama_tl_config(cfg: dict, n_ctx: int):
    """TransformerLens 2.x's config for an HF Llama config dict (its ``LlamaForCausalLM`` branch), plus the rotary
    base (the branch reads ``rope_theta``; transformers 5 writes it under ``rope_parameters``)."""
    from transformer_lens import HookedTransformerConfig

    H, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    d_head = cfg.get("head_dim") or cfg["hidden_size"] // H
    return HookedTransformerConfig(
        d_model=cfg["hidden_size"], d_head=d_head, n_heads=H, d_mlp=cfg["intermediate_size"],
        n_layers=cfg["num_hidden_layers"], n_ctx=min(n_ctx, cfg["max_position_embeddings"]),
        eps=cfg["rms_norm_eps"], d_vocab=cfg["vocab_size"], act_fn=cfg["hidden_act"],
        n_key_value_heads=kv if kv != H else None, normalization_type="RMS", positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=d_head, rotary_base=float(theta), final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", dtype=t.float32, device="cpu", default_prepend_bos=False)


def load(model_dir: Path, n_ctx: int):
    """(HookedTransformer, HF model) from ``model_dir``, weights converted by TL's ``convert_llama_weights``."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = json.loads((model_dir / "config.json").read_text())
    if raw.get("model_type") != "llama":
        sys.exit(f"{model_dir}/config.json: model_type {raw.get('model_type')!r}, this worker converts 'llama' only")
    hf_cfg = LlamaConfig.from_pretrained(model_dir)
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" in rope:  # transformers 5 layout; this venv's transformers 4 reads rope_theta
        hf_cfg.rope_theta = rope["rope_theta"]
    hf = LlamaForCausalLM.from_pretrained(model_dir, config=hf_cfg, torch_dtype=t.float32, attn_implementation="eager")
    hf.eval()
    cfg = llama_tl_config(raw, n_ctx)
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False,
                                   refactor_factored_attn_matrices=False)
    tl.eval()
    return tl, hf


def read_prompts(path: Path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    clean = t.tensor([r["clean_ids"] for r in rows])
    corrupt = t.tensor([r["corrupt_ids"] for r in rows])
    answer = t.tensor([[r["answer_id"]] for r in rows])
    wrong = t.tensor([[r["wrong_id"]] for r in rows])
    return clean, corrupt, answer, wrong


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True,
                    help="result JSON; finished stages are kept in it, so a rerun with the same inputs resumes")
    ap.add_argument("--exact-edges", type=Path, default=None,
                    help="JSON list of [src_name, dest_name] (auto-circuit names) to patch one at a time")
    ap.add_argument("--syed", action="store_true",
                    help="also run auto-circuit's slow literal replication of Syed et al.'s EAP (hook gradients)")
    ap.add_argument("--n-ctx", type=int, default=512, help="TL context (the causal-mask buffer is n_ctx^2 per layer)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("AUTOCIRCUIT_THREADS", "1")))
    args = ap.parse_args()
    t.set_num_threads(args.threads)
    t.manual_seed(0)

    import auto_circuit
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import batch_src_ablations
    from auto_circuit.utils.graph_utils import patch_mode, patchable_model, set_all_masks
    from auto_circuit.utils.tensor_ops import batch_answer_diffs
    from tqdm import tqdm

    wanted = [tuple(x) for x in json.loads(args.exact_edges.read_text())] if args.exact_edges else []
    key = {"model_dir": str(args.model_dir.resolve()), "prompts": args.prompts.read_text(), "n_ctx": args.n_ctx,
           "config": (args.model_dir / "config.json").read_text()}
    out: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if out.get("key") != key:
        out = {"key": key}
    out["versions"] = {"auto_circuit": getattr(auto_circuit, "__version__", None) or _dist("auto-circuit"),
                       "transformer_lens": _dist("transformer-lens"), "torch": t.__version__,
                       "transformers": _dist("transformers")}
    need_exact = [w for w in wanted if w not in {tuple(x[:2]) for x in out.get("exact", [])}]
    if "eap" in out and ("eap_syed" in out or not args.syed) and not need_exact:
        log("auto-circuit: every stage already in %s", args.out)
        _save(args.out, out)
        return

    t0 = time.perf_counter()
    clean, corrupt, answer, wrong = read_prompts(args.prompts)
    B, P = clean.shape
    log("auto-circuit: building the HookedTransformer from %s", args.model_dir)
    tl, hf = load(args.model_dir, max(args.n_ctx, P))
    with t.no_grad():
        tl_logits, hf_logits = tl(clean), hf(clean).logits
    out["tl_vs_hf_max_abs_logit"] = float((tl_logits - hf_logits).abs().max())
    out["hf_logit_scale"] = float(hf_logits.abs().max())
    last = tl_logits[:, -1]
    out["clean_logit_diff"] = (last.gather(-1, answer) - last.gather(-1, wrong)).squeeze(-1).tolist()
    del hf, hf_logits
    out["load_s"] = time.perf_counter() - t0

    tl.set_use_attn_result(True)
    tl.set_use_split_qkv_input(True)
    tl.set_use_hook_mlp_in(True)
    if tl.cfg.n_key_value_heads is not None:
        tl.set_ungroup_grouped_query_attention(True)
    with t.no_grad():
        out["hooked_vs_plain_max_abs_logit"] = float((tl(clean) - tl_logits).abs().max())
    ds = PromptDataset(list(clean), list(corrupt), list(answer), list(wrong))
    loader = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=B, shuffle=False)
    model = patchable_model(tl, factorized=True, slice_output="last_seq", separate_qkv=True, device=t.device("cpu"))
    out["n_edges"] = len(model.edges)
    _save(args.out, out)

    if "eap" not in out:
        log("auto-circuit: EAP (mask gradients) on %d edges", len(model.edges))
        t0 = time.perf_counter()
        scores = mask_gradient_prune_scores(model, loader, None, grad_function="logit", answer_function="avg_diff",
                                            mask_val=0.0, ablation_type=AblationType.RESAMPLE,
                                            clean_corrupt="corrupt")
        out["eap_s"] = time.perf_counter() - t0
        out["eap"] = [[e.src.name, e.dest.name, float(e.prune_score(scores))] for e in model.edges]
        _save(args.out, out)

    if args.syed and "eap_syed" not in out:
        from auto_circuit.prune_algos.edge_attribution_patching import edge_attribution_patching_prune_scores

        log("auto-circuit: Syed et al. EAP replication (a Python loop over %d edges)", len(model.edges))
        t0 = time.perf_counter()
        syed = edge_attribution_patching_prune_scores(model, loader, None, answer_diff=True)
        out["eap_syed_s"] = time.perf_counter() - t0
        out["eap_syed"] = [[e.src.name, e.dest.name, float(e.prune_score(syed))] for e in model.edges]
        for p in model.parameters():
            p.requires_grad_(False)
        _save(args.out, out)

    if need_exact:
        by_name = {(e.src.name, e.dest.name): e for e in model.edges}
        missing = [w for w in wanted if w not in by_name]
        if missing:
            sys.exit(f"{args.exact_edges}: auto-circuit has no edge {missing[0]}")
        batch = next(iter(loader))
        src_outs = batch_src_ablations(model, loader, AblationType.RESAMPLE, clean_corrupt="corrupt")[batch.key]
        t0 = time.perf_counter()
        with t.no_grad():
            set_all_masks(model, 0.0)
            with patch_mode(model, src_outs):
                base = batch_answer_diffs(model(batch.clean)[model.out_slice], batch)
                set_all_masks(model, 1.0)  # every edge ablated: must reproduce the corrupt run
                everything = batch_answer_diffs(model(batch.clean)[model.out_slice], batch)
                set_all_masks(model, 0.0)
            corrupt_ld = batch_answer_diffs(model(batch.corrupt)[model.out_slice], batch)
            out["exact_all_ablated_vs_corrupt_max_abs"] = float((everything - corrupt_ld).abs().max())
            out["exact_clean_logit_diff"] = base.tolist()
            out.setdefault("exact", [])
            for w in tqdm(need_exact, desc="auto-circuit exact edge patching", file=sys.stderr, mininterval=5,
                          disable=False):  # TQDM_DISABLE (set by the caller) silences auto-circuit's own bars
                with patch_mode(model, src_outs, edges=[by_name[w]]):
                    ld = batch_answer_diffs(model(batch.clean)[model.out_slice], batch)
                out["exact"].append([w[0], w[1], float((ld - base).mean())])
                out["exact_s"] = out.get("exact_s", 0.0) + time.perf_counter() - t0
                t0 = time.perf_counter()
                _save(args.out, out)
        set_all_masks(model, 0.0)
    _save(args.out, out)


def log(msg: str, *a: object) -> None:
    print(msg % a, file=sys.stderr, flush=True)


def _dist(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
