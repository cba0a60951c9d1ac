"""Train an SAE on stored activations: deterministic under a seed, resumable, with a live progress bar.

Procedure (common to all architectures; the architecture-specific parts are in :mod:`explainers.sae.archs`):

1. One ordered pass over the training rows gives the data mean and ``E||x||``; inputs are scaled by
   ``s = sqrt(d_in) / E||x||`` (Anthropic's April 2024 normalisation) when ``normalize``; ``s`` is folded into the
   weights at the end, so the saved SAE reads raw activations.
2. Initialisation from ``torch.Generator(seed)``: decoder rows random directions of norm 1 (0.1 for relu-l1),
   ``W_enc = W_dec^T``, ``b_enc = 0``; ``b_dec`` per centring: ``none`` 0, ``learned`` the geometric median of 4096
   random training rows (Weiszfeld's algorithm), ``mean`` the data mean (fixed).
3. ``train_tokens // batch_size`` Adam steps on shuffled batches (``ActivationStore.batches`` seeded by
   ``(seed, epoch)``, whole batches only); the learning rate ramps up over ``lr_warmup`` and decays linearly to 0
   over the last ``lr_decay`` of the steps; gradient norm clipped at ``grad_clip``; for unit-norm architectures the
   decoder gradient's component along each row is projected out and rows renormalised after each step.
   A latent is *dead* when it has not fired in the last ``min(dead_tokens, train_tokens // 5)`` tokens.
4. ``arch.finalize`` (BatchTopK's threshold, JumpReLU's thresholds), scale folded, saved in SAELens' layout
   (:mod:`explainers.sae.io`) with the training config under ``circuitexplain``; ``training.json`` holds the loss
   history.

A checkpoint (``DIR/checkpoint.pt``: weights, Adam state, step, data position, dead-latent counters, history) is
written atomically every ``checkpoint_every`` steps and on Ctrl-C (taken at the end of the current step);
rerunning with the same config continues from it and ends bit-identical to an uninterrupted run (same thread count). A different config in the same directory is
refused with the first differing key named.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from explainers.sae.archs import TRAIN_ARCHS, StepContext
from explainers.sae.io import WEIGHTS_FILE, load_sae, save_sae
from explainers.sae.model import ARCHS, CENTRINGS, SAE, SAEConfig

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
TRAINING_JSON = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained SAE (run control: :func:`train_sae`'s keyword arguments)."""

    arch: str
    centring: str
    width: int
    k: int | None = None                  # topk / batchtopk (batchtopk: mean active latents per row)
    l1_coefficient: float = 5.0           # relu-l1
    l0_coefficient: float = 0.1           # jumprelu
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    aux_k_coefficient: float = 1 / 32     # topk / batchtopk
    aux_k: int | None = None              # default d_in // 2
    dead_tokens: int = 1_000_000
    train_tokens: int = 1_000_000
    batch_size: int = 4096
    lr: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_warmup: float = 0.01
    lr_decay: float = 0.2
    sparsity_warmup: float = 0.05
    grad_clip: float = 1.0
    normalize: bool = True
    threshold_batches: int = 16           # batchtopk threshold estimate
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r} unknown; one of {', '.join(ARCHS)}")
        if self.centring not in CENTRINGS:
            raise ValueError(f"centring {self.centring!r} unknown; one of {', '.join(CENTRINGS)}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.arch in ("topk", "batchtopk") and (self.k is None or not 1 <= self.k <= self.width):
            raise ValueError(f"{self.arch} needs 1 <= k <= width ({self.width}), got k={self.k}")
        if self.batch_size < 1 or self.train_tokens < self.batch_size:
            raise ValueError(f"need train_tokens ({self.train_tokens}) >= batch_size ({self.batch_size}) >= 1")
        for name in ("lr_warmup", "lr_decay", "sparsity_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a fraction of training, got {getattr(self, name)}")

    @property
    def n_steps(self) -> int:
        return self.train_tokens // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


class StoreSource:
    """Training rows from an :class:`explainers.store.ActivationStore` (one hook, some shards)."""

    def __init__(self, store: Any, hook: str, shards: list[int] | None = None, buffer_shards: int | None = None):
        self.store, self.hook = store, hook
        self.shards = list(range(store.n_shards)) if shards is None else list(shards)
        self.buffer_shards = buffer_shards
        self.d = store.d(hook)
        self.n_rows = store.n_rows_in(self.shards)

    def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                drop_last: bool = True) -> Iterator[Tensor]:
        return self.store.batches(self.hook, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                                  shards=self.shards, buffer_shards=self.buffer_shards, drop_last=drop_last)

    def describe(self) -> dict[str, Any]:
        return {"store": str(self.store.path), "hook": self.hook, "shards": self.shards, "rows": self.n_rows}


