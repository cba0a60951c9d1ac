"""Every prompt the LLM side sends, in one place, each with a version that is part of its cache key.

Formats (change a prompt -> bump its version, so cached replies of the old prompt are never reused):

``bills-v1`` (explainer; Bills et al. 2023, "Language models can explain neurons in language models")
    Chat. Each exemplar as ``token<TAB>activation`` lines between ``<start>`` and ``<end>``, activations
    discretised to integers 0-10 relative to the largest activation over all records shown
    (``round(10 * max(a, 0) / max_a)``), then the same lines with the zeros left out. The model replies
    ``Explanation: <phrase>``.
``delphi-v1`` (explainer; Paulo et al. 2024, "Automatically interpreting millions of features in LLMs",
    EleutherAI's delphi) Chat. Each exemplar as text with the active tokens (level >= ``min_level`` on the
    same 0-10 scale) highlighted ``<<like this>>`` (consecutive active tokens share one pair), followed by
    the list of (token, level) pairs; the reply's last line is ``[EXPLANATION]: <phrase>``.
``sim-v1`` (simulator, all tokens at once; Bills et al.'s "all at once" simulator)
    Plain completion prompt: instructions, one worked example, then the explanation and the record as
    ``token<TAB>unknown`` lines. Sent with ``echo=True, max_tokens=0, logprobs=k``; the top-k log-probs at
    the position of each ``unknown`` are the model's distribution over the activation it would write there.
    **Scale:** the simulator writes one digit, levels 0-9. Bills et al. use 0-10, but many tokenizers
    (SmolLM2's, Llama's) split "10" into "1" "0", so a 0-10 scale has no single token for 10 and "1" would
    mean both 1 and the start of 10. Ten levels 0-9 are each one token in every common tokenizer; the
    correlation score is unchanged by the affine rescaling.
``sim-token-v1`` (simulator, one token at a time; the fallback for endpoints without prompt log-probs)
    Chat. The explanation, the record's text with the target token highlighted ``<<like this>>``, and the
    question "which level 0-9?"; read from the first reply token's top log-probs (or its digit when the
    endpoint gives no log-probs).
``detection-v1`` / ``fuzzing-v1`` (delphi's detection and fuzzing scorers)
    Chat. A batch of numbered examples; the model answers a Python list of 0/1: detection, whether each
    example shows the explained feature at all; fuzzing, whether the highlighted tokens of each example
    are the ones the explanation describes.

Tokens are rendered with ``\\n`` and ``\\t`` escaped, so a token never breaks the line format.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from explainers.llm.records import ActivationRecord

FORMATS = {
    "bills": "bills-v1",
    "delphi": "delphi-v1",
    "simulation": "sim-v1",
    "simulation-token": "sim-token-v1",
    "detection": "detection-v1",
    "fuzzing": "fuzzing-v1",
}

EXPLAINER_MAX_LEVEL = 10
SIM_LEVELS: tuple[str, ...] = tuple(str(i) for i in range(10))  # one token each: see "Scale" above
PLACEHOLDER = "unknown"
MAX_EXPLANATION_WORDS = 40


def render_token(token: str) -> str:
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def discretise(records: Sequence[ActivationRecord], max_level: int = EXPLAINER_MAX_LEVEL) -> list[list[int]]:
    """Integer levels ``floor(max_level * max(a, 0) / m + 1/2)`` (halves round up), m the largest activation over all records (all 0
    when m <= 0): Bills et al.'s normalisation for the explainer prompt."""
    m = max(r.max_activation for r in records)
    if m <= 0:
        return [[0] * len(r.tokens) for r in records]
    return [[int(math.floor(max_level * max(a, 0.0) / m + 0.5)) for a in r.activations] for r in records]


# ----------------------------------------------------------------------------------------------- explainers
_BILLS_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Look at the parts of the document the neuron activates for and summarize in a single short "
    "phrase what the neuron is looking for. Don't list examples of words.\n\n"
    "The activation format is token<tab>activation. Activation values range from 0 to 10. A neuron finding "
    "what it's looking for is represented by a non-zero activation value. The higher the activation value, "
    "the stronger the match.\n\nReply with one line: Explanation: <a short phrase>")


def bills_explainer_messages(records: Sequence[ActivationRecord]) -> list[dict[str, str]]:
    """``bills-v1``: the records with 0-10 activations, then the non-zero ones again (Bills et al. 2023)."""
    levels = discretise(records)
    blocks, nonzero = [], []
    for r, lv in zip(records, levels, strict=True):
        lines = "\n".join(f"{render_token(t)}\t{v}" for t, v in zip(r.tokens, lv, strict=True))
        blocks.append(f"<start>\n{lines}\n<end>")
        nz = "\n".join(f"{render_token(t)}\t{v}" for t, v in zip(r.tokens, lv, strict=True) if v > 0)
        nonzero.append(f"<start>\n{nz}\n<end>" if nz else "<start>\n<end>")
    user = ("Neuron\nActivations:\n" + "\n".join(blocks) + "\n\nSame activations, but with all zeros filtered out:\n"
            + "\n".join(nonzero) + "\n\nExplanation of neuron behavior: the main thing this neuron does is find")
    return [{"role": "system", "content": _BILLS_SYSTEM}, {"role": "user", "content": user}]


_DELPHI_SYSTEM = (
    "You are a meticulous AI researcher conducting an important investigation into patterns found in language. "
    "Your task is to analyze text and provide an explanation that thoroughly encapsulates possible patterns "
    "found in it.\nGuidelines:\nYou will be given a list of text examples on which special words are selected "
    "and between delimiters like <<this>>. If a sequence of consecutive tokens all are important, the entire "
    "sequence of tokens will be contained between delimiters <<just like this>>. How important each token is "
    "for the behavior is listed after each example in parentheses.\n"
    "- Produce a concise final description. Simply describe the text features that are common in the examples.\n"
    "- Do not mention the marker tokens (<< >>) in your explanation.\n"
    "- Do not make lists of possible explanations. Keep your explanation short and concise.\n"
    "- The last line of your response must be the formatted explanation, using [EXPLANATION]:")


def highlight(tokens: Sequence[str], active: Sequence[bool]) -> str:
    """Text of ``tokens`` with each run of active tokens wrapped in ``<<`` ``>>`` (delphi's format)."""
    out, inside = [], False
    for t, a in zip(tokens, active, strict=True):
        if a and not inside:
            out.append("<<")
        if not a and inside:
            out.append(">>")
        inside = a
        out.append(render_token(t))
    if inside:
        out.append(">>")
    return "".join(out)


def delphi_explainer_messages(records: Sequence[ActivationRecord], min_level: int = 1) -> list[dict[str, str]]:
    """``delphi-v1``: highlighted examples with (token, level) lists (Paulo et al. 2024)."""
    levels = discretise(records)
    parts = []
    for i, (r, lv) in enumerate(zip(records, levels, strict=True), start=1):
        active = [v >= min_level for v in lv]
        pairs = ", ".join(f"({render_token(t)}, {v})" for t, v, a in zip(r.tokens, lv, active, strict=True) if a)
        parts.append(f"Example {i}: {highlight(r.tokens, active)}\nActivations: {pairs or '(none)'}")
    return [{"role": "system", "content": _DELPHI_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(\s|$)")
_MARKERS = re.compile(r"\[EXPLANATION\]:|Explanation:|the main thing this neuron does is find", re.IGNORECASE)


def parse_explanation(text: str | None) -> str:
    """The explanation in a reply: the first line after the last marker (``[EXPLANATION]:``,
    ``Explanation:``) or, without one, the last non-empty line that holds a whole sentence (else the last
    line: a reply cut at ``max_tokens`` ends in a fragment); its first sentence, stripped of quotes and a
    trailing full stop. Raises ``ValueError``
    with the reason when there is none: empty, longer than ``MAX_EXPLANATION_WORDS`` words, or echoing the
    prompt's record format."""
    if text is None or not text.strip():
        raise ValueError("empty reply")
    found = list(_MARKERS.finditer(text))
    body = text[found[-1].end():] if found else text
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    if not lines:
        raise ValueError("nothing after the explanation marker")
    if found:
        expl = lines[0]
    else:  # the last line holding a whole sentence: a reply cut at max_tokens ends in a fragment
        whole = [ln for ln in lines if _SENTENCE_END.search(ln)]
        expl = (whole or lines)[-1]
    expl = expl.strip().strip("\"'*` ")
    expl = re.split(r"(?<=[.!?])\s", expl, maxsplit=1)[0].rstrip(".").strip()  # the first sentence
    if not expl:
        raise ValueError("empty explanation")
    if "<start>" in expl or "<end>" in expl or "\t" in expl:
        raise ValueError(f"reply echoes the record format: {expl[:60]!r}")
    n = len(expl.split())
    if n > MAX_EXPLANATION_WORDS:
        raise ValueError(f"explanation of {n} words (more than {MAX_EXPLANATION_WORDS})")
    return expl


# ------------------------------------------------------------------------------------------------ simulator
_SIM_HEADER = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Look at an explanation of what the neuron does, and try to predict its activations on each "
    "token.\n\nThe activation format is token<tab>activation, activations go from 0 to 9, \"unknown\" "
    "indicates an unknown activation. Most activations will be 0.\n\n")
_SIM_EXAMPLE = (
    ("words for animals", ("The", " dog", " and", " the", " cat", " sat", " on", " a", " mat", "."),
     (0, 9, 0, 0, 8, 0, 0, 0, 0, 0)),
)


def simulation_prompt(explanation: str, tokens: Sequence[str]) -> tuple[str, list[int]]:
    """``sim-v1``: the completion prompt and the character offset of each token's ``unknown`` placeholder
    (match them to the echoed tokens' ``text_offset``)."""
    parts = [_SIM_HEADER]
    for n, (expl, toks, acts) in enumerate(_SIM_EXAMPLE, start=1):
        lines = "\n".join(f"{render_token(t)}\t{a}" for t, a in zip(toks, acts, strict=True))
        parts.append(f"Neuron {n}\nExplanation of neuron {n} behavior: the main thing this neuron does is find "
                     f"{expl}\nActivations:\n<start>\n{lines}\n<end>\n\n")
    n = len(_SIM_EXAMPLE) + 1
    parts.append(f"Neuron {n}\nExplanation of neuron {n} behavior: the main thing this neuron does is find "
                 f"{explanation.strip()}\nActivations:\n<start>\n")
    prompt = "".join(parts)
    offsets = []
    for t in tokens:
        prompt += render_token(t) + "\t"
        offsets.append(len(prompt))
        prompt += PLACEHOLDER + "\n"
    prompt += "<end>\n"
    return prompt, offsets


_SIM_TOKEN_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Given an explanation of what the neuron does, predict how strongly it activates on one token "
    "of a text, on a scale from 0 (not at all) to 9 (maximally). Most activations are 0. Reply with one digit.")


def token_simulation_messages(explanation: str, tokens: Sequence[str], index: int) -> list[dict[str, str]]:
    """``sim-token-v1``: one question per token (the fallback simulator)."""
    text = highlight(tokens, [i == index for i in range(len(tokens))])
    user = (f"Explanation: the main thing this neuron does is find {explanation.strip()}\n\nText: {text}\n\n"
            f"Activation (0-9) on the highlighted token <<{render_token(tokens[index])}>>:")
    return [{"role": "system", "content": _SIM_TOKEN_SYSTEM}, {"role": "user", "content": user}]


# ------------------------------------------------------------------------------------- detection / fuzzing
_DETECTION_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given a certain feature of text, "
    "such as \"male pronouns\" or \"text with negative sentiment\". You will then be given several text "
    "examples. Your task is to determine which examples possess the feature.\nFor each example in turn, return "
    "1 if the sentence possesses the feature or 0 if it does not. You must return your response as a valid "
    "Python list, such as [1, 0, 0]. Do not return anything else besides a Python list.")
_FUZZING_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given a certain feature of text, "
    "such as \"male pronouns\" or \"text with negative sentiment\". You will be given a few examples of text "
    "that contain this feature. Portions of the sentence which strongly represent this feature are between "
    "tokens << and >>. Some examples might be mislabeled. Your task is to determine if every single token "
    "within << and >> is correctly labeled.\nFor each example in turn, return 1 if the sentence is correctly "
    "labeled or 0 if the tokens are mislabeled. You must return your response as a valid Python list, such as "
    "[1, 0, 0]. Do not return anything else besides a Python list.")


def detection_messages(explanation: str, texts: Sequence[str]) -> list[dict[str, str]]:
    """``detection-v1`` (delphi): does each example show the feature at all?"""
    body = "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts))
    return [{"role": "system", "content": _DETECTION_SYSTEM},
            {"role": "user", "content": f"Feature explanation: {explanation.strip()}\n\nText examples:\n\n{body}"}]


def fuzzing_messages(explanation: str, highlighted: Sequence[str]) -> list[dict[str, str]]:
    """``fuzzing-v1`` (delphi): are the highlighted tokens of each example the ones the explanation means?"""
    body = "\n".join(f"Example {i}: {t}" for i, t in enumerate(highlighted))
    return [{"role": "system", "content": _FUZZING_SYSTEM},
            {"role": "user", "content": f"Feature explanation: {explanation.strip()}\n\nText examples:\n\n{body}"}]


_LIST = re.compile(r"\[([\s\d,]*)\]")


def parse_binary_list(text: str | None, n: int) -> list[int]:
    """The first Python list of ``n`` zeros and ones in a reply; ``ValueError`` with the reason otherwise."""
    if text is None or not text.strip():
        raise ValueError("empty reply")
    lists = _LIST.findall(text)
    if not lists:
        raise ValueError(f"no list of 0/1 in the reply: {text.strip()[:60]!r}")
    for body in lists:
        items = [s.strip() for s in body.split(",") if s.strip()]
        if len(items) == n and all(s in ("0", "1") for s in items):
            return [int(s) for s in items]
    raise ValueError(f"no list of {n} zeros and ones in the reply: {text.strip()[:60]!r}")
