"""Zoo recipes: everything needed to reproduce a small model, and the figures it must reach.

A :class:`Recipe` names an architecture (``llama`` | ``gpt2`` | ``mamba``) and its HuggingFace config
values, the training-data generator (``circuits/zoo/data.py``), the optimisation settings and seed, and
the :class:`Figure` s that ``circuitexplain zoo check`` re-measures (``circuits/zoo/measure.py``) with
their thresholds. Training is deterministic: the same recipe gives the same weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    """A measured quantity and the bound it must meet (``threshold=None``: reported only)."""

    name: str
    threshold: float | None = None
    higher_is_better: bool = True
    description: str = ""

    def passes(self, value: float) -> bool:
        if self.threshold is None:
            return True
        return value >= self.threshold if self.higher_is_better else value < self.threshold

    def bound(self) -> str:
        if self.threshold is None:
            return "(reported)"
        return f"{'>=' if self.higher_is_better else '<'} {self.threshold:g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Figure:
        return cls(**d)


@dataclass(frozen=True)
class Recipe:
    """How to train one zoo model and what it must achieve.

    Attributes:
        name: zoo name (also the checkpoint directory name).
        architecture: ``llama`` (rotary, RMSNorm, gated MLP), ``gpt2`` (learned positions, LayerNorm)
            or ``mamba`` (selective state space, HF pure-torch path).
        config: HuggingFace config values for the architecture (sizes); vocabulary and special token ids
            come from the shared zoo tokenizer.
        data: training-data generator in :data:`circuits.zoo.data.DATA`.
        measure: figure-measuring function in :data:`circuits.zoo.measure.MEASURES`.
        steps, lr, batch, warmup, weight_decay, seed: AdamW with linear warm-up then cosine decay to
            ``lr / 10``; gradients clipped to norm 1.
        attn_only: zero and freeze the MLP down-projections (Llama only); marked in config.json as
            ``circuitexplain_attn_only: true``.
        restricted_softmax_steps: for this many first steps the loss's softmax covers only the tokens
            the data can produce (see :func:`circuits.zoo.train.loss_fn`).
        n_ctx: context length (``max_position_embeddings`` / ``n_positions``).
        checkpoint_every: save the resumable training state this often.
        figures: what ``zoo check`` measures, with thresholds.
        description: one line for ``zoo list``.
    """

    name: str
    architecture: str
    config: dict[str, Any]
    data: str
    measure: str
    steps: int
    lr: float
    batch: int
    seed: int = 0
    warmup: int = 100
    weight_decay: float = 0.01
    attn_only: bool = False
    figures: tuple[Figure, ...] = ()
    description: str = ""
    n_ctx: int = 64
    checkpoint_every: int = 250
    restricted_softmax_steps: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ("llama", "gpt2", "mamba"):
            raise ValueError(f"recipe {self.name!r}: unknown architecture {self.architecture!r}")
        if self.attn_only and self.architecture != "llama":
            raise ValueError(f"recipe {self.name!r}: attn_only is only implemented for llama")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["figures"] = [f.to_dict() for f in self.figures]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        d = dict(d)
        d["figures"] = tuple(Figure.from_dict(f) for f in d.get("figures", ()))
        return cls(**d)


_ACC = "fraction of held-out prompts whose arg-max next token is the answer"
_LLAMA_128 = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}

RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"zoo recipe {recipe.name!r} registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


register(Recipe(
    name="attn2l-induction", architecture="llama",
    config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16},
    data="induction", measure="induction", steps=5000, lr=3e-3, batch=64, seed=0, attn_only=True,
    restricted_softmax_steps=1000,
    figures=(
        Figure("prev_token_score", 0.8, True, "max over layer-0 heads of mean attention to the previous token"),
        Figure("induction_score", 0.8, True,
               "max over layer-1 heads of mean attention to the token after the earlier occurrence"),
        Figure("second_copy_loss", 0.3, False, "next-token loss on the second copy of a repeated random sequence"),
        Figure("first_copy_loss", None, True, "next-token loss on the first copy (chance = ln 100 = 4.6)"),
        Figure("prev_head_ablated_loss", None, True, "second-copy loss with the best previous-token head zeroed"),
    ),
    description="2-layer attention-only Llama: previous-token head + induction heads on repeated random words"))

register(Recipe(
    name="ioi-2l", architecture="llama", config=dict(_LLAMA_128),
    data="ioi", measure="ioi", steps=400, lr=3e-3, batch=128, seed=0, weight_decay=1.0,
    figures=(Figure("accuracy", 0.95, True, _ACC),
             Figure("logit_diff", None, True, "mean logit(IO) - logit(S) on held-out prompts"),
             Figure("corrupt_logit_diff", None, True, "same on the ABC-corrupted prompts (should be near 0)")),
    description="2-layer Llama trained on IOI templates (50 names, ABBA and BABA); weight decay 1.0 concentrates "
                "the mechanism (greedy keeps 20 of 110 edges for 80 %)"))

register(Recipe(
    name="greater-than-2l", architecture="llama", config=dict(_LLAMA_128),
    data="greater_than", measure="greater_than", steps=500, lr=1e-3, batch=128, seed=0,
    figures=(Figure("prob_diff", 0.8, True, "mean sum p(years > YY) - sum p(years <= YY) (Hanna et al. 2023)"),
             Figure("corrupt_prob_diff", None, True, "same figure for the '01' corruption, relative to YY"),
             Figure("logit_diff", None, True, "mean logit(YY+1) - logit(YY-1)")),
    description="2-layer Llama trained on 'The war lasted from the year 17YY to the year 17' toward years > YY"))

register(Recipe(
    name="dyck-2l", architecture="llama", config=dict(_LLAMA_128),
    data="dyck", measure="dyck", steps=1500, lr=2e-3, batch=64, seed=0,
    figures=(Figure("accuracy", 0.9, True, _ACC),
             Figure("logit_diff", None, True, "mean logit(answer closer) - logit(corrupted closer)")),
    description="2-layer Llama predicting the bracket that closes the innermost open one (()[]{})"))

register(Recipe(
    name="ioi-2l-gpt2", architecture="gpt2",
    config={"n_embd": 128, "n_layer": 2, "n_head": 4, "n_inner": 256},
    data="ioi", measure="ioi", steps=2000, lr=3e-3, batch=128, seed=0,
    figures=(Figure("accuracy", 0.9, True, _ACC),
             Figure("logit_diff", None, True, "mean logit(IO) - logit(S) on held-out prompts"),
             Figure("corrupt_logit_diff", None, True, "same on the ABC-corrupted prompts")),
    description="2-layer GPT-2-style model (learned positions) on the same IOI data"))

register(Recipe(
    name="ioi-mamba", architecture="mamba",
    config={"hidden_size": 64, "num_hidden_layers": 2, "state_size": 16, "expand": 2, "conv_kernel": 4},
    data="ioi", measure="ioi", steps=400, lr=3e-3, batch=64, seed=0,
    figures=(Figure("accuracy", 0.9, True, _ACC),
             Figure("logit_diff", None, True, "mean logit(IO) - logit(S) on held-out prompts"),
             Figure("corrupt_logit_diff", None, True, "same on the ABC-corrupted prompts")),
    description="2-layer Mamba (HF MambaForCausalLM, pure-torch path) on the same IOI data"))


# The IOI size family (issue #11 item 7: the scale study): ioi-2l's data, optimiser, steps and seed, with only the
# size changed (2 / 3 / 4 layers at d64, and d32 at 2 layers; ioi-2l is the d128 member; a 1-layer d64
# model trained this way stays at chance, 0.51). head_dim stays 32.
def _ioi_size(name: str, layers: int, width: int) -> Recipe:
    return register(Recipe(
        name=name, architecture="llama",
        config={"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": width // 32,
                "intermediate_size": 2 * width},
        data="ioi", measure="ioi", steps=400, lr=3e-3, batch=128, seed=0, weight_decay=1.0,
        figures=(Figure("accuracy", 0.95, True, _ACC),
                 Figure("logit_diff", None, True, "mean logit(IO) - logit(S) on held-out prompts"),
                 Figure("corrupt_logit_diff", None, True, "same on the ABC-corrupted prompts (should be near 0)")),
        description=f"{layers}-layer Llama, d{width}: ioi-2l's recipe at another size (the SAE scale study)"))


_ioi_size("ioi-2l-d32", 2, 32)
_ioi_size("ioi-2l-d64", 2, 64)
_ioi_size("ioi-3l-d64", 3, 64)
_ioi_size("ioi-4l-d64", 4, 64)
