"""Study 02: recommendation quality of Mamba4Rec vs SASRec, BERT4Rec and GRU4Rec (Table 2,
Figure 2).

Every (dataset, model, seed) is trained with :func:`paperlib.train.fit` (full-softmax CE, Adam,
early stopping on validation NDCG@10) and scored on the test split by full ranking. Checkpoints go
to ``build/checkpoints/quality/<preset>/…`` so an interrupted compute run resumes where it stopped.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from paperlib import paths, results
from paperlib.runtime import run_key
from paperlib.config import ConfigError, NotebookParams
from paperlib.data import DATASETS, load_dataset
from paperlib.models import MODELS, build_model

STUDY = "quality"
NOTEBOOK = "02_quality"
DISPLAY = {"gru4rec": "GRU4Rec", "sasrec": "SASRec", "bert4rec": "BERT4Rec", "mamba4rec": "Mamba4Rec"}
#: Mamba4Rec's reported dropout on the Amazon datasets (0.2 on MovieLens), REFERENCES.md
AMAZON_MAMBA_DROPOUT = 0.4
#: published figures to compare with (Mamba4Rec paper, ML-1M, RecBole protocol); not our results
REFERENCE_ML1M = {"source": "Mamba4Rec paper (Liu et al. 2024), ML-1M", "hr@10": 0.3121, "ndcg@10": 0.1822, "mrr@10": 0.1425}


@dataclass
class QualityParams(NotebookParams):
    """Parameters of ``02_quality``.

    Attributes:
        datasets: registry names.
        models: model specs ``name`` or ``name:key=value,key=value`` (e.g. ``mamba4rec:n_layers=2``).
        extra_ml1m: model specs run on ML-1M only (users of the official code report that 2 Mamba
            layers reproduce better).
        seeds: one run per seed; tables report mean ± std over seeds.
        epochs, patience, batch_size, eval_batch_size, lr: the training loop (RecBole defaults
            in the ``paper`` preset).
        max_steps_per_epoch: cap on optimizer steps per epoch, 0 = none (smoke runs).
        max_users: train and evaluate on a random subset of users, 0 = all (smoke runs).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        resume: continue from the checkpoints of an interrupted compute run.
    """

    datasets: list[str] = field(default_factory=lambda: ["ml-1m"])
    models: list[str] = field(default_factory=lambda: ["gru4rec", "sasrec", "bert4rec", "mamba4rec"])
    extra_ml1m: list[str] = field(default_factory=lambda: ["mamba4rec:n_layers=2"])
    seeds: list[int] = field(default_factory=lambda: [2020])
    epochs: int = 300
    patience: int = 10
    batch_size: int = 2048  # (prefix, target) pairs per step, as RecBole counts them
    eval_batch_size: int = 4096
    lr: float = 0.001
    max_steps_per_epoch: int = 0
    max_users: int = 0
    device: str = "auto"
    resume: bool = True

    def validate(self) -> None:
        bad = [d for d in self.datasets if d not in DATASETS]
        if bad or not self.datasets:
            raise ConfigError(f"datasets {bad or '[]'} invalid: choose from {sorted(DATASETS)}")
        for spec in self.models + self.extra_ml1m:
            parse_model_spec(spec)
        if not self.seeds:
            raise ConfigError("seeds is empty: give at least one seed")
        for name in ("epochs", "patience", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps_per_epoch < 0 or self.max_users < 0:
            raise ConfigError("max_steps_per_epoch and max_users must be >= 0 (0 = no limit)")


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"mamba4rec:n_layers=2,dropout=0.4"`` → ``("mamba4rec", {"n_layers": 2, "dropout": 0.4})``."""
    import yaml

    name, _, rest = spec.partition(":")
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r} in {spec!r}: choose from {sorted(MODELS)}")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"model option {item!r} in {spec!r} must be key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def run_label(spec: str) -> str:
    """Display name of a model spec: ``Mamba4Rec (n_layers=2)``."""
    name, overrides = parse_model_spec(spec)
    extra = ", ".join(f"{k}={v}" for k, v in overrides.items())
    return DISPLAY.get(name, name) + (f" ({extra})" if extra else "")


def _runs(cfg: QualityParams) -> list[tuple[str, str]]:
    out = [(d, m) for d in cfg.datasets for m in cfg.models]
    if "ml-1m" in cfg.datasets:
        out += [("ml-1m", m) for m in cfg.extra_ml1m if m not in cfg.models]
    return out


