"""Training and evaluation: the :class:`Trainer` (epochs, steps, early stopping, checkpoints and
exact resume, with hooks for the studies) and ``evaluate`` with full ranking.

The loop follows RecBole's trainer as Mamba4Rec runs it: Adam (lr 1e-3), 2,048 (prefix, target)
pairs a step, eval batch 4,096, evaluation on the validation split after every epoch, early stopping
on validation NDCG@10 with ``stopping_step`` 10, and the test split scored once with the best weights.
An epoch covers every RecBole training pair exactly once (``paperlib.data.sequences.TrainLoader``).

The pieces, each short enough to read on its own:

* :meth:`Trainer.fit` runs epochs until the budget or the patience runs out, then tests;
* :meth:`Trainer.train_epoch` draws batches and calls :meth:`Trainer.train_step`;
* :meth:`Trainer.train_step` is one optimizer update (closure-taking optimizers get a closure);
* :class:`EarlyStopping` is RecBole's rule; :meth:`Trainer.save` / :meth:`Trainer.restore` the
  checkpoints.

Studies plug in through :class:`Callback`: ``before_step`` may change ``trainer.loader.batch_size``
(the loader takes it for the very next batch, without restarting the epoch), ``after_backward``
sees the gradients before the update, ``after_step`` the per-step record, and a callback's
``state_dict`` goes into every checkpoint.

Determinism: the trainer seeds python, numpy and torch, and shuffles with its own
``torch.Generator``. Every epoch ends with a checkpoint holding the model, the optimizer, the
generator, every RNG state and the callbacks' state, so ``resume=True`` continues an interrupted run
exactly where it stopped. Checkpoints hold tensors and plain Python values only, so they load with
``torch.load(weights_only=True)``.

Several processes (``torchrun --nproc_per_node N``; :mod:`paperlib.distributed`): when a process
group of more than one rank exists, the same loop trains with ``DistributedDataParallel`` (gloo on
CPU, nccl on GPU, one GPU per rank) and gives what one process would, up to float rounding:

* every rank draws the same global window order from the seed and forms the same global batch of
  at most ``batch_size`` pairs (the batch size stays global); rank r trains on its share of that
  batch's windows, balanced by pairs (:func:`paperlib.distributed.share_bounds`), and its loss is
  scaled by ``pairs_r * world / pairs`` so that DDP's gradient average is the pair-weighted mean
  over the global batch. A rank left without a window (a batch of fewer windows than ranks) runs
  one window with weight 0, so that it still takes part in DDP's all-reduce;
* with ``gradient_groups`` m > 1 the global batch is split into m groups as in one process,
  group j's gradient is computed on rank ``j mod world`` and the m x P matrix is summed over the
  ranks: every rank holds the gradients one process would compute, bit for bit, and the
  batch-size tests see every rank's gradients (DDP is bypassed there: it reduces one gradient
  per backward pass, not m rows);
* evaluation is sharded by evaluation batches (batch i on rank ``i mod world``, the same batches
  one process forms) and the target ranks are gathered, so the metrics are exactly those of one
  process; early stopping then decides the same on every rank;
* only rank 0 writes checkpoints (and logs, and shows progress); on resume rank 0 reads
  ``last.pt`` and broadcasts it, so the other ranks need no copy of the file. A checkpoint holds
  the global order and position, never a rank's share, so it resumes at any world size;
* dropout (and BERT4Rec's masks) draw from each rank's own torch RNG, seeded ``seed + rank``;
  rank 0 is restored exactly on resume, the other ranks are reseeded from the seed, their rank
  and the pairs trained so far (a resumed multi-process run is reproducible, but its dropout on
  ranks > 0 differs from the uninterrupted run's).

Every rank checks that all ranks hold the same dataset (checksum) and settings before training.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm  # the plain bar: tqdm.auto warns without ipywidgets in notebooks

from paperlib import distributed
from paperlib.data.sequences import SequentialData, TrainBatch, TrainLoader, eval_batches
from paperlib.fields import Checked, ConfigError, param
from paperlib.metrics import DEFAULT_KS, METRIC_NAMES, RankingAccumulator, metrics_from_ranks
from paperlib.models import MODELS, config_from_dict, model_name
from paperlib.models.base import SequentialRecommender
from paperlib.runtime import atomic_write, progress_enabled

logger = logging.getLogger("paperlib.train")

CHECKPOINT_FORMAT = 2
LAST = "last.pt"
BEST = "best.pt"


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainConfig(Checked):
    """Training-loop settings; the defaults are RecBole's as Mamba4Rec's ``config.yaml`` uses them."""

    epochs: int = param(300, "maximum number of epochs", min=1)
    batch_size: int = param(2048, "(prefix, target) pairs per optimizer step, as RecBole's train_batch_size counts them", min=1)
    eval_batch_size: int = param(4096, "users per evaluation batch", min=1)
    lr: float = param(1e-3, "Adam's learning rate", min=0.0)
    weight_decay: float = param(0.0, "Adam's weight decay", min=0.0)
    patience: int = param(10, "RecBole's stopping_step: stop after more than this many epochs without a better "
                          "validation metric (a tie counts as better)", min=0)
    valid_metric: str = param("ndcg@10", "early-stopping metric, {hr,ndcg,mrr}@K with K in ks")
    seed: int = param(2020, "seeds python, numpy, torch and the shuffling generator", min=0)
    max_steps_per_epoch: int | None = param(None, "cap on optimizer steps per epoch (smoke runs); None = all", min=1)
    window_stride: int | None = param(None, "targets between training windows over long histories; None = max_len "
                                      "(non-overlapping), 1 = every target with its full max_len history", min=1)
    record_steps: bool = param(False, "keep one record per optimizer step (batch size, step size, examples, time)")
    eval_every_pairs: int | None = param(None, "validate (and checkpoint, and count patience) after this many "
                                         "training pairs instead of after each pass over the data", min=1)
    gradient_groups: int = param(1, "compute each step's gradient as the mean of this many micro-batch "
                                 "gradients, kept for batch-size tests (1: one backward pass)", min=1)
    ks: tuple[int, ...] = param(DEFAULT_KS, "cut-offs K of the reported metrics", min=1)
    device: str = param("auto", "cpu, cuda, cuda:N or auto (CUDA when available)")
    checkpoint_dir: str | None = param(None, "folder for last.pt / best.pt; None writes no checkpoints")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"'lr' must be > 0, got {self.lr}")
        metric, _, k = self.valid_metric.partition("@")
        valid = [f"{m}@{kk}" for m in METRIC_NAMES for kk in self.ks]
        if metric not in METRIC_NAMES or not k.isdigit() or int(k) not in self.ks:
            raise ConfigError(f"'valid_metric' {self.valid_metric!r} is not one of {valid}")
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise ConfigError(f"'device' must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ks"] = list(self.ks)
        return out


@dataclass
class FitResult:
    """What ``fit`` returns (plain values only, ready for a results JSON).

    Attributes:
        history: one dict per epoch (a pass over the training data, or ``eval_every_pairs`` pairs):
            ``epoch``, ``train_loss`` (mean over steps), ``steps``,
            ``pairs`` (targets trained on), ``train_seconds``, ``eval_seconds``, ``seconds``,
            ``valid`` (metric dict), ``improved``.
        steps: one dict per optimizer step when ``record_steps`` (else empty): ``epoch``, ``step``,
            ``batch_size`` (pairs), ``sequences``, ``step_size``, ``examples`` (pairs seen so
            far), ``seconds`` (training time so far), ``loss``.
        best_epoch, best_valid: the epoch whose weights were kept and its validation metrics.
        test: test metrics of the restored best model (RecBole's protocol: seen items stay ranked).
        test_seen_removed: the same with the user's seen items removed from the ranking (the
            protocol of several SASRec papers; a labelled extra, not comparable with ``test``).
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
    pairs_per_epoch: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    test_seen_removed: dict[str, float] = field(default_factory=dict)
    world_size: int = 1  # processes that trained the run (DDP ranks)

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
    """``torch.save`` through :func:`paperlib.runtime.atomic_write`: a crash never leaves half a file."""
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


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
    exclude_seen: bool = False,
    sharded: bool = False,
) -> dict[str, float]:
    """Full-ranking HR/NDCG/MRR@K of ``split`` ("valid" or "test"): each user's history is scored
    against the whole catalogue with ``model.score`` (padding excluded, seen items not masked, as
    RecBole does for sequential models).

    ``exclude_seen=True`` also removes every item of the user's whole history from the ranking:
    the protocol of several SASRec papers, not RecBole's, and not comparable with it (it is an
    easier task on datasets without repeats, such as MovieLens).

    ``sharded=True`` (every rank of a process group calls it): rank r scores evaluation batches
    r, r + world, … and the target ranks are gathered in user order, so every rank returns exactly
    the metrics of one process with the same ``batch_size`` (the batches are the same).

    Returns:
        ``{"hr@5": …, "ndcg@5": …, "mrr@5": …, …}`` averaged over users.
    """
    _check_compatible(model, data)
    device = torch.device(device) if device is not None else _model_device(model)
    histories = data.eval_examples(split)[0] if exclude_seen else None
    was_training = model.training
    model.eval()
    acc = RankingAccumulator(ks)
    world = distributed.world_size() if sharded else 1
    try:
        for i, batch in enumerate(eval_batches(data, split, batch_size)):
            if i % world != distributed.rank() % world:
                continue  # another rank's batch
            scores = model.score(batch.items.to(device), batch.lengths.to(device))
            if histories is not None:
                seen = [torch.from_numpy(histories[u]) for u in batch.users.tolist()]
                rows = torch.repeat_interleave(torch.arange(len(seen)), torch.tensor([len(h) for h in seen]))
                scores[rows.to(device), torch.cat(seen).to(device)] = float("-inf")
            acc.add(scores, batch.targets.to(device))
    finally:
        model.train(was_training)
    if world > 1:
        return metrics_from_ranks(_gather_ranks(acc.ranks, data.n_users, batch_size), acc.ks)
    return acc.result()


