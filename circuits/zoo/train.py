"""The one training loop shared by every zoo recipe, and the HF-format checkpoint writer.

:func:`train` builds the recipe's HuggingFace model (seeded), trains it with AdamW on batches from
:data:`circuits.zoo.data.DATA` (batch ``s`` is drawn from ``random.Random(f"{name}:{seed}:{s}")``), and
writes ``config.json`` (with ``architectures``), ``model.safetensors``, the shared tokenizer
(``tokenizer.json``, ``tokenizer_config.json`` with a chat template) and ``zoo.json`` (recipe, figures
measured through the bridge, training time). Every ``checkpoint_every`` steps, and when interrupted
(Ctrl-C), the model, optimiser and step are saved to ``train_state.pt`` in the output directory; the next
call with the same recipe resumes from there and ends with the same weights as an uninterrupted run.
Same recipe and seed -> same weights (on the same torch build and thread count).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from circuits.zoo.data import DATA, IGNORE, TrainBatch
from circuits.zoo.recipes import Recipe
from circuits.zoo.tokenizer import load_saved_tokenizer, save_tokenizer

logger = logging.getLogger(__name__)
STATE_FILE = "train_state.pt"


def build_model(recipe: Recipe, tokenizer: Any) -> torch.nn.Module:
    """The recipe's freshly initialised HF causal LM (seeded with ``recipe.seed``)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MambaConfig,
        MambaForCausalLM,
    )

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    vocab = len(tokenizer)
    if recipe.architecture == "llama":
        cfg: Any = LlamaConfig(vocab_size=vocab, max_position_embeddings=recipe.n_ctx, tie_word_embeddings=False,
                               num_key_value_heads=recipe.config["num_attention_heads"], **special, **recipe.config)
        cls: Any = LlamaForCausalLM
    elif recipe.architecture == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=recipe.n_ctx, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **special, **recipe.config)
        cls = GPT2LMHeadModel
    else:
        cfg = MambaConfig(vocab_size=vocab, use_mambapy=False, **special, **recipe.config)
        cls = MambaForCausalLM
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads
                                                  if recipe.architecture != "mamba" else None)
    if head_dim is not None and head_dim < 32:
        raise ValueError(f"recipe {recipe.name!r}: head_dim {head_dim} < 32 (vLLM's CPU attention refuses it)")
    cfg.architectures = [cls.__name__]
    cfg.circuitexplain_zoo = recipe.name
    if recipe.attn_only:
        cfg.circuitexplain_attn_only = True
    torch.manual_seed(recipe.seed)
    model = cls(cfg)
    if recipe.attn_only:
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.data.zero_()
            for p in layer.mlp.parameters():
                p.requires_grad_(False)
    return model


def loss_fn(model: torch.nn.Module, batch: TrainBatch, restrict: bool = False) -> torch.Tensor:
    """Cross-entropy on ``labels`` (already shifted) plus cross-entropy to the soft targets, if any.

    With ``restrict`` (and a batch ``support``) the softmax runs over the support tokens only. Random-token
    induction data uses 100 of the ~670 shared-vocabulary tokens; pushing the other logits down through
    the final RMSNorm competes with the weak early induction signal and delayed the induction heads
    past 1500 steps in our runs, while with the restricted softmax they form within ~300 steps. Recipes
    restrict only the first ``restricted_softmax_steps`` steps and then train on the full vocabulary.
    """
    logits = model(input_ids=batch.input_ids).logits.float()
    if restrict and batch.support is not None:
        blocked = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        blocked[batch.support] = False
        logits = logits.masked_fill(blocked, float("-inf"))
    loss = logits.new_zeros(())
    if bool((batch.labels != IGNORE).any()):
        loss = loss + F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE)
    if batch.soft_targets is not None and batch.soft_pos is not None:
        logp = logits[torch.arange(len(batch.soft_pos)), batch.soft_pos].log_softmax(-1)
        loss = loss - (batch.soft_targets * logp).sum(-1).mean()
    return loss


