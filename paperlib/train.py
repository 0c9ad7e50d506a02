"""Training and evaluation: ``fit`` with early stopping, checkpoints and exact resume; ``evaluate``
with full ranking.

The loop follows RecBole's trainer as Mamba4Rec runs it: Adam (lr 1e-3), train batch 2048, eval
batch 4096, evaluation on the validation split after every epoch, early stopping on validation
NDCG@10 with ``stopping_step`` 10, and the test split scored once with the best weights.

Determinism: ``fit`` seeds python, numpy and torch, and shuffles with its own ``torch.Generator``.
Every epoch ends with a checkpoint holding the model, the optimizer, the generator and every RNG
state, so ``resume=True`` continues an interrupted run exactly where it stopped. Checkpoints hold
tensors and plain Python values only, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm  # the plain bar: tqdm.auto warns without ipywidgets in notebooks

from paperlib.data.sequences import SequentialData, TrainBatch, eval_batches, train_batches
from paperlib.metrics import DEFAULT_KS, METRIC_NAMES, RankingAccumulator
from paperlib.models import MODELS, config_from_dict, model_name
from paperlib.models.base import SequentialRecommender

logger = logging.getLogger("paperlib.train")

CHECKPOINT_FORMAT = 1
LAST = "last.pt"
BEST = "best.pt"


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Training-loop settings (RecBole's defaults as Mamba4Rec's ``config.yaml`` uses them).

    Attributes:
        epochs: maximum number of epochs.
        batch_size: training sequences per step (RecBole ``train_batch_size``).
        eval_batch_size: users per evaluation batch (RecBole ``eval_batch_size``).
        lr, weight_decay: Adam's settings.
        patience: RecBole's ``stopping_step``: training stops once the validation metric has not
            reached its best for more than ``patience`` consecutive epochs. As in RecBole, a value
            equal to the best counts as an improvement (the later epoch is kept).
        valid_metric: early-stopping metric, one of ``{hr,ndcg,mrr}@K`` with K in ``ks``.
        seed: seeds python, numpy, torch and the shuffling generator.
        max_steps_per_epoch: cap on optimizer steps per epoch (smoke and quick runs); None = all.
        ks: cut-offs K of the reported metrics.
        device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
        checkpoint_dir: folder for ``last.pt`` / ``best.pt``; None writes no checkpoints.
    """

    epochs: int = 300
    batch_size: int = 2048
    eval_batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10
    valid_metric: str = "ndcg@10"
    seed: int = 2020
    max_steps_per_epoch: int | None = None
    ks: tuple[int, ...] = DEFAULT_KS
    device: str = "auto"
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("patience", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        if self.max_steps_per_epoch is not None and (
            isinstance(self.max_steps_per_epoch, bool)
            or not isinstance(self.max_steps_per_epoch, int)
            or self.max_steps_per_epoch < 1
        ):
            raise ValueError(f"TrainConfig.max_steps_per_epoch must be None or >= 1, got {self.max_steps_per_epoch!r}")
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if isinstance(self.weight_decay, bool) or not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        metric, _, k = self.valid_metric.partition("@")
        valid = [f"{m}@{kk}" for m in METRIC_NAMES for kk in self.ks]
        if metric not in METRIC_NAMES or not k.isdigit() or int(k) not in self.ks:
            raise ValueError(f"TrainConfig.valid_metric {self.valid_metric!r} is not one of {valid}")
        if not (self.device in ("cpu", "cuda", "auto") or str(self.device).startswith("cuda:")):
            raise ValueError(f"TrainConfig.device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ks"] = list(self.ks)
        return out


@dataclass
class FitResult:
    """What ``fit`` returns (plain values only, ready for a results JSON).

    Attributes:
        history: one dict per epoch: ``epoch``, ``train_loss`` (mean over steps), ``steps``,
            ``train_seconds``, ``eval_seconds``, ``seconds``, ``valid`` (metric dict), ``improved``.
        best_epoch, best_valid: the epoch whose weights were kept and its validation metrics.
        test: test metrics of the restored best model.
        wall_seconds: wall time of this call (a resumed run counts from the resume).
        stopped_early: True if the patience ran out before ``epochs``.
    """

    model_name: str
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    best_valid: dict[str, float]
    test: dict[str, float]
    wall_seconds: float
    stopped_early: bool
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- helpers
def set_seed(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(device)


def _progress_disabled(progress: bool) -> bool:
    return not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def _check_compatible(model: SequentialRecommender, data: SequentialData) -> None:
    cfg = model.config
    if cfg.n_items != data.n_items:
        raise ValueError(
            f"model was built for {cfg.n_items} items but dataset {data.name!r} has {data.n_items}; "
            "build the model with n_items=data.n_items"
        )
    if data.max_len > cfg.max_len:
        raise ValueError(
            f"dataset {data.name!r} has histories of up to {data.max_len} items but the model was built "
            f"with max_len={cfg.max_len}; build it with max_len=data.max_len"
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG the loop depends on, as tensors and plain values (weights_only-safe)."""
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
        "numpy": {"key": torch.from_numpy(np_key.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "generator": generator.get_state(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    generator.set_state(state["generator"].cpu())


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model_state" not in ckpt:
        raise ValueError(f"{path} is not a paperlib checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SequentialRecommender:
    """Rebuild the model stored in ``path`` (``best.pt`` or ``last.pt``) from its stored config and
    load its weights; returned in eval mode."""
    ckpt = _read(Path(path), map_location)
    name = ckpt["model_name"]
    if name not in MODELS:
        raise ValueError(f"{path}: unknown model {name!r}; registered: {', '.join(MODELS)}")
    model = MODELS[name][1](config_from_dict(name, ckpt["model_config"]))
    model.load_state_dict(ckpt["model_state"])
    return model.to(map_location).eval()


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: SequentialRecommender,
    data: SequentialData,
    split: str,
    batch_size: int = 4096,
    ks: Sequence[int] = DEFAULT_KS,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Full-ranking HR/NDCG/MRR@K of ``split`` ("valid" or "test"): each user's history is scored
    against the whole catalogue with ``model.score`` (padding excluded, seen items not masked).

    Returns:
        ``{"hr@5": …, "ndcg@5": …, "mrr@5": …, …}`` averaged over users.
    """
    _check_compatible(model, data)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    acc = RankingAccumulator(ks)
    try:
        for batch in eval_batches(data, split, batch_size):
            scores = model.score(batch.items.to(device), batch.lengths.to(device))
            acc.add(scores, batch.targets.to(device))
    finally:
        model.train(was_training)
    return acc.result()


# --------------------------------------------------------------------------- training
@dataclass
class _LoopState:
    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_metric: float = -math.inf
    best_valid: dict[str, float] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    stopped_early: bool = False


def _to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    return TrainBatch(
        items=batch.items.to(device, non_blocking=True),
        targets=batch.targets.to(device, non_blocking=True),
        lengths=batch.lengths.to(device, non_blocking=True),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(
    model: SequentialRecommender,
    data: SequentialData,
    config: TrainConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
) -> FitResult:
    """Train ``model`` on ``data``'s training sequences, early-stopping on the validation split;
    restore the best epoch's weights and score the test split with them.

    Args:
        model: a registered model (``paperlib.models.build_model``), moved to ``config.device``.
        data: the dataset (leave-one-out split).
        config: loop settings; ``TrainConfig()`` if None.
        checkpoint_dir: overrides ``config.checkpoint_dir``; ``last.pt`` is written after every
            epoch and ``best.pt`` whenever validation improves.
        resume: continue from ``checkpoint_dir/last.pt`` if it exists (exactly: same weights,
            optimizer, shuffling and dropout as an uninterrupted run); start afresh otherwise.
        progress: tqdm bar over each epoch's batches (also off when ``TQDM_DISABLE=1``).
        optimizer: replaces the default Adam (its state is checkpointed too).

    Raises:
        TrainingDivergedError: the loss became NaN/inf; the message names the epoch and step, and
            the checkpoints of the last good epoch are left untouched.
    """
    config = config or TrainConfig()
    started = time.perf_counter()
    _check_compatible(model, data)
    name = model_name(model)
    model_cfg = asdict(model.config)
    device = resolve_device(config.device)
    ckpt_dir = checkpoint_dir if checkpoint_dir is not None else config.checkpoint_dir
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if resume and ckpt_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir to resume from")

    n_train = sum(1 for s in data.sequences if len(s) >= 4)  # >= 2 training items give a target
    if n_train == 0:
        raise ValueError(f"dataset {data.name!r}: no user has the 2 training items a training target needs")
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)

    model.to(device)
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    set_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # shuffling, on the CPU like the batches
    state = _LoopState()

    if resume:
        last = ckpt_dir / LAST
        if last.is_file():
            state = _restore(last, model, optimizer, generator, name, model_cfg, config)
            logger.info("%s: resumed from %s after epoch %d", name, last, state.epoch)
        else:
            logger.info("%s: no checkpoint at %s, training from scratch", name, last)

    disabled = _progress_disabled(progress)
    while state.epoch < config.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        model.train()
        t0 = time.perf_counter()
        total, steps = 0.0, 0
        batches = train_batches(data, config.batch_size, generator=generator)
        with tqdm(batches, total=steps_per_epoch, desc=f"{name} epoch {epoch}", disable=disabled,
                  leave=False, dynamic_ncols=True) as bar:
            for batch in bar:
                steps += 1
                loss = model.loss(_to_device(batch, device))
                value = loss.item()
                if not math.isfinite(value):
                    kept = (f"the checkpoints of epoch {state.epoch} are kept in {ckpt_dir}"
                            if ckpt_dir is not None and state.epoch > 0 else "no checkpoint was written")
                    raise TrainingDivergedError(
                        f"{name}: training loss is {value} at epoch {epoch}, step {steps}; {kept}. "
                        "Lower the learning rate or check the data."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += value
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                if steps >= steps_per_epoch:
                    break
        _sync(device)
        train_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        valid = evaluate(model, data, "valid", config.eval_batch_size, config.ks, device)
        eval_seconds = time.perf_counter() - t1
        metric = valid[config.valid_metric]
        improved = metric >= state.best_metric  # RecBole: ties move the best to the later epoch
        if improved:
            state.best_epoch, state.best_metric, state.best_valid = epoch, metric, valid
            state.best_state = _cpu_state(model)
            state.bad_epochs = 0
        else:
            state.bad_epochs += 1
            state.stopped_early = state.bad_epochs > config.patience
        state.epoch = epoch
        state.history.append({
            "epoch": epoch,
            "train_loss": total / steps,
            "steps": steps,
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "seconds": train_seconds + eval_seconds,
            "valid": valid,
            "improved": improved,
        })
        k = config.valid_metric.partition("@")[2]
        logger.info(
            "%s epoch %d: loss %.4f | valid %s %.4f, hr@%s %.4f%s | %.1f s (train %.1f s)",
            name, epoch, total / steps, config.valid_metric, metric, k, valid.get(f"hr@{k}", float("nan")),
            " *" if improved else "", train_seconds + eval_seconds, train_seconds,
        )
        if ckpt_dir is not None:
            _save(ckpt_dir, state, model, optimizer, generator, name, model_cfg, config, improved)
        if state.stopped_early:
            logger.info("%s: no better %s for %d epochs, stopping; best epoch %d (%.4f)",
                        name, config.valid_metric, state.bad_epochs, state.best_epoch, state.best_metric)

    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    test = evaluate(model, data, "test", config.eval_batch_size, config.ks, device)
    logger.info("%s: test %s", name, ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
    return FitResult(
        model_name=name,
        model_config=model_cfg,
        train_config=config.to_dict(),
        history=state.history,
        best_epoch=state.best_epoch,
        best_valid=dict(state.best_valid),
        test=test,
        wall_seconds=time.perf_counter() - started,
        stopped_early=state.stopped_early,
        device=str(device),
    )


def _save(ckpt_dir: Path, state: _LoopState, model: SequentialRecommender, optimizer: torch.optim.Optimizer,
          generator: torch.Generator, name: str, model_cfg: dict[str, Any], config: TrainConfig,
          improved: bool) -> None:
    """Write ``best.pt`` (if improved) then ``last.pt``, both atomically, at the end of an epoch."""
    common = {"format": CHECKPOINT_FORMAT, "model_name": name, "model_config": model_cfg}
    if improved:
        _atomic_save({**common, "model_state": state.best_state, "epoch": state.best_epoch,
                      "valid": state.best_valid}, ckpt_dir / BEST)
    _atomic_save({
        **common,
        "train_config": config.to_dict(),
        "model_state": _cpu_state(model),
        "optimizer_state": optimizer.state_dict(),
        "rng": _rng_state(generator),
        "epoch": state.epoch,
        "history": state.history,
        "best_epoch": state.best_epoch,
        "best_metric": state.best_metric,
        "best_valid": state.best_valid,
        "best_state": state.best_state,
        "bad_epochs": state.bad_epochs,
        "stopped_early": state.stopped_early,
    }, ckpt_dir / LAST)


def _restore(path: Path, model: SequentialRecommender, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, name: str, model_cfg: dict[str, Any], config: TrainConfig) -> _LoopState:
    ckpt = _read(path)
    if ckpt["model_name"] != name:
        raise ValueError(f"{path} holds a {ckpt['model_name']!r} run; cannot resume it with a {name!r} model")
    if ckpt["model_config"] != model_cfg:
        diff = {k: (ckpt["model_config"].get(k), v) for k, v in model_cfg.items() if ckpt["model_config"].get(k) != v}
        raise ValueError(f"{path}: model config differs from the checkpoint's (checkpoint, given): {diff}")
    stored = ckpt.get("train_config", {})
    changed = [k for k in ("batch_size", "lr", "weight_decay", "seed", "max_steps_per_epoch", "valid_metric")
               if k in stored and stored[k] != getattr(config, k)]
    if changed:
        logger.warning("resuming %s with different %s: the run will not match an uninterrupted one", path, changed)
    model.load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer_state"])
    _set_rng_state(ckpt["rng"], generator)
    return _LoopState(
        epoch=ckpt["epoch"],
        history=list(ckpt["history"]),
        best_epoch=ckpt["best_epoch"],
        best_metric=ckpt["best_metric"],
        best_valid=dict(ckpt["best_valid"]),
        best_state=ckpt["best_state"],
        bad_epochs=ckpt["bad_epochs"],
        stopped_early=ckpt["stopped_early"],
    )


__all__ = [
    "FitResult",
    "TrainConfig",
    "TrainingDivergedError",
    "evaluate",
    "fit",
    "load_checkpoint",
    "resolve_device",
    "set_seed",
]
