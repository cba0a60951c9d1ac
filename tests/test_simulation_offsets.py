"""The simulator's echo parsing when vLLM's text_offset does not line up with the prompt: a character split over
byte-level tokens decodes to "" token by token, so every later offset is one short (seen on smollm2-135m with a
vocabulary explanation ending in U+FFFD). The placeholders are then found as the tab-preceded "unknown" tokens."""

from __future__ import annotations

import math

import pytest

from explainers.llm import prompts
from explainers.scoring.simulation import parse_echo_logprobs


def _echo(prompt: str, pieces: list[str], tops: dict[int, dict[str, float]]) -> dict:
    """A vLLM-style echo reply for ``pieces`` (the prompt's tokens as vLLM decodes them one by one), offsets
    accumulated over the decoded pieces as vLLM does."""
    offsets, pos = [], 0
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    lp = {"tokens": pieces, "text_offset": offsets,
          "top_logprobs": [None if i == 0 else tops.get(i, {"<": 0.0}) for i in range(len(pieces))]}
    return {"choices": [{"text": prompt, "logprobs": lp}]}


def _pieces(prompt: str) -> list[str]:
    """Split the prompt into tab / 'unknown' / other pieces (a stand-in tokenizer that keeps placeholders whole)."""
    out, rest = [], prompt
    while rest:
        for special in ("\t", prompts.PLACEHOLDER):
            if rest.startswith(special):
                out.append(special)
                rest = rest[len(special):]
                break
        else:
            nxt = min([k for k in (rest.find("\t"), rest.find(prompts.PLACEHOLDER)) if k > 0] or [len(rest)])
            out.append(rest[:nxt])
            rest = rest[nxt:]
    return out


def test_placeholders_found_when_offsets_are_short_after_a_split_character():
    tokens = [" Mary", " left", "."]
    prompt, offsets = prompts.simulation_prompt("names, \ufffd", tokens)
    pieces = _pieces(prompt)
    # the explanation's U+FFFD comes as two byte tokens, the first decoding to "" (vLLM): later offsets shift by 1
    k = next(i for i, p in enumerate(pieces) if "\ufffd" in p)
    head, tail = pieces[k].split("\ufffd", 1)
    pieces[k:k + 1] = [head, "", tail] if head else ["", tail]
    assert "".join(pieces) != prompt and len("".join(pieces)) == len(prompt) - 1
    placeholders = [i for i in range(1, len(pieces)) if pieces[i] == "unknown" and pieces[i - 1] == "\t"]
    assert len(placeholders) == 3
    tops = {placeholders[0]: {"0": math.log(0.5), "4": math.log(0.5)},   # 2.0
            placeholders[1]: {"9": 0.0},                                  # 9.0
            placeholders[2]: {"x": 0.0}}                                  # no level: 0, counted missing
    preds, missing = parse_echo_logprobs(_echo(prompt, pieces, tops), offsets)
    assert preds == pytest.approx([2.0, 9.0, 0.0]) and missing == 1


def test_offsets_that_line_up_are_used_as_before():
    tokens = ["a", "\tb"]  # a record tab is escaped, so it is no placeholder's tab
    prompt, offsets = prompts.simulation_prompt("x", tokens)
    pieces = _pieces(prompt)
    tops = {i: {"7": 0.0} for i, p in enumerate(pieces) if p == "unknown"}
    preds, _ = parse_echo_logprobs(_echo(prompt, pieces, tops), offsets)
    assert preds == [7.0, 7.0]
    # shifted offsets and too few placeholder tokens: the one-line error naming a placeholder's character
    reply = _echo(prompt, pieces[:-4] + ["".join(pieces[-4:])], tops)
    reply["choices"][0]["logprobs"]["text_offset"] = [o + 1 for o in reply["choices"][0]["logprobs"]["text_offset"]]
    with pytest.raises(ValueError, match=r"no echoed token starts at the placeholder at character \d+"):
        parse_echo_logprobs(reply, offsets)
