"""Simulation scoring (Bills et al. 2023, "Language models can explain neurons in language models").

A simulator LLM reads the explanation and predicts the unit's activation on every token of each held-out
record; the score (metric ``pearson``, :mod:`evals.explanation_scores`) is the correlation between predicted
and true activations over all tokens of all records concatenated.

Prediction of one token = the expected value of the simulator's distribution over the levels 0-9
(:data:`~explainers.llm.prompts.SIM_LEVELS`; why 0-9 and not 0-10: see :mod:`explainers.llm.prompts`):
``sum_k k p(k) / sum_k p(k)`` over the level tokens among the top-k log-probs (a token counts for level k when
its text, whitespace stripped, is the digit k). A position where no level token is among the top k gets 0,
the value Bills et al.'s reference code gives an empty distribution; their number is kept in
``meta["positions_without_level"]``.

Modes:
- ``prompt-logprobs`` (all tokens at once): one completion per record with ``echo=True, max_tokens=0,
  logprobs=k`` (vLLM and other servers of the legacy completions API return the prompt's log-probs); the
  distribution at each ``unknown`` placeholder of the ``sim-v1`` prompt is read through ``text_offset``.
- ``per-token`` (fallback; e.g. OpenAI chat models): one chat request per token (``sim-token-v1``,
  ``max_tokens=1, top_logprobs=k``): the first reply token's top log-probs, or its digit when the endpoint
  gives no log-probs.
- ``auto``: ``prompt-logprobs``, switching to ``per-token`` for good when the endpoint refuses echo or
  returns no prompt log-probs.
A record whose simulation fails (reply does not parse after the client's attempts) is left out and listed
in ``meta["failed_records"]``; when every record fails the output is a failure.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from functools import partial

from explainers.llm import prompts
from explainers.llm.client import LLMClient, LLMReply, LLMRequestError
from explainers.llm.records import ActivationRecord, Explanation
from explainers.scoring.base import Scorer, ScorerOutput, register

logger = logging.getLogger(__name__)
MODES = ("auto", "prompt-logprobs", "per-token")
NO_PROMPT_LOGPROBS = "endpoint returned no prompt log-probs"


def expected_level(top_logprobs: Mapping[str, float] | None, levels: Sequence[str] = prompts.SIM_LEVELS
                   ) -> float | None:
    """Expected level under the renormalised probabilities of the level tokens in ``top_logprobs``
    ({token text: log-prob}); ``None`` when none is present."""
    if not top_logprobs:
        return None
    value = {s: float(k) for k, s in enumerate(levels)}
    total = weighted = 0.0
    for token, lp in top_logprobs.items():
        k = value.get(str(token).strip())
        if k is None or lp is None:
            continue
        p = math.exp(float(lp))
        total += p
        weighted += k * p
    return None if total == 0 else weighted / total


def _placeholder_tokens(tokens: Sequence[str], n: int) -> list[int] | None:
    """The last ``n`` echoed tokens that are the placeholder right after a tab, in order; ``None`` if fewer.

    The fallback when ``text_offset`` does not line up with the prompt's characters: vLLM accumulates the
    offsets over tokens decoded one by one, and a character split over byte-level tokens (``\ufffd``, any
    non-ASCII character the tokenizer splits) decodes to ``""`` there, so every later offset is short. The
    placeholders are the prompt's last ``n`` tab-preceded ``unknown`` tokens (record tokens are rendered with
    tabs escaped, and the header's ``"unknown"`` follows no tab)."""
    found = [i for i in range(1, len(tokens)) if tokens[i] == prompts.PLACEHOLDER and tokens[i - 1].endswith("\t")]
    return found[-n:] if n and len(found) >= n else None