class TensorSource:
    """Training rows from an in-memory tensor ``[N, d]`` (shuffled per ``(seed, epoch)`` like a one-shard store)."""

    def __init__(self, x: Tensor, name: str = "tensor"):
        if x.dim() != 2:
            raise ValueError(f"TensorSource: expected [N, d], got {tuple(x.shape)}")
        self.x, self.name = x.float(), name
        self.d, self.n_rows = int(x.shape[1]), int(x.shape[0])

    def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                drop_last: bool = True) -> Iterator[Tensor]:
        import numpy as np

        x = self.x
        if shuffle:
            x = x[torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(self.n_rows))]
        end = self.n_rows // batch_size * batch_size if drop_last else self.n_rows
        for s in range(0, end, batch_size):
            yield x[s:s + batch_size]

    def describe(self) -> dict[str, Any]:
        return {"tensor": self.name, "rows": self.n_rows}


@torch.no_grad()
def data_stats(source: Any) -> dict[str, Any]:
    """Mean and mean norm of all rows (float64 accumulation, store order)."""
    s = torch.zeros(source.d, dtype=torch.float64)
    norm, n = 0.0, 0
    for x in source.batches(65536, seed=0, epoch=0, shuffle=False, drop_last=False):
        x = x.double()
        s += x.sum(0)
        norm += float(x.norm(dim=1).sum())
        n += x.shape[0]
    return {"mean": (s / n).float(), "mean_norm": norm / n, "rows": n}


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm (float64), started at the mean."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        if float((new - m).norm()) <= tol * max(1.0, float(m.norm())):
            m = new
            break
        m = new
    return m.float()


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    T = cfg.n_steps
    f = 1.0
    if cfg.lr_warmup > 0:
        f = min(f, (step + 1) / max(1.0, cfg.lr_warmup * T))
    start = (1 - cfg.lr_decay) * T
    if cfg.lr_decay > 0 and step >= start:
        f = min(f, (T - step) / max(1.0, cfg.lr_decay * T))
    return f


def _stream(source: Any, cfg: TrainConfig, epoch: int, index: int) -> Iterator[tuple[int, int, Tensor]]:
    while True:
        for j, b in enumerate(source.batches(cfg.batch_size, seed=cfg.seed, epoch=epoch)):
            if j >= index:
                yield epoch, j, b
        epoch, index = epoch + 1, 0


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return k
    return None


