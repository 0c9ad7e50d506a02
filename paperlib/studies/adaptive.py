"""Study 05: adaptive batch size and step size for training Mamba4Rec (Figure 6, Figure 7, Table 5).

Mamba4Rec is trained on one dataset (ML-1M by default) with several *run configurations*, each a
string ``<optimizer>[+<batch-size test>]``:

* ``adam``: the baseline, Adam at a fixed batch (the quality study's recipe: 2,048 (prefix, target)
  pairs a step, learning rate 1e-3);
* ``adam+norm``, ``adam+inner_product``, ``adam+orthogonality``, ``adam+augmented``: Adam with the
  batch grown by a batch-size test (:mod:`paperlib.adaptive.batch_tests`) through AdaBatchGrad's
  schedule (:class:`paperlib.adaptive.controller.BatchSizeController`);
* ``adagrad_norm+inner_product``: AdaBatchGrad itself (AdaGrad-Norm step and the inner-product
  test); ``adagrad_norm`` alone is AdaGrad-Norm at the fixed batch;
* ``usgm`` and ``usgm+<test>``: the universal stochastic gradient method at the fixed or an
  adaptive batch (evaluated at the average of its iterates, the point its guarantee is for).

Every run gets the same budget of training pairs (``passes`` passes over the data) and is validated
every ``1 / evals_per_pass`` of a pass, so the curves of Figure 6 have points at the same numbers
of examples whatever the batch size. Time is training time (validation excluded), measured as the
runs go: it includes the extra cost of the micro-batch gradients the batch-size tests need.
Table 5 reads off, for each run, the training time and the examples it took to first reach a
target validation NDCG@10, 95 % of the baseline's best (resolution: one evaluation period).

Validation: to afford enough points on two CPU cores, the curves' validation NDCG@10 is measured
on a fixed random subset of ``valid_users`` users (all users when 0); the test split is always
scored on every user, with the weights of the best validation point.

Per-step records (batch size, step size, examples, time; ``FitResult.steps``) and the batch-size
controller's records (``AdaptiveBatchSize.records()``) are thinned before they go into the results
JSON when a run has more than ``max_step_records`` of them: evenly spaced records plus every step
at which the scheduled batch size changed, so the batch-size trajectory of Figure 7 stays exact;
the counts (steps, tests passed, skipped, capped) are over all steps.

Step-size settings (assumed, not from the paper). The optimizers' steps are not scale-free, so
AdaGrad-Norm's ``alpha`` and USGM's radius ``D`` were chosen by a short probe: Mamba4Rec on 1,500
ML-1M users (a seed-0 subset), batch 2,048 pairs, seed 2020, validation NDCG@10 on the same users
twice a pass. Adam (lr 1e-3), the reference: 0.0167 after 1 pass, 0.0279 after 2, 0.0484 after 3.

* AdaGrad-Norm (beta 1; the mini-batch gradient norm is about 0.4, so the step h_k falls about as
  alpha / (0.4 sqrt(k))): alpha 0.3 gave 0.0071 after 2 passes, alpha 1 0.0095, alpha 3 0.0289,
  alpha 10 0.0446; alpha 30 diverged (NaN loss at step 7). Chosen: alpha 10.
* USGM (1.5 passes; its first step jumps to distance D from the initial weights): D 1 gave
  0.0048, D 3 0.0090, D 10 0.0145 (the iterates ended 8.7 from the start), D 30 0.0026, D 100
  0.0052 (the first jump to the ball's edge costs more than the larger ball gains). Chosen: D 10.

Batch settings (assumed, not from the paper): the adaptive runs start at 512 pairs (a quarter of
the baseline's batch; the smallest the loader takes is one window, 200 pairs on ML-1M) and estimate
the variance from 8 micro-batch gradients (fewer where the batch has fewer windows). Measured on
ML-1M (0.1 pass from the start, seed 2020): the inner-product and orthogonality tests passed at
nearly every step at 512 pairs, so their batch did not grow; the norm test grew it 512 -> 574 pairs
(and 1,024 -> 1,414 from a first batch of 1,024); on 700 ML-1M users over 1.5 passes, 512 -> 935.

Measured costs (2 CPU cores shared with other jobs, one thread, load average 2-5; timings vary
with the load by up to 2x): a baseline step (2,048 pairs) 0.21-0.33 s, about 6,000-8,000 pairs/s;
an adaptive-batch step at 512-1,400 pairs with its micro-batch gradients 0.13-0.33 s, about
2,600-3,300 pairs/s, so while its batch is small an adaptive-batch run costs about twice the
baseline per pair (1.3-1.9x measured side by side on 700 users); validation 11 s for 2,000 users,
32 s for all 6,040 (the test split of each run). The ``quick`` preset (8 runs, 1.5 passes =
1.47 M pairs each, 9 validations on 2,000 users): Adam and USGM about 185 s each, the six
adaptive-batch runs about 370 s each, validation 8 x 9 x 11 s, tests 8 x 32 s: about 3,600 s, an
hour (up to two on a heavily loaded machine). The ``paper`` preset (30 passes, 3 seeds, validation
on every user) is about 50 hours on such a CPU: a GPU is advised.

Checkpoints go to ``<checkpoints>/adaptive/<preset>/<dataset>/<run>-<key>/<seed>``
(``paths.checkpoints_dir``), the key naming the exact settings and training code, so an interrupted compute
run resumes where it stopped; runs recorded in the results JSON under the same key are reused.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from paperlib import paths, results
from paperlib.adaptive.batch_tests import TESTS
from paperlib.config import StudyParams
from paperlib.data import DATASETS, count_pairs, load_dataset, training_windows
from paperlib.fields import ConfigError, param
from paperlib.runtime import TRAINING_CODE, run_key
from paperlib.studies import Study
from paperlib.studies.quality import AMAZON_MAMBA_DROPOUT, parse_model_spec, run_label

OPTIMIZERS: tuple[str, ...] = ("adam", "adagrad_norm", "usgm")
OPTIMIZER_LABELS = {"adam": "Adam", "adagrad_norm": "AdaGrad-Norm", "usgm": "USGM"}
TEST_LABELS = {"norm": "norm test", "inner_product": "inner-product test", "orthogonality": "orthogonality test",
               "augmented": "augmented test"}
#: the share of the baseline's best validation NDCG@10 that Table 5 times the runs to
TARGET_FRACTION = 0.95
METRIC = "ndcg@10"


# --------------------------------------------------------------------------- run configurations
@dataclass(frozen=True)
class RunSpec:
    """One run configuration: an optimizer and, for an adaptive batch, a batch-size test."""

    optimizer: str
    test: str | None = None

    @property
    def name(self) -> str:
        """The configuration's string, as the ``runs`` parameter writes it: ``adam+norm``."""
        return self.optimizer + (f"+{self.test}" if self.test else "")

    @property
    def adaptive_batch(self) -> bool:
        return self.test is not None

    @property
    def label(self) -> str:
        """Display name: ``Adam + norm test``; AdaGrad-Norm with the inner-product test is AdaBatchGrad."""
        text = OPTIMIZER_LABELS[self.optimizer] + (f" + {TEST_LABELS[self.test]}" if self.test else "")
        if self.optimizer == "adagrad_norm" and self.test == "inner_product":
            text += " (AdaBatchGrad)"
        return text