def parse_echo_logprobs(reply: Mapping, offsets: Sequence[int]) -> tuple[list[float], int]:
    """Predictions from an ``echo=True`` completions reply: for each placeholder offset, the expected level at
    the echoed token starting there (when the offsets do not line up, the placeholder tokens found by
    :func:`_placeholder_tokens`). Returns (predictions, positions without any level token)."""
    try:
        lp = reply["choices"][0]["logprobs"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a completions reply ({type(e).__name__})") from e
    if not lp or not lp.get("top_logprobs") or not lp.get("text_offset"):
        raise ValueError(NO_PROMPT_LOGPROBS)
    index = {int(o): i for i, o in enumerate(lp["text_offset"])}
    positions = [index.get(int(off)) for off in offsets]
    if None in positions:
        positions = _placeholder_tokens(lp.get("tokens") or [], len(offsets))
        if positions is None:
            off = next(o for o in offsets if int(o) not in index)
            raise ValueError(f"no echoed token starts at the placeholder at character {off} (the endpoint's "
                             "tokenizer merged it with its neighbour)")
    preds, missing = [], 0
    for i in positions:
        ev = expected_level(lp["top_logprobs"][i])
        if ev is None:
            missing += 1
            ev = 0.0
        preds.append(ev)
    return preds, missing


def parse_first_token_level(reply: Mapping) -> float:
    """Prediction from a one-token chat reply: expected level over the first token's top log-probs, else the
    digit the reply starts with."""
    try:
        choice = reply["choices"][0]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a chat reply ({type(e).__name__})") from e
    content = ((choice.get("logprobs") or {}).get("content")) or []
    if content and content[0].get("top_logprobs"):
        ev = expected_level({t["token"]: t["logprob"] for t in content[0]["top_logprobs"]})
        if ev is not None:
            return ev
    text = ((choice.get("message") or {}).get("content") or "").strip()
    if text[:1] in prompts.SIM_LEVELS:
        return float(text[0])
    raise ValueError(f"no level 0-9 in the reply {text[:30]!r}")


@register
class SimulationScorer(Scorer):
    """Bills et al.'s explain-simulate-score; see the module docstring."""

    name = "simulation"
    metric = "pearson"
    needs_llm = True

    def __init__(self, client: LLMClient, *, mode: str = "auto", top_logprobs: int = 20):
        if mode not in MODES:
            raise ValueError(f"unknown simulation mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 1 <= top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in 1..20 (vLLM's default cap), got {top_logprobs}")
        self.client, self.mode, self.top_logprobs = client, mode, top_logprobs

    async def _score(self, explanation: Explanation, held_out: Sequence[ActivationRecord]) -> ScorerOutput:
        assert explanation.text is not None
        results = await asyncio.gather(*(self.simulate(explanation.text, r.tokens) for r in held_out))
        preds, actual, ids, failed, missing = [], [], [], {}, 0
        for r, (p, miss, why) in zip(held_out, results, strict=True):
            if p is None:
                failed[r.id or str(len(failed))] = why
                continue
            preds.append(p)
            actual.append(r.activations)
            ids.append(r.id)
            missing += miss
        meta = {"mode": self.mode, "format": prompts.FORMATS["simulation" if self.mode != "per-token"
                                                             else "simulation-token"],
                "model": self.client.model, "positions_without_level": missing, "failed_records": failed}
        if not preds:
            return self.failure(explanation, f"every simulation failed: {next(iter(failed.values()))}", **meta)
        return self.output(explanation, preds, actual, ids, **meta)

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> tuple[list[float] | None, int, str]:
        """(predictions or None, positions without a level token, failure reason) for one record."""
        if self.mode in ("auto", "prompt-logprobs"):
            prompt, offsets = prompts.simulation_prompt(explanation, tokens)
            try:
                reply: LLMReply = await self.client.completion(
                    prompt, fmt=prompts.FORMATS["simulation"], parse=partial(parse_echo_logprobs, offsets=offsets),
                    echo=True, logprobs=self.top_logprobs, max_tokens=0, parse_retries=0)
            except LLMRequestError as e:
                if self.mode == "prompt-logprobs":
                    raise
                logger.warning("endpoint refused prompt log-probs (%s); simulating one token at a time", e)
                self.mode = "per-token"
            else:
                if reply.ok:
                    preds, missing = reply.value
                    return preds, missing, ""
                if self.mode == "prompt-logprobs" or reply.failed != NO_PROMPT_LOGPROBS:
                    return None, 0, str(reply.failed)
                logger.warning("endpoint returned no prompt log-probs; simulating one token at a time")
                self.mode = "per-token"
        replies = await asyncio.gather(*(
            self.client.chat(prompts.token_simulation_messages(explanation, tokens, i),
                             fmt=prompts.FORMATS["simulation-token"], parse=parse_first_token_level,
                             max_tokens=1, top_logprobs=self.top_logprobs)
            for i in range(len(tokens))))
        bad = [r for r in replies if not r.ok]
        if bad:
            return None, 0, f"{len(bad)} of {len(replies)} tokens: {bad[0].failed}"
        return [float(r.value) for r in replies], 0, ""