def _gather_ranks(mine: torch.Tensor, n_users: int, batch_size: int) -> torch.Tensor:
    """Every rank's target ranks put back in user order (batch i was scored on rank i mod world)."""
    parts = distributed.all_gather_varlen(mine)
    taken = [0] * len(parts)
    out = []
    for i, start in enumerate(range(0, n_users, batch_size)):
        owner, size = i % len(parts), min(batch_size, n_users - start)
        out.append(parts[owner][taken[owner]:taken[owner] + size])
        taken[owner] += size
    return torch.cat(out)


# --------------------------------------------------------------------------- training
@dataclass
class EarlyStopping:
    """RecBole's rule: a validation metric at least as good as the best so far is an improvement
    (ties move the best to the later epoch); training stops once more than ``patience``
    consecutive epochs did not improve."""

    patience: int
    best_metric: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, epoch: int, metric: float) -> bool:
        """Record ``epoch``'s metric; True if it is the new best."""
        if metric >= self.best_metric:
            self.best_metric, self.best_epoch, self.bad_epochs = metric, epoch, 0
            return True
        self.bad_epochs += 1
        self.stopped = self.bad_epochs > self.patience
        return False


class Callback:
    """Hooks into the :class:`Trainer`; override what you need. A callback's ``state_dict`` is
    saved in every checkpoint and handed back to ``load_state_dict`` on resume."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first epoch (also after a resume)."""

    def before_step(self, trainer: "Trainer") -> None:
        """Before each batch is drawn: set ``trainer.loader.batch_size`` here to change it."""

    def after_backward(self, trainer: "Trainer", batch: TrainBatch) -> None:
        """Gradients of the batch's mean loss are in ``p.grad``; the optimizer has not stepped."""

    def after_step(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        """After the update; ``record`` is the step's record (see :class:`FitResult`)."""

    def on_epoch_end(self, trainer: "Trainer", entry: dict[str, Any]) -> None:
        """After validation; ``entry`` is the epoch's history entry."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class _ModelLoss(torch.nn.Module):
    """``forward(batch) = model.loss(batch)``: what DistributedDataParallel wraps, so that the loss
    (not ``model.forward``) goes through DDP's forward and its gradients are all-reduced. The
    model is held as it is: its parameter names in checkpoints do not change."""

    def __init__(self, model: SequentialRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: TrainBatch) -> torch.Tensor:
        return self.model.loss(batch)


class Trainer:
    """Trains one model on one dataset (see the module docstring).

    Args:
        model: a registered model (``paperlib.models.build_model``); moved to ``config.device``.
        data: the dataset (leave-one-out split).
        config: loop settings; ``TrainConfig()`` if None.
        optimizer: replaces the default Adam (its state is checkpointed too). An optimizer whose
            class sets ``needs_closure = True`` is stepped with a closure that recomputes the loss
            and gradients of the current batch at the current weights. One with an ``averaged()``
            context manager (USGM) is evaluated with the weights that context swaps in.
        callbacks: :class:`Callback` hooks.
        checkpoint_dir: overrides ``config.checkpoint_dir``; ``last.pt`` is written after every
            epoch and ``best.pt`` whenever validation improves.
        progress: tqdm bar over each epoch's batches (also off when ``TQDM_DISABLE=1``).
    """

    def __init__(self, model: SequentialRecommender, data: SequentialData, config: TrainConfig | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None, callbacks: Iterable[Callback] = (),
                 checkpoint_dir: str | os.PathLike | None = None, progress: bool = True) -> None:
        self.config = config = config or TrainConfig()
        _check_compatible(model, data)
        self.model, self.data, self.callbacks = model, data, list(callbacks)
        self.name = model_name(model)
        self.model_cfg = asdict(model.config)
        self.device = distributed.rank_device(resolve_device(config.device))
        ckpt = checkpoint_dir if checkpoint_dir is not None else config.checkpoint_dir
        self.checkpoint_dir = Path(ckpt) if ckpt is not None else None
        self.progress = progress_enabled(progress)
        model.to(self.device)
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        set_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)  # shuffling, on the CPU like the batches
        self.loader = TrainLoader(data, config.batch_size, generator=self.generator, stride=config.window_stride)
        self.stopping = EarlyStopping(config.patience)
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.examples = 0  # (prefix, target) pairs trained on so far
        self.train_seconds = 0.0  # training time so far (evaluation excluded)
        self.best_valid: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.gradients = None  # the last step's micro-batch gradients (gradient_groups > 1)
        self.ddp = self._join_ranks()  # DistributedDataParallel in a process group, else None
        # evaluation sharded over the ranks; no argument at all in one process
        self._sharding: dict[str, bool] = {"sharded": True} if self.ddp is not None else {}

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> FitResult:
        """Train until ``config.epochs`` or early stopping, restore the best epoch's weights and
        score the test split with them.

        Args:
            resume: continue from ``checkpoint_dir/last.pt`` if it exists (exactly: same weights,
                optimizer, shuffling, dropout and callback state as an uninterrupted run).

        Raises:
            TrainingDivergedError: the loss became NaN/inf; the message names the epoch and step,
                and the checkpoints of the last good epoch are left untouched.
        """
        started = time.perf_counter()
        if resume:
            self._resume()
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        while self.epoch < self.config.epochs and not self.stopping.stopped:
            self.run_epoch()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        test = evaluate(self.model, self.data, "test", self.config.eval_batch_size, self.config.ks, self.device,
                        **self._sharding)
        test_seen_removed = evaluate(self.model, self.data, "test", self.config.eval_batch_size, self.config.ks,
                                     self.device, exclude_seen=True, **self._sharding)
        logger.info("%s: test %s", self.name, ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
        return FitResult(
            model_name=self.name, model_config=self.model_cfg, train_config=self.config.to_dict(),
            history=self.history, best_epoch=self.stopping.best_epoch, best_valid=dict(self.best_valid), test=test,
            wall_seconds=time.perf_counter() - started, stopped_early=self.stopping.stopped, device=str(self.device),
            pairs_per_epoch=self.loader.n_pairs, steps=self.steps, test_seen_removed=test_seen_removed,
            world_size=distributed.world_size(),
        )

    def run_epoch(self) -> dict[str, Any]:
        """One epoch: train, validate, log one line, checkpoint. Returns its history entry."""
        epoch = self.epoch + 1
        t0 = time.perf_counter()
        losses, pairs = self.train_epoch(epoch)
        _sync(self.device)
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        valid = self.validate()
        eval_seconds = time.perf_counter() - t1
        improved = self.stopping.update(epoch, valid[self.config.valid_metric])
        if improved:
            self.best_valid = valid
            with self._evaluation_weights():
                self.best_state = _cpu_state(self.model)
        self.epoch = epoch
        entry = {"epoch": epoch, "train_loss": float(np.mean(losses)), "steps": len(losses), "pairs": pairs,
                 "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                 "seconds": train_seconds + eval_seconds, "valid": valid, "improved": improved}
        self.history.append(entry)
        self._log_epoch(entry)
        for cb in self.callbacks:
            cb.on_epoch_end(self, entry)
        if self.checkpoint_dir is not None and distributed.is_main():
            self.save(improved)
        return entry

    def train_epoch(self, epoch: int) -> tuple[list[float], int]:
        """The training steps of one epoch: a pass over the data, or ``eval_every_pairs`` pairs
        (passes continue across such epochs). Returns the step losses and the pairs trained on."""
        self.model.train()
        cap, period = self.config.max_steps_per_epoch, self.config.eval_every_pairs
        total = math.ceil(period / self.loader.batch_size) if period else self.loader.steps_estimate()
        losses, pairs = [], 0
        with tqdm(total=min(total, cap) if cap else total, desc=f"{self.name} epoch {epoch}",
                  disable=not self.progress, leave=False, dynamic_ncols=True) as bar:
            while (cap is None or len(losses) < cap) and (period is None or pairs < period):
                for cb in self.callbacks:
                    cb.before_step(self)  # may change self.loader.batch_size for the next batch
                batch = self.loader.next_batch()
                if batch is None:  # the pass is over: the epoch too, unless epochs count pairs
                    if period is None:
                        break
                    continue
                t0 = time.perf_counter()
                loss = self.train_step(batch, epoch, len(losses) + 1)
                _sync(self.device)
                self.train_seconds += time.perf_counter() - t0
                self.examples += batch.n_pairs
                losses.append(loss)
                pairs += batch.n_pairs
                self._record_step(epoch, len(losses), batch, loss)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        return losses, pairs

    def train_step(self, batch: TrainBatch, epoch: int, step: int) -> float:
        """One optimizer update on ``batch``; returns its loss (before the update)."""
        batch = batch.to(self.device)

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.model.loss(batch)
            loss.backward()
            return loss

        if self.ddp is not None:  # this rank's share of the batch, through DDP
            closure = self._ddp_closure(batch)
        value = self._gradients(batch) if self.config.gradient_groups > 1 else closure().item()
        if not math.isfinite(value):
            kept = (f"the checkpoints of epoch {self.epoch} are kept in {self.checkpoint_dir}"
                    if self.checkpoint_dir is not None and self.epoch > 0 else "no checkpoint was written")
            raise TrainingDivergedError(f"{self.name}: training loss is {value} at epoch {epoch}, step {step}; "
                                        f"{kept}. Lower the learning rate or check the data.")
        for cb in self.callbacks:
            cb.after_backward(self, batch)
        if getattr(self.optimizer, "needs_closure", False):
            self.optimizer.step(closure)
        else:
            self.optimizer.step()
        return value

    def _gradients(self, batch: TrainBatch) -> float:
        """The batch's mean gradient as the pair-weighted mean of ``gradient_groups`` micro-batch
        gradients (about one backward pass of compute), put into ``p.grad``; the rows are kept in
        ``self.gradients`` for batch-size tests. Returns the batch's mean loss."""
        from paperlib.adaptive.grads import group_gradients, set_flat_grad

        groups = batch.split(min(self.config.gradient_groups, batch.items.shape[0]))
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.ddp is not None:
            self.gradients = self._sharded_group_gradients(params, groups)
        else:
            self.gradients = group_gradients(params, self.model.loss, groups, sizes=[g.n_pairs for g in groups])
        self.optimizer.zero_grad(set_to_none=True)
        set_flat_grad(params, self.gradients.mean)
        return self.gradients.loss

    def validate(self) -> dict[str, float]:
        """Validation metrics, with the optimizer's evaluation weights where it has them."""
        with self._evaluation_weights():
            return evaluate(self.model, self.data, "valid", self.config.eval_batch_size, self.config.ks, self.device,
                            **self._sharding)

    # ------------------------------------------------------------------ pieces
    def step_size(self) -> float:
        """The optimizer's current step size: its ``last_step_size`` if it reports one (adaptive
        methods), else the learning rate of its first parameter group."""
        size = getattr(self.optimizer, "last_step_size", None)
        return float(size if size is not None else self.optimizer.param_groups[0]["lr"])

    def _evaluation_weights(self):
        averaged = getattr(self.optimizer, "averaged", None)
        return averaged() if callable(averaged) else nullcontext()

    def _record_step(self, epoch: int, step: int, batch: TrainBatch, loss: float) -> None:
        record = {"epoch": epoch, "step": step, "batch_size": batch.n_pairs, "sequences": int(batch.items.shape[0]),
                  "step_size": self.step_size(), "examples": self.examples, "seconds": self.train_seconds,
                  "loss": loss}
        if self.config.record_steps:
            self.steps.append(record)
        for cb in self.callbacks:
            cb.after_step(self, record)

    def _log_epoch(self, entry: dict[str, Any]) -> None:
        if not distributed.is_main():
            return  # one log line per epoch, not one per rank
        metric = self.config.valid_metric
        k = metric.partition("@")[2]
        valid = entry["valid"]
        logger.info("%s epoch %d: loss %.4f | valid %s %.4f, hr@%s %.4f%s | %.1f s (train %.1f s, %d steps)",
                    self.name, entry["epoch"], entry["train_loss"], metric, valid[metric], k,
                    valid.get(f"hr@{k}", float("nan")), " *" if entry["improved"] else "", entry["seconds"],
                    entry["train_seconds"], entry["steps"])
        if self.stopping.stopped:
            logger.info("%s: no better %s for %d epochs, stopping; best epoch %d (%.4f)", self.name, metric,
                        self.stopping.bad_epochs, self.stopping.best_epoch, self.stopping.best_metric)

    # ------------------------------------------------------------------ several processes
    def _join_ranks(self) -> torch.nn.parallel.DistributedDataParallel | None:
        """In a process group of more than one rank: check that every rank has the same data and
        settings (an error on every rank otherwise), seed each rank's dropout, and wrap the loss
        in DDP. Without one: None, and the loop is the single-process one."""
        if not distributed.active():
            return None
        world, rank = distributed.world_size(), distributed.rank()
        if world > self.data.n_users:
            raise ValueError(f"{world} processes for the {self.data.n_users} users of {self.data.name!r}: use at "
                             f"most {self.data.n_users} processes (--nproc / --nproc_per_node)")
        distributed.check_same(distributed.data_checksum(self.data), f"the checksum of dataset {self.data.name!r}")
        shared = {k: v for k, v in self.config.to_dict().items() if k != "checkpoint_dir"}
        distributed.check_same(repr(sorted(shared.items())) + repr(sorted(self.model_cfg.items())),
                               "the training and model settings")
        if rank > 0:
            torch.manual_seed(self.config.seed + rank)  # each rank its own dropout stream
            self.progress = False
        ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP broadcasts rank 0's weights now: every rank starts from the same model
        return torch.nn.parallel.DistributedDataParallel(_ModelLoss(self.model), device_ids=ids)

    def _rank_share(self, batch: TrainBatch) -> tuple[TrainBatch, float]:
        """This rank's windows of the global ``batch`` and the weight of its mean loss,
        ``pairs_r * world / pairs``, so that DDP's average of the rank gradients is the global
        pair-weighted mean. A rank without a window gets the first one with weight 0."""
        world = distributed.world_size()
        counts = batch.counted.sum(dim=1).cpu().numpy()
        start, stop = distributed.share_bounds(counts, world)[distributed.rank()]
        if start == stop:
            return batch.rows(0, 1), 0.0
        local = batch.rows(start, stop)
        return local, local.n_pairs * world / batch.n_pairs

    def _ddp_closure(self, batch: TrainBatch):
        """The training closure of a rank: its share's scaled loss through DDP, backward (DDP
        all-reduces the gradients), and the global batch's mean loss, the same on every rank."""
        local, weight = self._rank_share(batch)
        world = distributed.world_size()

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.ddp(local) * weight
            loss.backward()
            return distributed.all_reduce_sum(loss.detach()) / world

        return closure

    def _sharded_group_gradients(self, params: list[torch.Tensor], groups: list[TrainBatch]):
        """G of the global batch's ``groups`` over the ranks: group j's mean gradient is computed
        on rank ``j mod world`` (exactly as one process computes it), the other rows are zero, and
        the sum over ranks is the G of one process; its mean and loss follow on every rank."""
        from paperlib.adaptive.grads import BatchGradients, group_gradients

        world, rank, m = distributed.world_size(), distributed.rank(), len(groups)
        sizes = torch.tensor([g.n_pairs for g in groups], dtype=torch.int64)
        rows = torch.zeros(m, sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=params[0].device)
        mine = list(range(rank, m, world))
        if mine:
            part = group_gradients(params, self.model.loss, [groups[j] for j in mine],
                                   sizes=[int(sizes[j]) for j in mine])
            rows[mine] = part.rows
            loss_sum += part.loss * part.batch_size
        rows = distributed.all_reduce_sum(rows)
        total = int(sizes.sum())
        mean = (sizes.to(rows.dtype).to(rows.device) @ rows) / total  # as group_gradients forms it
        loss = float(distributed.all_reduce_sum(loss_sum)) / total
        return BatchGradients(rows, sizes, mean, loss, "groups")

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        """``_read(path)``; in a process group rank 0 reads and broadcasts it (its error too, so
        that every rank raises it rather than wait)."""
        if not distributed.active():
            return _read(path)
        outcome: tuple[str, Any] = ("", None)
        if distributed.is_main():
            try:
                outcome = ("ok", _read(path))
            except (OSError, ValueError, RuntimeError) as exc:
                outcome = ("error", f"{type(exc).__name__}: {exc}")
        status, value = distributed.broadcast_object(outcome)
        if status != "ok":
            raise ValueError(f"rank 0 could not read the checkpoint {path}: {value}")
        return value

    # ------------------------------------------------------------------ checkpoints
    def save(self, improved: bool) -> None:
        """Write ``best.pt`` (if improved) then ``last.pt``, both atomically, at the end of an epoch."""
        common = {"format": CHECKPOINT_FORMAT, "model_name": self.name, "model_config": self.model_cfg}
        if improved:
            _atomic_save({**common, "model_state": self.best_state, "epoch": self.stopping.best_epoch,
                          "valid": self.best_valid}, self.checkpoint_dir / BEST)
        _atomic_save({
            **common,
            "train_config": self.config.to_dict(),
            "model_state": _cpu_state(self.model),
            "optimizer_state": self.optimizer.state_dict(),
            "rng": _rng_state(self.generator),
            "epoch": self.epoch,
            "history": self.history,
            "steps": self.steps,
            "examples": self.examples,
            "train_seconds": self.train_seconds,
            "loader": self.loader.state_dict(),
            "stopping": asdict(self.stopping),
            "best_valid": self.best_valid,
            "best_state": self.best_state,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
        }, self.checkpoint_dir / LAST)

    def _resume(self) -> None:
        if self.checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir to resume from")
        last = self.checkpoint_dir / LAST
        if not distributed.broadcast_object(last.is_file()):  # rank 0's disk decides for every rank
            logger.info("%s: no checkpoint at %s, training from scratch", self.name, last)
            return
        self.restore(last)
        logger.info("%s: resumed from %s after epoch %d", self.name, last, self.epoch)

    def restore(self, path: Path) -> None:
        """Load the whole loop state of ``last.pt``; refuses another model or configuration."""
        ckpt = self._read_checkpoint(path)
        if ckpt["model_name"] != self.name:
            raise ValueError(f"{path} holds a {ckpt['model_name']!r} run; cannot resume it with a {self.name!r} model")
        if ckpt["model_config"] != self.model_cfg:
            diff = {k: (ckpt["model_config"].get(k), v) for k, v in self.model_cfg.items()
                    if ckpt["model_config"].get(k) != v}
            raise ValueError(f"{path}: model config differs from the checkpoint's (checkpoint, given): {diff}")
        stored = ckpt.get("train_config", {})
        changed = [k for k in ("batch_size", "lr", "weight_decay", "seed", "max_steps_per_epoch", "valid_metric",
                               "window_stride", "eval_every_pairs", "gradient_groups")
                   if k in stored and stored[k] != getattr(self.config, k)]
        if changed:
            logger.warning("resuming %s with different %s: the run will not match an uninterrupted one", path, changed)
        if len(ckpt["callbacks"]) != len(self.callbacks):
            raise ValueError(f"{path} was written with {len(ckpt['callbacks'])} callback(s), this run has "
                             f"{len(self.callbacks)}: resume it with the same callbacks")
        self.model.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        _set_rng_state(ckpt["rng"], self.generator)
        if distributed.rank() > 0:  # the checkpoint holds rank 0's RNG; see the module docstring
            torch.manual_seed(self.config.seed + distributed.rank() + 1_000_003 * int(ckpt["examples"]))
        self.epoch, self.history, self.steps = ckpt["epoch"], list(ckpt["history"]), list(ckpt["steps"])
        self.examples, self.train_seconds = ckpt["examples"], ckpt["train_seconds"]
        self.loader.load_state_dict(ckpt["loader"])
        self.stopping = EarlyStopping(**ckpt["stopping"])
        self.stopping.patience = self.config.patience
        self.best_valid, self.best_state = dict(ckpt["best_valid"]), ckpt["best_state"]
        for cb, state in zip(self.callbacks, ckpt["callbacks"]):
            cb.load_state_dict(state)


def fit(
    model: SequentialRecommender,
    data: SequentialData,
    config: TrainConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    callbacks: Iterable[Callback] = (),
) -> FitResult:
    """Train ``model`` on ``data`` with early stopping and score the test split with the best
    weights: ``Trainer(...).fit(resume)`` (see :class:`Trainer` for the arguments)."""
    trainer = Trainer(model, data, config, optimizer=optimizer, callbacks=callbacks,
                      checkpoint_dir=checkpoint_dir, progress=progress)
    return trainer.fit(resume=resume)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "Callback",
    "EarlyStopping",
    "FitResult",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "evaluate",
    "fit",
    "load_checkpoint",
    "resolve_device",
    "set_seed",
]
