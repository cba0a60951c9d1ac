"""``zoo check`` for pretrained models (:mod:`circuits.pretrained`): task figures on real-English prompts.

A pretrained model has no training recipe and no thresholds: the figures are measured and reported,
whatever they are, on held-out seeds (``EVAL_SEED``; tasks elsewhere default to seed 0). Prompts come from
the task generators given the model's tokenizer (:mod:`circuits.tasks.lexicon`), are tokenized by
:meth:`Task.batch` exactly as discovery tokenizes them (the tokenizer's BOS token first), and run through
the ``TransformerBridge`` in batches of ``batch_size`` prompts.

Figures, per task ``ioi``, ``greater_than``, ``induction``, ``dyck``:

* ``T.accuracy``: the answer is the arg-max token; ``T.preference``: fraction with logit(answer) >
  logit(wrong); ``T.logit_diff`` / ``T.corrupt_logit_diff``: mean logit(answer) - logit(wrong) on the clean and
  corrupted prompts.
* ``greater_than.prob_diff`` (Hanna et al. 2023): sum_{y > YY} p(y) - sum_{y < YY} p(y) over the year tokens
  the tokenizer predicts next: two-digit years ``00``..``99`` (``y <= YY`` counts as below there, as in
  the paper), or, digit by digit, the ten digits compared with the tens digit of ``YY`` (equal excluded).
* ``induction.first_copy_loss`` / ``induction.second_copy_loss``: mean next-token loss on the first and the
  second copy of ``BOS + R + R`` (R = 20 distinct one-token words; Olsson et al. 2022): a model with
  induction heads predicts the second copy far better.
"""

from __future__ import annotations

import math
import random
import re
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from circuits.tasks import get_task
from circuits.tasks.base import encode
from circuits.tasks.greater_than import year_mode
from circuits.tasks.induction import induction_words
from circuits.zoo.measure import EVAL_SEED
from patching.metrics import gather_pos

TASK_NAMES = ("ioi", "greater_than", "induction", "dyck")


@torch.no_grad()
def _logits_at(model: Any, tokens: torch.Tensor, pos: torch.Tensor, batch_size: int,
               bar: Any = None) -> torch.Tensor:
    """Float32 logits at ``pos`` for each row, computed ``batch_size`` rows at a time (bounded memory)."""
    out = []
    for i in range(0, len(tokens), batch_size):
        out.append(gather_pos(model(tokens[i:i + batch_size]), pos[i:i + batch_size]).float())
        if bar is not None:
            bar.update(1)
    return torch.cat(out)


def measure_task(model: Any, tokenizer: Any, name: str, n: int, seed: int, batch_size: int,
                 bar: Any = None) -> dict[str, float]:
    """Accuracy, preference and logit differences of task ``name`` (prompts for ``tokenizer``)."""
    task = get_task(name, n=n, seed=seed, tokenizer=tokenizer)
    b = task.batch(tokenizer, model.cfg.device)
    if bar is not None:
        bar.set_description(name)
    clean = _logits_at(model, b.clean, b.pos, batch_size, bar)
    corrupt = _logits_at(model, b.corrupt, b.pos, batch_size, bar)

    def ld(lg: torch.Tensor) -> torch.Tensor:
        return (lg.gather(-1, b.answer[:, None]) - lg.gather(-1, b.wrong[:, None])).squeeze(-1)

    out = {f"{name}.accuracy": float((clean.argmax(-1) == b.answer).float().mean()),
           f"{name}.preference": float((ld(clean) > 0).float().mean()),
           f"{name}.logit_diff": float(ld(clean).mean()), f"{name}.corrupt_logit_diff": float(ld(corrupt).mean())}
    if name == "greater_than":
        out["greater_than.prob_diff"] = _prob_diff(task, tokenizer, clean)
    return out


