"""The feature level of :mod:`evals.levels`: SAE features and error nodes as circuit units.

Units: the candidate features of every spliced site and one error node per site, as
:meth:`patching.features.FeatureGraph.build` lists them on the *discovery* prompts (features active on the task,
at most ``max_features_per_site`` per site); scored by :func:`patching.features.feature_node_scores` (AtP or exact
patching, error nodes included) and patched by :class:`patching.features.FeaturePatcher` (a feature's ablation
replaces its activation x decoder row; an error node's replaces the site's reconstruction error). Features that
are not candidates stay clean in every run, as in Marks et al. (2024).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from evals.levels import Evaluator, Level, LevelsConfig


def check_saes(saes: Sequence[str]) -> None:
    """One-line errors for SAE directories that cannot be loaded (before any model weights load)."""
    hooks: dict[str, str] = {}
    for s in saes:
        p = Path(s)
        if not (p / "cfg.json").is_file():
            raise ValueError(f"--sae {s}: not an SAE directory (no cfg.json; SAELens layout, see docs/saes.md)")
        if not (p / "sae_weights.safetensors").is_file():
            raise ValueError(f"--sae {s}: no sae_weights.safetensors (training not finished?)")
    for s in saes:
        from explainers.sae.io import load_sae

        hook = load_sae(Path(s), "cpu").cfg.hook
        if not hook:
            raise ValueError(f"--sae {s}: the SAE records no hook (cfg.json metadata.hook_name)")
        if hook in hooks:
            raise ValueError(f"--sae {s}: a second SAE for hook {hook} (first: {hooks[hook]}); one SAE per site")
        hooks[hook] = s


def load_bases(saes: Sequence[str], device: Any = "cpu") -> tuple[dict[str, Any], dict[str, str]]:
    """``({hook: FeatureBasis}, {hook: SAE name})`` of SAE directories (the name: the directory's)."""
    from explainers.bases.features import FeatureBasis

    bases, names = {}, {}
    for s in saes:
        b = FeatureBasis.load(s, device=str(device))
        bases[b.hook] = b
        names[b.hook] = Path(s).resolve().name
    return bases, names


class FeatureLevel(Level):
    """Feature and error nodes of spliced SAEs (module docstring). ``bases`` overrides ``config.saes``
    (hook -> any :class:`patching.basis.Basis`, e.g. an identity basis in the tests)."""

    name = "feature"

    def __init__(self, model: Any, config: LevelsConfig, metric: Any, *,
                 bases: Mapping[str, Any] | None = None, sae_names: Mapping[str, str] | None = None) -> None:
        self.model, self.config, self.metric = model, config, metric
        if bases is None:
            dev = next(model.parameters()).device
            bases, sae_names = load_bases(config.saes, dev)
        if not bases:
            raise ValueError("level feature: no SAE given")
        self.bases = dict(bases)
        self.sae_names = dict(sae_names or {})
        self.fgraph: Any = None

    def prepare(self, batch: Any) -> None:
        """Build the feature graph (candidate features) on the discovery prompts."""
        from patching.features import FeatureGraph

        cfg = self.config
        self.fgraph = FeatureGraph.build(self.model, self.bases, batch,
                                         max_features_per_site=cfg.max_features_per_site,
                                         min_activation=cfg.min_activation, sae_names=self.sae_names or None)
        self.columns = [i for i, n in enumerate(self.fgraph.nodes) if n.kind in ("feature", "error")]
        self.ids = tuple(self.fgraph.nodes[i].id for i in self.columns)
        self.kinds = tuple(self.fgraph.nodes[i].kind for i in self.columns)
        self.describe = {
            "sites": [{"hook": s.hook, "sae": s.sae, "n_units": s.n_units, "candidates": len(s.candidates)}
                      for s in self.fgraph.sites],
            "unit_kinds": sorted(set(self.kinds))}

    def scores(self, batch: Any) -> Float[Tensor, " U"]:
        from patching.features import feature_node_scores

        s = feature_node_scores(self.model, self.fgraph, batch, method=self.config.scorer,
                                ablation=self.config.ablation, metric=self.metric)
        by_id = dict(zip(s.ids, s.values.tolist(), strict=True))
        missing = [i for i in self.ids if i not in by_id]
        if missing:
            raise RuntimeError(f"feature_node_scores returned no score for {missing[:3]} ({len(missing)} units)")
        return torch.tensor([by_id[i] for i in self.ids], dtype=torch.float64)

    def evaluator(self, batch: Any) -> Evaluator:
        from patching.features import FeaturePatcher

        patcher = FeaturePatcher(self.model, self.fgraph, batch, ablation=self.config.ablation, metric=self.metric)
        return Evaluator.over_columns(patcher, self.columns, self.fgraph.n_nodes, patcher.clean_metric.device,
                                      self.config.masks_per_call)


__all__ = ["FeatureLevel", "check_saes", "load_bases"]