def lr_at(recipe: Recipe, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``lr / 10``."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def batch_rng(recipe: Recipe, step: int) -> random.Random:
    return random.Random(f"{recipe.name}:{recipe.seed}:{step}")


def _save_state(path: Path, recipe: Recipe, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                elapsed: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"recipe": recipe.to_dict(), "step": step, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "elapsed": elapsed}, tmp)
    tmp.replace(path)


def _load_state(path: Path, recipe: Recipe) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("recipe") != recipe.to_dict():
        logger.warning("%s belongs to a different recipe; starting from scratch", path)
        return None
    return state


def train(recipe: Recipe, out_dir: str | Path, *, progress: bool = True, resume: bool = True,
          max_steps: int | None = None, measure: bool = True, threads: int | None = 1) -> dict[str, Any] | None:
    """Train ``recipe`` into ``out_dir`` (HF format + zoo.json) and return the zoo.json content.

    Args:
        recipe: the recipe.
        out_dir: output directory (created).
        progress: show a tqdm progress bar.
        resume: continue from ``out_dir/train_state.pt`` if present and made by the same recipe.
        max_steps: stop after this many steps *in this call*, saving the training state (returns None);
            the next call resumes. For chunked training and tests.
        measure: measure the recipe's figures through the bridge after training (into zoo.json).
        threads: torch CPU threads while training (restored afterwards). The zoo models are so small that
            one thread is fastest (a second one mostly waits at barriers, and on a shared machine it was
            25x slower), and a fixed count keeps CPU results bit-identical across machines. ``None``:
            leave torch's setting.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(recipe, Path(out_dir), progress=progress, resume=resume, max_steps=max_steps,
                      measure=measure)
    finally:
        torch.set_num_threads(previous)


def _train(recipe: Recipe, out: Path, *, progress: bool, resume: bool, max_steps: int | None,
           measure: bool) -> dict[str, Any] | None:
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(out, model_max_length=recipe.n_ctx)
    tokenizer = load_saved_tokenizer(out)
    model = build_model(recipe, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    state_path = out / STATE_FILE
    start, elapsed = 0, 0.0
    state = _load_state(state_path, recipe) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        logger.info("resuming %s at step %d", recipe.name, start)
    data = DATA[recipe.data]
    stop = recipe.steps if max_steps is None else min(recipe.steps, start + max_steps)
    model.train()
    t0 = time.perf_counter()
    step = start
    bar = tqdm(total=recipe.steps, initial=start, desc=f"train {recipe.name}", disable=not progress,
               dynamic_ncols=True)
    try:
        while step < stop:
            for g in opt.param_groups:
                g["lr"] = lr_at(recipe, step)
            restrict = step < recipe.restricted_softmax_steps
            loss = loss_fn(model, data(batch_rng(recipe, step), recipe.batch, tokenizer), restrict=restrict)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if step % 50 == 0 or step == stop:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % 100 == 0:
                logger.info("%s step %d loss %.4f", recipe.name, step, loss.item())
            if step % recipe.checkpoint_every == 0 and step < recipe.steps:
                _save_state(state_path, recipe, step, model, opt, elapsed + time.perf_counter() - t0)
    except KeyboardInterrupt:
        _save_state(state_path, recipe, step, model, opt, elapsed + time.perf_counter() - t0)
        logger.warning("interrupted at step %d; state saved to %s", step, state_path)
        raise
    finally:
        bar.close()
    elapsed += time.perf_counter() - t0
    if step < recipe.steps:
        _save_state(state_path, recipe, step, model, opt, elapsed)
        return None
    model.eval()
    model.save_pretrained(str(out))
    (out / "generation_config.json").unlink(missing_ok=True)
    info: dict[str, Any] = {"name": recipe.name, "recipe": recipe.to_dict(), "train_seconds": round(elapsed, 1),
                            "final_loss": round(float(loss.item()), 6) if stop > start else None,
                            "versions": _versions()}
    if measure:
        from circuits.zoo.check import check_dir

        result = check_dir(recipe, out)
        info.update({k: result[k] for k in ("figures", "checks", "passed")})
    (out / "zoo.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    state_path.unlink(missing_ok=True)
    return info


def _versions() -> dict[str, str]:
    import transformer_lens
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "transformer_lens": getattr(transformer_lens, "__version__", "?")}