def parse_run(name: str) -> RunSpec:
    """``"adagrad_norm+inner_product"`` -> ``RunSpec("adagrad_norm", "inner_product")``.

    A run configuration is an optimizer (adam, adagrad_norm, usgm), optionally followed by ``+`` and
    a batch-size test (norm, inner_product, orthogonality, augmented) that grows the batch; without
    a test the batch is fixed.
    """
    if not isinstance(name, str):
        raise ConfigError(f"a run configuration must be a string such as 'adam+norm', got {name!r}")
    optimizer, plus, test = (part.strip() for part in name.partition("+"))
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r} in run {name!r}: write <optimizer>[+<test>] with "
                          f"optimizer one of {', '.join(OPTIMIZERS)}")
    if plus and test not in TESTS:
        raise ConfigError(f"unknown batch-size test {test!r} in run {name!r}: write <optimizer>[+<test>] with "
                          f"test one of {', '.join(TESTS)} (or no '+' for a fixed batch)")
    return RunSpec(optimizer, test if plus else None)


@dataclass
class AdaptiveParams(StudyParams):
    """Parameters of ``05_adaptive`` (defaults: the ``quick`` preset)."""

    dataset: str = param("ml-1m", "dataset to train and test on", choices=tuple(DATASETS))
    model: str = param("mamba4rec", "model spec: a name, or a name with config options, e.g. mamba4rec{n_layers: 2}")
    runs: list[str] = param(
        ["adam", "adam+norm", "adam+inner_product", "adam+orthogonality", "adam+augmented",
         "adagrad_norm+inner_product", "usgm", "usgm+inner_product"],
        "run configurations: an optimizer (adam, adagrad_norm, usgm), optionally +test (norm, inner_product, "
        "orthogonality, augmented) for an adaptive batch")
    baseline: str = param("adam", "the run whose best validation NDCG@10 sets the target of Table 5")
    seeds: list[int] = param([2020], "one run per seed and configuration", min=0)
    passes: float = param(1.5, "training budget of every run, in passes over the training pairs", min=0.0)
    evals_per_pass: int = param(6, "validations per pass over the training pairs (points of the curves)", min=1)
    valid_users: int = param(2000, "validate on a fixed random subset of this many users, 0 for all (assumed, "
                             "not from the paper); the test split always uses every user", min=0)
    batch_size: int = param(2048, "pairs per step of the fixed-batch runs (the quality study's recipe)", min=1)
    lr: float = param(0.001, "Adam's learning rate (the quality study's recipe)", min=0.0)
    initial_batch: int = param(512, "pairs in the first step of an adaptive-batch run (assumed, not from the "
                               "paper); at least the targets of one training window", min=2)
    max_batch: int = param(0, "cap on an adaptive batch in pairs, 0 for a pass over the training data", min=0)
    gradient_groups: int = param(8, "micro-batches whose gradients estimate the variance for the batch-size "
                                 "tests (assumed, not from the paper)", min=2)
    theta: float = param(0.9, "accuracy of the norm and inner-product tests (AdaBatchGrad's test code)")
    nu: float = param(5.84, "accuracy of the orthogonality test (AdaBatchGrad's test code)")
    window: int = param(5, "k: the batch grows to the smallest of the last k proposals (AdaBatchGrad)", min=1)
    alpha: float = param(10.0, "AdaGrad-Norm's step scale (assumed, not from the paper: see the probe)")
    beta: float = param(1.0, "AdaGrad-Norm's initial accumulator (AdaBatchGrad: 1)")
    radius: float = param(10.0, "USGM's radius D around the initial weights (assumed, not from the paper: "
                          "see the probe)")
    max_step_records: int = param(100, "per-step records kept per run in the results JSON (thinned beyond)", min=2)
    eval_batch_size: int = param(1024, "users per evaluation batch", min=1)
    max_users: int = param(0, "train and evaluate on a random subset of this many users, 0 for all (smoke runs)",
                           min=0)
    device: str = param("auto", "auto (CUDA when present), cpu or cuda")
    resume: bool = param(True, "continue interrupted runs from their checkpoints; reuse finished ones")

    def validate(self) -> None:
        for name in ("theta", "nu", "alpha", "beta", "radius", "lr", "passes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"'{name}' must be a positive finite number, got {value!r}")
        if not self.runs or not self.seeds:
            raise ConfigError("'runs' and 'seeds' must each name at least one entry")
        specs = [parse_run(r) for r in self.runs]
        names = [s.name for s in specs]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ConfigError(f"'runs' names {duplicated} more than once")
        if parse_run(self.baseline).name not in names:
            raise ConfigError(f"'baseline' {self.baseline!r} is not one of the runs {names}: add it to 'runs'")
        if self.max_batch and self.max_batch < self.initial_batch:
            raise ConfigError(f"'max_batch' ({self.max_batch}) is below 'initial_batch' ({self.initial_batch}): "
                              "raise it, or use 0 for a pass over the data")
        parse_model_spec(self.model)

    def specs(self) -> list[RunSpec]:
        return [parse_run(r) for r in self.runs]


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Plan:
    """The sizes every run of one dataset shares (pairs)."""

    train_pairs: int  # RecBole (prefix, target) pairs in one pass
    largest_window: int  # the smallest batch the loader can take
    budget: int  # pairs each run trains on (at least)
    eval_every: int  # pairs between validations
    periods: int  # the most validations a run needs to spend its budget
    max_batch: int  # cap on an adaptive batch

    @classmethod
    def of(cls, data: Any, cfg: AdaptiveParams) -> "Plan":
        n = count_pairs(data)
        largest = int(training_windows(data).n_targets.max())
        budget = max(1, round(cfg.passes * n))
        every = math.ceil(n / cfg.evals_per_pass)
        max_batch = min(cfg.max_batch or n, n)
        if cfg.max_batch > n:
            print(f"max_batch {cfg.max_batch:,} is more than a pass over {data.name} ({n:,} pairs): capped at {n:,}")
        for name in ("batch_size", "initial_batch"):
            value = getattr(cfg, name)
            if value < largest:
                raise ConfigError(f"'{name}' {value} is smaller than the {largest} targets of one training window of "
                                  f"{data.name} (a window is never split): use at least {largest}")
            if value > n:
                raise ConfigError(f"'{name}' {value:,} is larger than a pass over {data.name} ({n:,} pairs): use at "
                                  f"most {n:,}")
        return cls(train_pairs=n, largest_window=largest, budget=budget, eval_every=every,
                   periods=math.ceil(budget / every), max_batch=max_batch)


def _callbacks() -> tuple[type, type, type]:
    """The study's trainer pieces (imported late: the trainer pulls in torch and the models)."""
    from paperlib.train import Callback, Trainer, evaluate

    class Budgets(Callback):
        """The loader's batch size (the budget in pairs) each step was drawn with, one per step,
        aligned with ``trainer.steps``; checkpointed with the run."""

        def __init__(self) -> None:
            self.values: list[int] = []
            self._current = 0

        def before_step(self, trainer: Trainer) -> None:
            self._current = trainer.loader.batch_size

        def after_step(self, trainer: Trainer, record: dict[str, Any]) -> None:
            self.values.append(self._current)

        def state_dict(self) -> dict[str, Any]:
            return {"values": list(self.values)}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.values = [int(v) for v in state["values"]]

    class PairBudget(Callback):
        """Ends the run at the first validation after ``budget`` training pairs (a period may
        overshoot its length by up to one batch, so counting periods alone could overshoot more)."""

        def __init__(self, budget: int) -> None:
            self.budget = budget

        def on_epoch_end(self, trainer: Trainer, entry: dict[str, Any]) -> None:
            if trainer.examples >= self.budget:
                trainer.stopping.stopped = True

    class StudyTrainer(Trainer):
        """The trainer, validating on ``valid_data`` (a fixed subset of the users)."""

        def __init__(self, *args: Any, valid_data: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.valid_data = valid_data

        def validate(self) -> dict[str, float]:
            with self._evaluation_weights():
                return evaluate(self.model, self.valid_data, "valid", self.config.eval_batch_size, self.config.ks,
                                self.device)

    return Budgets, PairBudget, StudyTrainer


def make_optimizer(spec: RunSpec, parameters: Any, cfg: AdaptiveParams):
    """The optimizer of ``spec``; None for Adam (the trainer builds it from ``lr``)."""
    from paperlib.adaptive import USGM, AdaGradNorm

    if spec.optimizer == "adagrad_norm":
        return AdaGradNorm(parameters, alpha=cfg.alpha, beta=cfg.beta)
    if spec.optimizer == "usgm":
        return USGM(parameters, radius=cfg.radius)
    return None


def optimizer_settings(spec: RunSpec, cfg: AdaptiveParams) -> dict[str, float]:
    return {"adam": {"lr": cfg.lr}, "adagrad_norm": {"alpha": cfg.alpha, "beta": cfg.beta},
            "usgm": {"radius": cfg.radius}}[spec.optimizer]


def thin(n: int, limit: int, keep: list[int] | tuple[int, ...] = ()) -> list[int]:
    """Indices of the records to keep out of ``n``: all when ``n <= limit``, else ``limit`` evenly
    spaced ones (first and last included) plus the indices in ``keep``."""
    if n <= limit:
        return list(range(n))
    spaced = np.unique(np.round(np.linspace(0, n - 1, limit)).astype(int)).tolist()
    return sorted(set(spaced) | {i for i in keep if 0 <= i < n})


def _changes(values: list[int]) -> list[int]:
    """Indices where a sequence changes value: kept with any others, they draw its step plot exactly."""
    return [i for i in range(1, len(values)) if values[i] != values[i - 1]]


def _short(x: float | None, digits: int = 5) -> float | None:
    """``x`` to ``digits`` significant digits (keeps the results JSON small); None stays None."""
    return None if x is None else float(f"{x:.{digits}g}")


def _step_entries(steps: list[dict[str, Any]], budgets: list[int], limit: int) -> list[dict[str, Any]]:
    keep = thin(len(steps), limit, _changes(budgets))
    return [{"index": i, "examples": steps[i]["examples"], "seconds": round(steps[i]["seconds"], 3),
             "batch_size": steps[i]["batch_size"], "budget": budgets[i], "step_size": _short(steps[i]["step_size"]),
             "loss": _short(steps[i]["loss"])} for i in keep]


def _test_entries(records: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """The batch-size controller's records, thinned, with counts over all of them."""
    keep = thin(len(records), limit, _changes([r["budget"] for r in records]))
    fields = ("step", "batch_size", "statistic", "threshold", "passed", "proposal", "budget", "capped", "skipped")
    return {
        "tested": len(records),
        "passed": sum(r["passed"] is True for r in records),
        "skipped": sum(r["skipped"] is not None for r in records),
        "capped": sum(bool(r["capped"]) for r in records),
        "records": [{k: _short(records[i][k]) if k in ("statistic", "threshold") else records[i][k] for k in fields}
                    for i in keep],
    }


def train_run(spec: RunSpec, seed: int, data: Any, valid_data: Any, plan: Plan, cfg: AdaptiveParams,
              progress: bool = True, finished: dict[str, dict] | None = None) -> dict[str, Any]:
    """Train one (configuration, seed) and return its entry of the results JSON."""
    from paperlib.adaptive import BatchSizeConfig
    from paperlib.adaptive.training import AdaptiveBatchSize
    from paperlib.models import build_model
    from paperlib.train import TrainConfig, TrainingDivergedError

    Budgets, PairBudget, StudyTrainer = _callbacks()
    name, overrides = parse_model_spec(cfg.model)
    if name == "mamba4rec" and cfg.dataset.startswith("amazon") and "dropout" not in overrides:
        overrides["dropout"] = AMAZON_MAMBA_DROPOUT
    model = build_model(name, n_items=data.n_items, max_len=data.max_len, seed=seed, **overrides)
    tc = TrainConfig(
        epochs=plan.periods, batch_size=cfg.initial_batch if spec.adaptive_batch else cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size, lr=cfg.lr, patience=plan.periods, seed=seed, device=cfg.device,
        record_steps=True, eval_every_pairs=plan.eval_every,
        gradient_groups=cfg.gradient_groups if spec.adaptive_batch else 1,
    )
    batch_cfg = (BatchSizeConfig(max_batch=plan.max_batch, test=spec.test, theta=cfg.theta, nu=cfg.nu,
                                 window=cfg.window, initial_batch=cfg.initial_batch)
                 if spec.adaptive_batch else None)
    settings = optimizer_settings(spec, cfg)
    key = run_key(spec.name, asdict(model.config), tc.to_dict(), settings, batch_cfg and asdict(batch_cfg),
                  plan.budget, cfg.valid_users, cfg.max_users, data.n_users, code=TRAINING_CODE)
    if progress:
        print(f"[{cfg.dataset} · {spec.label} · seed {seed}]", flush=True)
    if finished and key in finished:
        if progress:
            print("  finished earlier with the same settings and code: reused, not retrained", flush=True)
        return finished[key]
    budgets = Budgets()
    adaptive = AdaptiveBatchSize(batch_cfg) if batch_cfg else None
    callbacks = [c for c in (adaptive, budgets, PairBudget(plan.budget)) if c is not None]
    ckpt = paths.checkpoints_dir() / STUDY.name / cfg.preset / cfg.dataset / f"{spec.name}-{key}" / str(seed)
    trainer = StudyTrainer(model, data, tc, optimizer=make_optimizer(spec, model.parameters(), cfg),
                           callbacks=callbacks, checkpoint_dir=ckpt, progress=progress, valid_data=valid_data)
    diverged, test, best_epoch = None, None, None
    try:
        res = trainer.fit(resume=cfg.resume)
        test, best_epoch = res.test, res.best_epoch
    except (TrainingDivergedError, FloatingPointError) as err:
        # the trainer names the epoch and step and keeps the last good checkpoint; the other runs go on
        diverged = str(err)
        print(f"  stopped: {diverged}", flush=True)
    steps = trainer.steps
    return {
        "run": spec.name, "label": spec.label, "optimizer": spec.optimizer, "test_name": spec.test, "seed": seed,
        "key": key, "optimizer_settings": settings, "batch_config": batch_cfg and asdict(batch_cfg),
        "gradient_groups": tc.gradient_groups, "n_params": sum(p.numel() for p in model.parameters()),
        "history": trainer.history, "best_epoch": best_epoch, "best_valid": trainer.best_valid, "test": test,
        # time as the history counts it (every step, its batch and its test), so totals match the curves
        "diverged": diverged, "examples": trainer.examples,
        "train_seconds": float(sum(h["train_seconds"] for h in trainer.history)),
        "n_steps": len(steps), "final_budget": budgets.values[-1] if budgets.values else None,
        "steps": _step_entries(steps, budgets.values, cfg.max_step_records),
        "batch_tests": _test_entries(adaptive.records(), cfg.max_step_records) if adaptive else None,
    }


def compute(cfg: AdaptiveParams, progress: bool = True) -> dict:
    """Train every (configuration, seed); write the results JSON and return it."""
    started, t0 = results.now_iso(), time.perf_counter()
    if progress:
        _log_to_stdout()
    data = load_dataset(cfg.dataset)
    if cfg.max_users:
        data = data.subset(cfg.max_users, seed=0)
    valid_data = data.subset(cfg.valid_users, seed=1) if 0 < cfg.valid_users < data.n_users else data
    plan = Plan.of(data, cfg)  # checks the batch sizes against the data before anything trains
    if progress:
        print(f"{cfg.dataset}: {data.n_users:,} users, {plan.train_pairs:,} training pairs a pass; every run trains "
              f"on {plan.budget:,} pairs, validated every {plan.eval_every:,} pairs on {valid_data.n_users:,} users",
              flush=True)
    finished = _finished_runs(cfg) if cfg.resume else {}
    runs = [train_run(spec, seed, data, valid_data, plan, cfg, progress, finished)
            for spec in cfg.specs() for seed in cfg.seeds]
    payload = {
        "runs": runs,
        "dataset": {"name": cfg.dataset, "users": data.n_users, "items": data.n_items, "max_len": data.max_len,
                    "valid_users": valid_data.n_users, **asdict(plan)},
        "protocol": {
            "time": "training time (validation and test excluded), including the micro-batch gradients of the "
                    "batch-size tests",
            "examples": "(prefix, target) training pairs, as RecBole counts its batches",
            "target": f"{TARGET_FRACTION:g} x the best validation {METRIC} of the baseline (mean over seeds)",
            "reach": "the first validation at or above the target (resolution: one validation period)",
            "test": f"every user, weights of the best validation {METRIC}",
            "thinning": f"per-step and batch-test records: at most {cfg.max_step_records} evenly spaced ones a run, "
                        "plus every step where the scheduled batch size changed",
        },
    }
    results.save_results(STUDY.name, cfg.preset, cfg.to_dict(), payload, output_dir=cfg.output_dir,
                         wall_seconds=time.perf_counter() - t0, started=started)
    return STUDY.load(cfg)


def _finished_runs(cfg: AdaptiveParams) -> dict[str, dict]:
    """Finished runs of the existing results JSON of this preset, by key."""
    try:
        doc = results.load_results(STUDY.name, cfg.preset, cfg.output_dir)
    except results.ResultsError:
        return {}
    return {r["key"]: r for r in doc["results"]["runs"] if r.get("key") and not r.get("diverged")}


def _log_to_stdout() -> None:
    """Show the trainer's line per validation and the batch-size cap messages (once per process)."""
    for name in ("paperlib.train", "paperlib.adaptive"):
        log = logging.getLogger(name)
        if not any(getattr(h, "_paperlib", False) for h in log.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler._paperlib = True  # type: ignore[attr-defined]
            log.addHandler(handler)
            log.setLevel(logging.INFO)


# --------------------------------------------------------------------------- analysis (JSON only)
def curve(history: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per validation of a run: cumulative ``examples`` and training ``seconds`` (validation
    excluded) at that point, and the validation ``ndcg``."""
    return pd.DataFrame({
        "validation": [h["epoch"] for h in history],
        "examples": np.cumsum([h["pairs"] for h in history], dtype=np.int64),
        "seconds": np.cumsum([h["train_seconds"] for h in history]),
        "ndcg": [h["valid"][METRIC] for h in history],
    })


def time_to_target(history: list[dict[str, Any]], target: float) -> dict[str, float] | None:
    """Training time and examples at the first validation whose NDCG@10 is at least ``target``;
    None if the run never reaches it."""
    points = curve(history)
    reached = points[points["ndcg"] >= target]
    if reached.empty:
        return None
    first = reached.iloc[0]
    return {"seconds": float(first["seconds"]), "examples": int(first["examples"]),
            "validation": int(first["validation"])}


def _baseline(doc: dict) -> str:
    return parse_run(doc["params"]["baseline"]).name


def target(doc: dict) -> dict[str, float] | None:
    """The target of Table 5: ``TARGET_FRACTION`` x the baseline's best validation NDCG@10 (mean over
    its seeds that trained without diverging); None when no baseline run has a validation."""
    bests = [max(h["valid"][METRIC] for h in r["history"]) for r in doc["results"]["runs"]
             if r["run"] == _baseline(doc) and r["history"]]
    if not bests:
        return None
    best = float(np.mean(bests))
    return {"baseline_best": best, "fraction": TARGET_FRACTION, "value": TARGET_FRACTION * best}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def table5_numeric(doc: dict) -> pd.DataFrame:
    """Table 5 as numbers, one row per configuration (means over seeds; time and examples to the
    target over the seeds that reached it)."""
    tgt = target(doc)
    rows = []
    runs = doc["results"]["runs"]
    for name in dict.fromkeys(r["run"] for r in runs):
        mine = [r for r in runs if r["run"] == name]
        reach = [time_to_target(r["history"], tgt["value"]) if tgt else None for r in mine]
        hit = [x for x in reach if x is not None]
        tests = [r["test"][METRIC] for r in mine if r["test"]]
        rows.append({
            "configuration": mine[0]["label"], "run": name, "seeds": len(mine),
            "reached": len(hit), "diverged": sum(bool(r["diverged"]) for r in mine),
            "seconds_to_target": _mean([x["seconds"] for x in hit]),
            "examples_to_target": _mean([x["examples"] for x in hit]),
            "test_ndcg@10": _mean(tests),
            "test_ndcg@10_std": float(np.std(tests, ddof=1)) if len(tests) > 1 else float("nan"),
            "best_valid_ndcg@10": _mean([max(h["valid"][METRIC] for h in r["history"]) for r in mine if r["history"]]),
            "train_seconds": _mean([r["train_seconds"] for r in mine]),
            "examples": _mean([r["examples"] for r in mine]),
            "steps": _mean([r["n_steps"] for r in mine]),
            "final_batch": _mean([r["final_budget"] for r in mine if r["final_budget"] is not None]),
        })
    df = pd.DataFrame(rows).set_index("run")
    base = df.loc[_baseline(doc)]
    df["time_vs_baseline"] = df["seconds_to_target"] / base["seconds_to_target"]
    df["examples_vs_baseline"] = df["examples_to_target"] / base["examples_to_target"]
    return df


def _seconds(v: float) -> str:
    """Seconds for display: one decimal below 10 s, none above; a dash for none."""
    if not np.isfinite(v):
        return "—"
    return f"{v:.1f}" if v < 10 else f"{v:,.0f}"


def table5(doc: dict) -> pd.DataFrame:
    """Table 5 for display: time and examples to the target, test NDCG@10, total time."""
    df = table5_numeric(doc)
    fmt_int = lambda v: "—" if not np.isfinite(v) else f"{v:,.0f}"  # noqa: E731
    fmt_ratio = lambda v: "—" if not np.isfinite(v) else f"{v:.2f}"  # noqa: E731
    out = pd.DataFrame({
        "configuration": df["configuration"],
        "reached target": [f"{r}/{s}" for r, s in zip(df["reached"], df["seeds"])],
        "time to target (s)": df["seconds_to_target"].map(_seconds),
        "× baseline time": df["time_vs_baseline"].map(fmt_ratio),
        "examples to target": df["examples_to_target"].map(fmt_int),
        "× baseline examples": df["examples_vs_baseline"].map(fmt_ratio),
        "test NDCG@10": [("—" if not np.isfinite(m) else f"{m:.4f}" + (f" ± {s:.4f}" if np.isfinite(s) else ""))
                         for m, s in zip(df["test_ndcg@10"], df["test_ndcg@10_std"])],
        "total training time (s)": df["train_seconds"].map(_seconds),
        "examples": df["examples"].map(fmt_int),
        "steps": df["steps"].map(fmt_int),
        "final batch (pairs)": df["final_batch"].map(fmt_int),
    })
    return out.set_index("configuration")


def _better(df: pd.DataFrame, column: str, baseline: str) -> tuple[str | None, str | None]:
    """(fastest other configuration that beat the baseline on ``column``, fastest other overall)."""
    others = df.drop(index=baseline)
    others = others[np.isfinite(others[column])]
    if others.empty:
        return None, None
    best = others[column].idxmin()
    beat = best if others.loc[best, column] < df.loc[baseline, column] else None
    return beat, best


def summary(doc: dict) -> str:
    """The sentences under Table 5, generated from the results: the target, and which configuration
    other than the baseline (if any) reached it sooner, in training time and in examples, and by
    how much."""
    tgt = target(doc)
    df = table5_numeric(doc)
    base = _baseline(doc)
    if tgt is None:
        return "The baseline has no validation point (it diverged before its first validation): no target."
    b = df.loc[base]
    lines = [f"Target: validation NDCG@10 ≥ {tgt['value']:.4f}, {100 * TARGET_FRACTION:.0f} % of the best of the "
             f"baseline ({b['configuration']}, {tgt['baseline_best']:.4f}). The baseline first reached it after "
             f"{_seconds(b['seconds_to_target'])} s of training and {b['examples_to_target']:,.0f} examples."]
    for column, what, unit in (("seconds_to_target", "in training time", "s"),
                               ("examples_to_target", "in examples", "examples")):
        beat, best = _better(df, column, base)
        fmt = (lambda v: f"{_seconds(v)} s") if unit == "s" else (lambda v: f"{v:,.0f} examples")
        if beat is not None:
            r = df.loc[beat]
            lines.append(f"- **{what.capitalize()}**: {r['configuration']} reached the target soonest, after "
                         f"{fmt(r[column])} against the baseline's {fmt(b[column])} "
                         f"({100 * (1 - r[column] / b[column]):.0f} % less).")
            others = [df.loc[i, "configuration"] for i in df.index
                      if i not in (base, beat) and df.loc[i, column] < b[column]]
            if others:
                lines[-1] += " Also sooner than the baseline: " + ", ".join(others) + "."
        elif best is not None and df.loc[best, column] == b[column]:
            r = df.loc[best]
            lines.append(f"- **{what.capitalize()}**: no other configuration reached the target sooner than the "
                         f"baseline; {r['configuration']} reached it at the same validation "
                         f"({fmt(r[column])}).")
        elif best is not None:
            r = df.loc[best]
            lines.append(f"- **{what.capitalize()}**: no other configuration reached the target sooner than the "
                         f"baseline; the nearest, {r['configuration']}, took {fmt(r[column])} "
                         f"({r[column] / b[column]:.2f} × the baseline's {fmt(b[column])}).")
        else:
            lines.append(f"- **{what.capitalize()}**: no other configuration reached the target.")
    finals: dict[str, list[int]] = {}  # final batch of each adaptive-batch configuration, over its seeds
    first: dict[str, int] = {}
    for r in doc["results"]["runs"]:
        if r.get("batch_tests") and r["final_budget"] is not None:
            finals.setdefault(r["label"], []).append(r["final_budget"])
            first[r["label"]] = r["batch_config"]["initial_batch"]
    flat = [label for label, sizes in finals.items() if max(sizes) == first[label]]
    if flat:
        k = doc["params"]["window"]
        lines.append(f"- The batch never grew in: {', '.join(flat)} (no {k} consecutive proposals of the test all "
                     "asked for more than the first batch), so these runs differ from a fixed small batch only by "
                     "the cost of the tests.")
    grown = {label: sizes for label, sizes in finals.items() if label not in flat}
    if grown:
        lines.append("- Final batch of the runs whose batch grew: " + ", ".join(
            f"{label} {min(sizes):,}" + (f"–{max(sizes):,}" if max(sizes) != min(sizes) else "") + " pairs"
            for label, sizes in grown.items()) + ".")
    missed = [df.loc[i, "configuration"] for i in df.index if df.loc[i, "reached"] == 0]
    if missed:
        lines.append("- Never reached the target within the budget: " + ", ".join(missed) + ".")
    diverged = [df.loc[i, "configuration"] for i in df.index if df.loc[i, "diverged"]]
    if diverged:
        lines.append("- Stopped on a NaN or infinite loss: " + ", ".join(diverged) + ".")
    return "\n".join(lines)


def batch_test_table(doc: dict) -> pd.DataFrame:
    """Per adaptive-batch run: steps, steps tested (a batch of one window cannot be split),
    tests passed, skipped (zero gradient), capped at ``max_batch``, first and final batch."""
    rows = []
    for r in doc["results"]["runs"]:
        bt = r["batch_tests"]
        if bt is None:
            continue
        rows.append({"configuration": r["label"], "seed": r["seed"], "steps": r["n_steps"], "tested": bt["tested"],
                     "passed": bt["passed"], "skipped (zero gradient)": bt["skipped"],
                     "capped at max_batch": bt["capped"],
                     "first batch": r["batch_config"]["initial_batch"], "final batch": r["final_budget"]})
    return pd.DataFrame(rows).set_index(["configuration", "seed"]) if rows else pd.DataFrame()


def settings_table(doc: dict) -> pd.DataFrame:
    """The settings of the runs and where each comes from, read from the results' parameters."""
    p, ds = doc["params"], doc["results"]["dataset"]
    assumed = "assumed, not from the paper"
    rows = [
        ("model", p["model"], "Mamba4Rec's official settings (quality study)"),
        ("dataset", f"{ds['name']}: {ds['users']:,} users, {ds['train_pairs']:,} training pairs a pass", "—"),
        ("budget per run", f"{ds['budget']:,} pairs ({p['passes']:g} passes)", assumed),
        ("validation", f"every {ds['eval_every']:,} pairs on {ds['valid_users']:,} users", assumed),
        ("baseline", f"{p['baseline']}: batch {p['batch_size']:,} pairs, lr {p['lr']:g}",
         "the quality study's recipe (RecBole / Mamba4Rec)"),
        ("adaptive batch", f"from {p['initial_batch']:,} pairs, at most {ds['max_batch']:,}; "
                           f"{p['gradient_groups']} micro-batch gradients a step", assumed),
        ("theta, nu, k", f"{p['theta']:g}, {p['nu']:g}, {p['window']}", "AdaBatchGrad's test code"),
        ("AdaGrad-Norm alpha, beta", f"{p['alpha']:g}, {p['beta']:g}", f"alpha {assumed} (probe); beta AdaBatchGrad"),
        ("USGM radius D", f"{p['radius']:g}", f"{assumed} (probe)"),
        ("seeds", ", ".join(str(s) for s in p["seeds"]), "—"),
    ]
    return pd.DataFrame(rows, columns=["setting", "value", "source"]).set_index("setting")


#: line style per optimizer and marker per batch-size test, so that curves which coincide (runs whose
#: batch never grew draw the same batches) stay apart by their markers
LINESTYLES = {"adam": "-", "adagrad_norm": "--", "usgm": ":"}
MARKERS = {None: "o", "norm": "s", "inner_product": "^", "orthogonality": "v", "augmented": "D"}


def _styles(doc: dict) -> dict[str, dict[str, Any]]:
    """Matplotlib style of each configuration: the baseline black and thicker, the others in the
    palette's colours, line style by optimizer, marker by test."""
    names = list(dict.fromkeys(r["run"] for r in doc["results"]["runs"]))
    base = _baseline(doc)
    colours = iter(f"C{i}" for i in range(len(names)))
    out = {}
    for name in names:
        spec = parse_run(name)
        out[name] = dict(color="black" if name == base else next(colours), lw=2.2 if name == base else 1.4,
                         ls=LINESTYLES[spec.optimizer], marker=MARKERS[spec.test], ms=4, mfc="none")
    return out


def figure6(doc: dict):
    """Figure 6: validation NDCG@10 against training time and against examples processed, one line
    per configuration (per seed), the target dashed."""
    import matplotlib.pyplot as plt

    results.set_style()
    styles, tgt = _styles(doc), target(doc)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    labelled = set()
    for r in doc["results"]["runs"]:
        if not r["history"]:
            continue
        pts = curve(r["history"])
        style = dict(styles[r["run"]], label=None if r["run"] in labelled else r["label"])
        labelled.add(r["run"])
        axes[0].plot(pts["seconds"] / 60, pts["ndcg"], **style)
        axes[1].plot(pts["examples"] / 1e6, pts["ndcg"], **{**style, "label": None})
    for ax in axes:
        if tgt:
            ax.axhline(tgt["value"], color="grey", ls="--", lw=1)
        ax.set_ylabel("validation NDCG@10")
    axes[0].set_xlabel("training time (minutes, validation excluded)")
    axes[1].set_xlabel("examples processed (millions of (prefix, target) pairs)")
    if tgt:
        axes[1].annotate(f"target {tgt['value']:.4f}", (0.01, tgt["value"]), xycoords=("axes fraction", "data"),
                         va="bottom", fontsize=8, color="grey")
    fig.legend(loc="lower center", ncol=min(4, len(labelled)), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def figure7(doc: dict):
    """Figure 7: batch size (the scheduled budget, pairs) and step size against examples processed.
    Adam's step is its learning rate; AdaGrad-Norm's h_k; USGM's 1/H_k (D/||g|| while H = 0)."""
    import matplotlib.pyplot as plt

    results.set_style()
    styles = _styles(doc)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    labelled = set()
    for r in doc["results"]["runs"]:
        steps = pd.DataFrame(r["steps"])
        if steps.empty:
            continue
        # markers spaced along the line (there is one point per kept step)
        style = dict(styles[r["run"]], markevery=0.1, label=None if r["run"] in labelled else r["label"])
        labelled.add(r["run"])
        x = steps["examples"] / 1e6
        axes[0].step(x, steps["budget"], where="post", **style)
        size = pd.to_numeric(steps["step_size"], errors="coerce")
        ok = np.isfinite(size) & (size > 0)
        axes[1].plot(x[ok], size[ok], **{**style, "label": None})
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    _plain_log_ticks(axes[0])
    axes[0].set_ylabel("batch size (pairs)")
    axes[1].set_ylabel("step size")
    for ax in axes:
        ax.set_xlabel("examples processed (millions of pairs)")
    fig.legend(loc="lower center", ncol=min(4, len(labelled)), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def _plain_log_ticks(ax) -> None:
    """Label a log axis of counts as plain numbers (1,024 rather than 1.024 x 10^3); within one
    decade, where no power of ten shows, the minor ticks get labels too."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}")
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())


# --------------------------------------------------------------------------- results contract
def check_results(doc: dict) -> None:
    """What every results JSON of this study satisfies (run on each smoke run)."""
    p, res = doc["params"], doc["results"]
    ds, runs = res["dataset"], res["runs"]
    cfg = AdaptiveParams(**p)
    assert [(r["run"], r["seed"]) for r in runs] == [(s.name, seed) for s in cfg.specs() for seed in cfg.seeds]
    assert ds["budget"] == max(1, round(p["passes"] * ds["train_pairs"]))
    assert ds["largest_window"] <= min(p["batch_size"], p["initial_batch"]) and ds["max_batch"] <= ds["train_pairs"]
    if p["max_users"]:
        assert ds["users"] == p["max_users"]
    for r in runs:
        spec = parse_run(r["run"])
        assert r["label"] == spec.label
        h = r["history"]
        assert len(h) <= ds["periods"]
        assert r["examples"] == (r["steps"][-1]["examples"] if r["steps"] else 0)
        assert abs(r["train_seconds"] - sum(e["train_seconds"] for e in h)) < 1e-6
        if r["diverged"] is not None:  # stopped inside a period: its steps are not in the history
            assert "step" in r["diverged"] and r["test"] is None and sum(e["pairs"] for e in h) <= r["examples"]
        else:
            assert len(h) >= 1 and sum(e["pairs"] for e in h) == r["examples"]
            assert r["examples"] >= ds["budget"], "every run spends its budget"
            assert sum(e["pairs"] for e in h[:-1]) < ds["budget"], "and stops at the first validation after it"
            t = r["test"]
            assert all(0.0 <= t[f"{m}@10"] <= 1.0 for m in ("hr", "ndcg", "mrr"))
            assert t["mrr@10"] <= t["ndcg@10"] <= t["hr@10"]
        steps = r["steps"]
        assert len(steps) <= r["n_steps"] and len(steps) >= min(r["n_steps"], 2)
        assert [s["index"] for s in steps] == sorted({s["index"] for s in steps})
        assert all(b["examples"] > a["examples"] and b["seconds"] >= a["seconds"] for a, b in zip(steps, steps[1:]))
        assert all(ds["largest_window"] <= s["budget"] <= ds["train_pairs"] and 0 < s["batch_size"] <= s["budget"]
                   for s in steps)
        if spec.optimizer == "adam":
            assert all(s["step_size"] == p["lr"] for s in steps)
        else:
            assert all(s["step_size"] is not None and s["step_size"] >= 0 for s in steps)
        if spec.adaptive_batch:
            budgets = [s["budget"] for s in steps]
            assert budgets == sorted(budgets), "the batch only grows"
            assert not budgets or (budgets[0] == p["initial_batch"] and budgets[-1] <= ds["max_batch"])
            bt = r["batch_tests"]
            assert r["gradient_groups"] == p["gradient_groups"]
            assert bt["tested"] <= r["n_steps"] and bt["passed"] + bt["skipped"] <= bt["tested"]
            assert all(x["batch_size"] <= x["budget"] <= ds["max_batch"] for x in bt["records"])
            assert all((x["skipped"] is None) == (x["passed"] is not None) for x in bt["records"])
        else:
            assert r["batch_tests"] is None and {s["budget"] for s in steps} <= {p["batch_size"]}
    tgt = target(doc)
    base = [r for r in runs if r["run"] == parse_run(p["baseline"]).name and r["history"]]
    if base:
        best = np.mean([max(e["valid"][METRIC] for e in r["history"]) for r in base])
        assert tgt is not None and abs(tgt["value"] - TARGET_FRACTION * best) < 1e-12
        assert all(time_to_target(r["history"], tgt["value"]) is not None for r in base), "the baseline reaches it"
        for r in runs:
            reach = time_to_target(r["history"], tgt["value"])
            if reach is not None:
                assert reach["seconds"] <= r["train_seconds"] + 1e-9 and reach["examples"] <= r["examples"]
    table = table5_numeric(doc)
    assert list(table.index) == [s.name for s in cfg.specs()]
    assert (table["reached"] <= table["seeds"]).all()


STUDY = Study(
    name="adaptive", notebook="05_adaptive",
    title="Adaptive batch size and step size: Adam, batch-size tests, AdaGrad-Norm (AdaBatchGrad), USGM",
    params=AdaptiveParams, compute=compute,
    produces=("fig6_adaptive_curves", "fig7_adaptive_schedules", "table5_adaptive"),
    check=check_results,
)