def compute(cfg: QualityParams, progress: bool = True) -> dict:
    """Train and evaluate every (dataset, model, seed); write the results JSON and return it."""
    from paperlib.train import TrainConfig, fit

    started, t0 = results.now_iso(), time.perf_counter()
    if progress:
        _log_epochs_to_stdout()
    runs: list[dict[str, Any]] = []
    data_cache: dict[str, Any] = {}
    for dataset, spec in _runs(cfg):
        if dataset not in data_cache:
            data = load_dataset(dataset)
            data_cache[dataset] = data.subset(cfg.max_users, seed=0) if cfg.max_users else data
        data = data_cache[dataset]
        name, overrides = parse_model_spec(spec)
        if name == "mamba4rec" and dataset.startswith("amazon") and "dropout" not in overrides:
            overrides["dropout"] = AMAZON_MAMBA_DROPOUT
        for seed in cfg.seeds:
            model = build_model(name, n_items=data.n_items, max_len=data.max_len, **overrides)
            tc = TrainConfig(
                epochs=cfg.epochs, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, lr=cfg.lr,
                patience=cfg.patience, seed=seed, device=cfg.device,
                max_steps_per_epoch=cfg.max_steps_per_epoch or None,
            )
            # one folder per exact setting and training code: a resumed run never continues a
            # different configuration, nor checkpoints written by other model or trainer code
            key = run_key(asdict(model.config), tc.to_dict(), cfg.max_users, data.n_users)
            ckpt = (paths.build_dir() / "checkpoints" / STUDY / cfg.preset / dataset
                    / f"{spec.replace(':', '_').replace(',', '_')}-{key}" / str(seed))
            if progress:
                print(f"[{dataset} · {run_label(spec)} · seed {seed}]")
            res = fit(model, data, tc, checkpoint_dir=ckpt, resume=cfg.resume, progress=progress)
            runs.append({
                "dataset": dataset, "model": spec, "label": run_label(spec), "seed": seed,
                "n_params": sum(p.numel() for p in model.parameters()),
                **res.to_dict(),
            })
    payload = {
        "runs": runs,
        "protocol": {
            "ranking": "full (all items, padding excluded, seen items not masked)",
            "split": "leave-one-out (last = test, second-to-last = validation)",
            "k_core": 5, "ties": "counted against the target",
            "objective": "full-softmax cross-entropy, all positions (causal), masked items (BERT4Rec)",
            "early_stopping": f"validation ndcg@10, patience {cfg.patience}",
        },
        "datasets": {d: {"users": v.n_users, "items": v.n_items, "max_len": v.max_len} for d, v in data_cache.items()},
    }
    results.save_results(STUDY, cfg.preset, asdict(cfg), payload, output_dir=cfg.output_dir,
                         wall_seconds=time.perf_counter() - t0, started=started)
    return load(cfg)


def _log_epochs_to_stdout() -> None:
    """Show the trainer's one line per epoch in the notebook (once per process)."""
    log = logging.getLogger("paperlib.train")
    if not any(getattr(h, "_paperlib", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._paperlib = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def load(cfg: QualityParams) -> dict:
    return results.load_results(STUDY, cfg.preset, cfg.output_dir)


def runs_frame(doc: dict) -> pd.DataFrame:
    """One row per run: dataset, model label, seed, best epoch, epochs run, seconds, test metrics."""
    rows = []
    for r in doc["results"]["runs"]:
        # seconds summed over epochs, so a resumed run counts its whole training
        rows.append({"dataset": r["dataset"], "model": r["label"], "seed": r["seed"], "best_epoch": r["best_epoch"],
                     "epochs": len(r["history"]), "seconds": sum(h["seconds"] for h in r["history"]), **r["test"]})
    return pd.DataFrame(rows)


def table2(doc: dict, ks: tuple[int, ...] = (10,)) -> pd.DataFrame:
    """Table 2: test HR/NDCG/MRR@K, mean ± std over seeds (std shown only with several seeds)."""
    df = runs_frame(doc)
    cols = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg", "mrr")]
    order = list(dict.fromkeys(df["model"]))
    out = {}
    for (dataset, model), g in df.groupby(["dataset", "model"], sort=False):
        cells = {}
        for c in cols:
            mean, std = g[c].mean(), g[c].std(ddof=1) if len(g) > 1 else float("nan")
            cells[c.upper()] = f"{mean:.4f} ± {std:.4f}" if np.isfinite(std) else f"{mean:.4f}"
        cells["seeds"] = len(g)
        out[(dataset, model)] = cells
    table = pd.DataFrame.from_dict(out, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["dataset", "model"])
    datasets = list(dict.fromkeys(df["dataset"]))  # the order the study ran them in
    return table.reindex(sorted(table.index, key=lambda ix: (datasets.index(ix[0]), order.index(ix[1]))))


def table2_numeric(doc: dict) -> pd.DataFrame:
    """All K (5, 10, 20), mean and std over seeds as numbers (the csv of Table 2)."""
    df = runs_frame(doc)
    metric_cols = [c for c in df.columns if "@" in c]
    agg = df.groupby(["dataset", "model"], sort=False)[metric_cols].agg(["mean", "std"])
    agg.columns = [f"{m}_{s}" for m, s in agg.columns]
    return agg


def compare_reference(doc: dict) -> pd.DataFrame:
    """Our ML-1M Mamba4Rec runs next to the published Mamba4Rec figures: mean over seeds and the
    relative gap ``ours / reference - 1``."""
    df = runs_frame(doc)
    df = df[(df["dataset"] == "ml-1m") & df["model"].str.startswith("Mamba4Rec")]
    rows = {}
    for model, g in df.groupby("model", sort=False):
        for m in ("hr@10", "ndcg@10", "mrr@10"):
            ours = g[m].mean()
            rows[(model, m.upper())] = {"ours": round(ours, 4), "reference": REFERENCE_ML1M[m],
                                        "gap (%)": round(100 * (ours / REFERENCE_ML1M[m] - 1), 1),
                                        "epochs": int(g["epochs"].max())}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index = pd.MultiIndex.from_tuples(out.index, names=["model", "metric"])
    return out


def figure2(doc: dict):
    """Figure 2: validation NDCG@10 per epoch for each model (one panel per dataset; seeds averaged)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    results.set_style()
    runs = doc["results"]["runs"]
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        labels = list(dict.fromkeys(r["label"] for r in runs if r["dataset"] == dataset))
        for i, label in enumerate(labels):
            curves = [[h["valid"]["ndcg@10"] for h in r["history"]] for r in runs
                      if r["dataset"] == dataset and r["label"] == label]
            n = min(len(c) for c in curves)
            mean = np.mean([c[:n] for c in curves], axis=0)
            ax.plot(np.arange(1, n + 1), mean, color=f"C{i}", label=label, marker="o" if n < 15 else None, ms=3)
        ax.set_title(dataset)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation NDCG@10")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig
