"""The zoo's shared word-level tokenizer.

All zoo models share one vocabulary so that their circuits (and later their explanations) can be
compared token for token. The tokenizer is a HuggingFace ``tokenizers`` word-level model built
deterministically from :mod:`circuits.tasks.vocab`:

* special tokens ``<bos> <eos> <pad> <unk>`` (ids 0-3); encoding with special tokens prepends ``<bos>``;
* every word of every task template, the one-token names, places, objects, greater-than nouns, the
  generic induction words, brackets and punctuation, each in two forms like GPT-2's byte-level BPE:
  ``▁word`` (preceded by a space) and ``word`` (at the start of the text or glued to the previous token);
* the two-digit years ``00``..``99`` in both forms, so ``"from the year 1732"`` tokenizes as
  ``▁from ▁the ▁year ▁17 32`` exactly as GPT-2 splits it (`` 17`` + ``32``).

Spaces are kept as ``▁`` and the decoder turns them back, so ``decode(encode(text)) == text`` for any text
made of vocabulary words separated by single spaces. A word outside the vocabulary becomes ``<unk>``.
TransformerLens can only use a tokenizer loaded from disk, so :func:`save_tokenizer` writes
``tokenizer.json`` and ``tokenizer_config.json`` (with a chat template) and callers reload it with
``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from circuits.tasks import vocab

SPECIAL_TOKENS: tuple[str, ...] = ("<bos>", "<eos>", "<pad>", "<unk>")
SPACE = "▁"
#: Pre-tokenizer pattern: a word, a two-digit number or one other character, each with an optional space.
SPLIT_PATTERN = rf"{SPACE}?[A-Za-z]+|{SPACE}?\d\d|{SPACE}?[^{SPACE}A-Za-z0-9]"
#: Plain concatenation of the messages after ``<bos>``: the zoo models were never trained to chat, but
#: servers such as vLLM need a template to serve chat completions.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if not loop.first %} {% endif %}"
    "{{ message['content'] }}{% endfor %}"
)


def template_words() -> list[str]:
    """Words written by the task templates themselves (placeholders removed)."""
    words: list[str] = []
    for t in (*vocab.IOI_TEMPLATES, vocab.GT_TEMPLATE):
        text = re.sub(r"\{[A-Z]+\}", " ", t)
        words += re.findall(r"[A-Za-z]+", text)
    return words


def vocabulary() -> list[str]:
    """The token strings in id order (deterministic)."""
    base = [*template_words(), *vocab.NAMES, *vocab.PLACES, *vocab.OBJECTS, *vocab.GT_NOUNS,
            *vocab.INDUCTION_WORDS, *(b for pair in vocab.BRACKETS for b in pair), *vocab.PUNCTUATION,
            *vocab.YEARS]
    tokens = list(SPECIAL_TOKENS)
    for w in dict.fromkeys(base):
        tokens += [w, SPACE + w]
    return list(dict.fromkeys(tokens))


def build_tokenizer(model_max_length: int = 64):
    """The zoo tokenizer as an in-memory ``PreTrainedTokenizerFast`` (save it before giving it to a bridge)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {t: i for i, t in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", ids["<bos>"])])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=model_max_length)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(directory: str | Path, model_max_length: int = 64) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with ``chat_template``) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer(model_max_length).save_pretrained(str(directory))
    # transformers 5 writes the template to chat_template.jinja; older readers (vLLM's pinned
    # transformers) look in tokenizer_config.json, so keep it there and only there.
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
                "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
                "add_bos_token": True, "add_eos_token": False})
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return directory


def load_saved_tokenizer(directory: str | Path):
    """``AutoTokenizer.from_pretrained(directory)`` (the form TransformerLens accepts)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
