"""The figures ``circuitexplain zoo check`` measures on a loaded bridge.

``MEASURES[name](model, tokenizer, n=..., seed=...) -> {figure: value}``. All figures are computed on
held-out prompts drawn with ``seed`` (training batches use string seeds, so they never coincide) by
running the ``TransformerBridge`` (not the raw HF model), so a check also checks loading.

* ``induction``: previous-token score of each layer-0 head (mean attention from position i to i-1 on
  ``BOS + R + R``, R 20 distinct random words) and induction score of each layer-1 head (mean attention
  from a second-copy position to the position after the same token's first occurrence), as in Olsson et
  al. 2022; next-token loss on the first and second copy; and the second-copy loss with the best
  previous-token head's output (``hook_z``) zeroed.
* ``ioi``: arg-max accuracy and mean logit difference logit(IO) - logit(S), clean and ABC-corrupted.
* ``greater_than``: Hanna et al.'s probability difference sum_{y>YY} p(y) - sum_{y<=YY} p(y), clean and for
  the "01" corruption (still relative to the clean YY), and the task's logit difference.
* ``dyck``: arg-max accuracy and mean logit difference (answer closer minus corrupted closer).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from circuits.tasks.base import Task, encode
from circuits.tasks.dyck import dyck
from circuits.tasks.greater_than import sample_greater_than
from circuits.tasks.ioi import ioi
from circuits.tasks.vocab import INDUCTION_WORDS, YEARS
from patching.metrics import gather_pos

EVAL_SEED = 12345


def _logits_at_pos(model: Any, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return gather_pos(model(tokens), pos).float()


@torch.no_grad()
def measure_ioi(model: Any, tokenizer: Any, n: int = 256, seed: int = EVAL_SEED) -> dict[str, float]:
    batch = ioi(n=n, seed=seed).batch(tokenizer, model.cfg.device)
    clean = _logits_at_pos(model, batch.clean, batch.pos)
    corrupt = _logits_at_pos(model, batch.corrupt, batch.pos)

    def ld(lg: torch.Tensor) -> float:
        return float((lg.gather(-1, batch.answer[:, None]) - lg.gather(-1, batch.wrong[:, None])).mean())

    return {"accuracy": float((clean.argmax(-1) == batch.answer).float().mean()),
            "logit_diff": ld(clean), "corrupt_logit_diff": ld(corrupt)}


@torch.no_grad()
def measure_greater_than(model: Any, tokenizer: Any, n: int = 256, seed: int = EVAL_SEED) -> dict[str, float]:
    rng = random.Random(seed)
    examples = [sample_greater_than(rng) for _ in range(n)]
    task = Task("greater_than", tuple(e.pair() for e in examples))
    batch = task.batch(tokenizer, model.cfg.device)
    year_ids = torch.tensor([encode(tokenizer, y, prepend_bos=False)[0] for y in YEARS], device=batch.clean.device)
    yy = torch.tensor([e.yy for e in examples], device=batch.clean.device)
    above = torch.arange(100, device=yy.device)[None, :] > yy[:, None]            # [n, 100]

    def pd(tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
        lg = _logits_at_pos(model, tokens, batch.pos)
        p = lg.softmax(-1)[:, year_ids]
        return float(((p * above).sum(-1) - (p * ~above).sum(-1)).mean()), lg

    clean_pd, lg = pd(batch.clean)
    corrupt_pd, _ = pd(batch.corrupt)
    ld = (lg.gather(-1, batch.answer[:, None]) - lg.gather(-1, batch.wrong[:, None])).mean()
    return {"prob_diff": clean_pd, "corrupt_prob_diff": corrupt_pd, "logit_diff": float(ld)}


@torch.no_grad()
def measure_dyck(model: Any, tokenizer: Any, n: int = 256, seed: int = EVAL_SEED) -> dict[str, float]:
    batch = dyck(n=n, seed=seed).batch(tokenizer, model.cfg.device)
    lg = _logits_at_pos(model, batch.clean, batch.pos)
    ld = (lg.gather(-1, batch.answer[:, None]) - lg.gather(-1, batch.wrong[:, None])).mean()
    return {"accuracy": float((lg.argmax(-1) == batch.answer).float().mean()), "logit_diff": float(ld)}


def repeated_tokens(tokenizer: Any, n: int, length: int, seed: int) -> torch.Tensor:
    """``[n, 1 + 2*length]`` ids of ``BOS + R + R`` with R ``length`` distinct random induction words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(INDUCTION_WORDS, length)
        rows.append(encode(tokenizer, "".join(" " + w for w in words + words)))
    return torch.tensor(rows)


@torch.no_grad()
def measure_induction(model: Any, tokenizer: Any, n: int = 64, seed: int = EVAL_SEED,
                      length: int = 20) -> dict[str, float]:
    tokens = repeated_tokens(tokenizer, n, length, seed).to(model.cfg.device)
    names = ("blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern")
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    p0, p1 = cache[names[0]].float(), cache[names[1]].float()                    # [n, H, T, T]
    t = torch.arange(1, tokens.shape[1], device=tokens.device)
    prev = p0[:, :, t, t - 1].mean((0, 2))                                       # [H]
    q = torch.arange(length + 1, 2 * length + 1, device=tokens.device)
    ind = p1[:, :, q, q - length + 1].mean((0, 2))                               # [H]
    logp = logits.float().log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)             # nll[:, i]: predicting token i+1
    first = nll[:, 1:length].mean()                                             # predictions of R[1..] in copy 1
    second = nll[:, length + 1:2 * length].mean()                               # predictions of R[1..] in copy 2
    best = int(prev.argmax())

    def zero_head(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z[:, :, best] = 0.0
        return z

    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)]).float()
    nll_abl = -ablated.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    out = {"prev_token_score": float(prev.max()), "induction_score": float(ind.max()),
           "second_copy_loss": float(second), "first_copy_loss": float(first),
           "prev_head_ablated_loss": float(nll_abl[:, length + 1:2 * length].mean())}
    out.update({f"prev_token_score.a0.h{h}": float(v) for h, v in enumerate(prev)})
    out.update({f"induction_score.a1.h{h}": float(v) for h, v in enumerate(ind)})
    return out


MEASURES: dict[str, Callable[..., dict[str, float]]] = {
    "induction": measure_induction,
    "ioi": measure_ioi,
    "greater_than": measure_greater_than,
    "dyck": measure_dyck,
}

__all__ = ["MEASURES", "EVAL_SEED", "measure_induction", "measure_ioi", "measure_greater_than", "measure_dyck",
           "repeated_tokens"]