def train_sae(source: Any, cfg: TrainConfig, out_dir: str | os.PathLike, *, hook: str = "", model: str = "",
              metadata: dict[str, Any] | None = None, device: str | torch.device = "cpu", progress: bool = True,
              checkpoint_every: int = 200, max_steps: int | None = None, log_every: int = 10) -> SAE | None:
    """Train (or resume, or find finished) an SAE in ``out_dir``; see the module docstring.

    ``max_steps`` stops after that many steps in this call, leaving a checkpoint (returns ``None``); otherwise
    returns the trained SAE (in raw activation space, on ``device``).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = TRAIN_ARCHS[cfg.arch]
    if source.n_rows < cfg.batch_size:
        raise ValueError(f"{cfg.batch_size}-row batches need more training rows than the {source.n_rows} given")
    done = out / TRAINING_JSON
    if done.is_file() and (out / WEIGHTS_FILE).is_file():
        prev = json.loads(done.read_text())
        diff = _diff(prev.get("config", {}), cfg.to_dict())
        if diff is not None:
            raise ValueError(f"{out}: holds an SAE trained with another config ({diff} differs)")
        return load_sae(out, device)
    T = cfg.n_steps
    d = source.d
    sae_cfg = SAEConfig(d_in=d, d_sae=cfg.width, arch=cfg.arch, centring=cfg.centring,
                        k=cfg.k if cfg.arch == "topk" else None, hook=hook, model=model,
                        apply_b_dec_to_input=cfg.centring != "none")
    sae = SAE(sae_cfg)
    arch.setup(sae, cfg)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = _diff(ck["config"], cfg.to_dict())
        if diff is not None:
            raise ValueError(f"{ckpt_path}: checkpoint of another config ({diff} differs); use another directory")
        sae.load_state_dict(ck["sae"])
        state = ck
        log.info("resuming SAE training in %s at step %d/%d", out, ck["step"], T)
    else:
        stats = data_stats(source)
        scale = math.sqrt(d) / stats["mean_norm"] if cfg.normalize else 1.0
        g = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            W = torch.randn(cfg.width, d, generator=g)
            W = W / W.norm(dim=1, keepdim=True) * arch.decoder_init_norm
            sae.W_dec.copy_(W)
            sae.W_enc.copy_(W.T)
            if cfg.centring == "mean":
                sae.b_dec.copy_(stats["mean"] * scale)
            elif cfg.centring == "learned":
                sample = next(source.batches(min(4096, source.n_rows), seed=cfg.seed + 1, epoch=0))
                sae.b_dec.copy_(geometric_median(sample.float() * scale))
        state = {"config": cfg.to_dict(), "step": 0, "epoch": 0, "index": 0, "scale": scale,
                 "data_mean_norm": stats["mean_norm"], "since_fired": torch.zeros(cfg.width, dtype=torch.int64),
                 "history": [], "opt": None, "seconds": 0.0}
    sae = sae.to(device).train()
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    if state["opt"] is not None:
        opt.load_state_dict(state["opt"])
    scale, since = float(state["scale"]), state["since_fired"].to(device)
    dead_window = max(1, min(cfg.dead_tokens, cfg.train_tokens // 5))
    step, history = int(state["step"]), list(state["history"])
    stop = T if max_steps is None else min(T, step + max_steps)
    stream = _stream(source, cfg, int(state["epoch"]), int(state["index"]))
    t0, seconds = time.perf_counter(), float(state["seconds"])
    bar = tqdm(total=T, initial=step, unit="step", desc=f"sae {cfg.arch}/{cfg.centring}", disable=not progress)
    epoch, index = int(state["epoch"]), int(state["index"])

    def checkpoint() -> None:
        _save_checkpoint(ckpt_path, {**state, "sae": {k: v.detach().cpu() for k, v in sae.state_dict().items()},
                                     "opt": opt.state_dict(), "step": step, "epoch": epoch, "index": index,
                                     "since_fired": since.cpu(), "history": history,
                                     "seconds": seconds + time.perf_counter() - t0})

    # Ctrl-C is deferred to the end of the current step, so the checkpoint is always of a completed step
    interrupted: list[int] = []
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        while step < stop:
            e, j, batch = next(stream)
            x = batch.to(device, torch.float32) * scale
            ctx = StepContext(step, T, since >= dead_window, cfg)
            f, pre = arch.forward(sae, x, ctx)
            x_hat = f @ sae.W_dec + sae.b_dec
            mse = ((x - x_hat) ** 2).sum(-1).mean()
            terms = arch.losses(sae, x, x_hat, f, pre, ctx)
            loss = mse + sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if arch.unit_norm_decoder and sae.W_dec.grad is not None:
                with torch.no_grad():
                    W = sae.W_dec
                    W.grad -= (W.grad * W).sum(1, keepdim=True) * W
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for grp in opt.param_groups:
                grp["lr"] = cfg.lr * _lr_factor(cfg, step)
            opt.step()
            with torch.no_grad():
                if arch.unit_norm_decoder:
                    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
                fired = (f > 0).any(0)
                since += x.shape[0]
                since[fired] = 0
            step += 1
            epoch, index = e, j + 1
            bar.update(1)
            if step % log_every == 0 or step == T:
                with torch.no_grad():
                    var = ((x - x.mean(0)) ** 2).sum(-1).mean()
                    row = {"step": step, "loss": float(loss), "mse": float(mse),
                           "explained_variance": float(1 - mse / var), "l0": float((f > 0).sum(-1).float().mean()),
                           "dead_fraction": float((since >= dead_window).float().mean()),
                           **{k: float(v) for k, v in terms.items()}}
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}", ev=f"{row['explained_variance']:.3f}",
                                l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2f}")
            if step % checkpoint_every == 0 and step < T:
                checkpoint()
            if interrupted:
                checkpoint()
                raise KeyboardInterrupt
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        bar.close()
    if step < T:
        checkpoint()
        return None
    sae.eval()
    fin_batches = [b.to(device, torch.float32) * scale for b in
                   itertools.islice(source.batches(cfg.batch_size, seed=cfg.seed + 2, epoch=0), cfg.threshold_batches)]
    facts = arch.finalize(sae, fin_batches, cfg)
    sae.fold_scale(scale)
    for p in sae.parameters():
        p.requires_grad_(False)
    extra = {"training": cfg.to_dict(), "scale": scale, "finalize": facts}
    save_sae(sae, out, metadata=metadata, extra=extra)
    seconds += time.perf_counter() - t0
    record = {"config": cfg.to_dict(), "data": source.describe(), "steps": T, "scale": scale,
              "finalize": facts, "history": history, "seconds": seconds}
    tmp = out / (TRAINING_JSON + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, done)
    ckpt_path.unlink(missing_ok=True)
    return sae
