"""LLM explainers: a unit's exemplars -> a prompt (Bills et al. 2023 or delphi, Paulo et al. 2024) -> one
short description, through :class:`~explainers.llm.client.LLMClient` (cached, retried, concurrent).

A reply that does not parse after the client's attempts becomes an :class:`Explanation` with ``text=None``
and the reason in ``failed``; it is never an empty description.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from explainers.llm import prompts
from explainers.llm.client import LLMClient, chat_text
from explainers.llm.records import ActivationRecord, Explanation

STYLES = ("bills", "delphi")


def _parse(reply: dict) -> str:
    return prompts.parse_explanation(chat_text(reply))


class LLMExplainer:
    """``style`` ``bills`` (token<TAB>level lines, levels 0-10) or ``delphi`` (``<<highlighted>>`` text);
    greedy decoding (``temperature`` 0) of at most ``max_tokens`` tokens."""

    def __init__(self, client: LLMClient, *, style: str = "bills", max_tokens: int = 64, temperature: float = 0.0,
                 min_level: int = 1):
        if style not in STYLES:
            raise ValueError(f"unknown explainer prompt style {style!r}; choose one of {', '.join(STYLES)}")
        self.client, self.style, self.max_tokens, self.temperature = client, style, max_tokens, temperature
        self.min_level = min_level
        self.fmt = prompts.FORMATS[style]

    @property
    def name(self) -> str:
        return f"llm:{self.style}:{self.client.model}"

    def messages(self, records: Sequence[ActivationRecord]) -> list[dict[str, str]]:
        if not records:
            raise ValueError("no exemplars to explain")
        if self.style == "bills":
            return prompts.bills_explainer_messages(records)
        return prompts.delphi_explainer_messages(records, min_level=self.min_level)

    async def aexplain(self, unit: str, records: Sequence[ActivationRecord]) -> Explanation:
        if not records:
            raise ValueError(f"unit {unit}: no exemplars to explain")
        reply = await self.client.chat(self.messages(records), fmt=self.fmt, parse=_parse,
                                       max_tokens=self.max_tokens, temperature=self.temperature)
        meta = {"format": self.fmt, "model": self.client.model, "attempts": reply.attempts,
                "cached": reply.cached}
        if not reply.ok:
            meta["reply"] = (reply.text or "")[:500]
        return Explanation(unit=unit, text=reply.value, explainer=self.name, failed=reply.failed,
                           exemplar_ids=tuple(r.id for r in records), meta=meta)

    def explain(self, unit: str, records: Sequence[ActivationRecord]) -> Explanation:
        return asyncio.run(self.client.gather([self.aexplain(unit, records)], progress=False))[0]

    def explain_many(self, units: Mapping[str, Sequence[ActivationRecord]], *, progress: bool = True
                     ) -> dict[str, Explanation]:
        """All units concurrently (bounded by the client's concurrency), results keyed by unit."""
        names = list(units)
        out = self.client.run([self.aexplain(u, units[u]) for u in names], desc="explain", progress=progress)
        return dict(zip(names, out, strict=True))