def _prob_diff(task: Any, tokenizer: Any, logits: torch.Tensor) -> float:
    """Hanna et al.'s probability difference in the tokenizer's year mode (see the module docstring)."""
    yy = torch.tensor([int(re.findall(r"\d{4}", p.clean)[0][2:]) for p in task.pairs], device=logits.device)
    if year_mode(tokenizer) == "digit":
        ids = [encode(tokenizer, str(d), prepend_bos=False)[0] for d in range(10)]
        values, threshold = torch.arange(10, device=logits.device), yy // 10
        above = values[None, :] > threshold[:, None]
        below = values[None, :] < threshold[:, None]
    else:
        ids = [encode(tokenizer, f"{y:02d}", prepend_bos=False)[0] for y in range(100)]
        above = torch.arange(100, device=logits.device)[None, :] > yy[:, None]
        below = ~above
    p = logits.softmax(-1)[:, torch.tensor(ids, device=logits.device)]
    return float(((p * above).sum(-1) - (p * below).sum(-1)).mean())


@torch.no_grad()
def measure_induction_loss(model: Any, tokenizer: Any, n: int, seed: int, length: int = 20,
                           batch_size: int = 16, bar: Any = None) -> dict[str, float]:
    """First- and second-copy next-token loss on ``BOS + R + R`` (R: ``length`` distinct one-token words)."""
    words = induction_words(tokenizer, length)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        r = rng.sample(words, length)
        rows.append(encode(tokenizer, "".join(" " + w for w in r + r)))
    tokens = torch.tensor(rows, device=model.cfg.device)
    nll = []
    for i in range(0, n, batch_size):
        t = tokens[i:i + batch_size]
        logp = model(t).float().log_softmax(-1)
        nll.append(-logp[:, :-1].gather(-1, t[:, 1:, None]).squeeze(-1))     # nll[:, i]: predicting token i+1
        if bar is not None:
            bar.update(1)
    loss = torch.cat(nll)
    return {"induction.first_copy_loss": float(loss[:, 1:length].mean()),
            "induction.second_copy_loss": float(loss[:, length + 1:2 * length].mean())}


def measure_pretrained(model: Any, tokenizer: Any, n: int = 64, seed: int = EVAL_SEED, batch_size: int = 16,
                       progress: bool = False) -> tuple[dict[str, float], dict[str, str]]:
    """Every figure of the module docstring, and ``{task: one-line reason}`` for the tasks the tokenizer
    cannot express (the generator's refusal). ``progress``: a bar over the forward batches, with ETA."""
    figures: dict[str, float] = {}
    refused: dict[str, str] = {}
    n_loss = max(8, n // 4)
    total = 2 * len(TASK_NAMES) * math.ceil(n / batch_size) + math.ceil(n_loss / batch_size)
    with tqdm(total=total, unit="batch", disable=not progress) as bar:
        for name in TASK_NAMES:
            try:
                figures.update(measure_task(model, tokenizer, name, n, seed, batch_size, bar))
            except ValueError as e:
                refused[name] = str(e)
                bar.update(2 * math.ceil(n / batch_size))
        bar.set_description("induction loss")
        try:
            figures.update(measure_induction_loss(model, tokenizer, n=n_loss, seed=seed, batch_size=batch_size,
                                                  bar=bar))
        except ValueError as e:
            refused["induction_loss"] = str(e)
    return figures, refused


def check_pretrained(name: str, device: str | None = None, n: int | None = None, seed: int = EVAL_SEED,
                     batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
    """Load pretrained model ``name`` (converting it on first use) and measure its figures.

    Returns ``{"name", "kind": "pretrained", "passed": True, "figures", "refused", "checks": [], "n", "seed",
    "bos_token", "greater_than_mode", "manifest", "seconds"}``: no thresholds, so ``passed`` only says that
    it ran.
    """
    from circuits.models import load_model
    from circuits.pretrained import get_pretrained, read_manifest

    get_pretrained(name)
    t0 = time.perf_counter()
    model = load_model(name, device=device)
    tok = model.tokenizer
    n = n or 64
    figures, refused = measure_pretrained(model, tok, n=n, seed=seed, batch_size=batch_size, progress=progress)
    try:
        mode: str | None = year_mode(tok)
    except ValueError:
        mode = None
    return {"name": name, "kind": "pretrained", "passed": True,
            "figures": {k: round(v, 6) for k, v in figures.items()}, "refused": refused, "checks": [], "n": n,
            "seed": seed, "bos_token": tok.bos_token, "greater_than_mode": mode, "manifest": read_manifest(name),
            "seconds": round(time.perf_counter() - t0, 2)}


__all__ = ["measure_pretrained", "measure_task", "measure_induction_loss", "check_pretrained", "TASK_NAMES"]
