"""Study 02: recommendation quality of Mamba4Rec vs SASRec, BERT4Rec and GRU4Rec (Table 2,
Figure 2).

Every (dataset, model, seed) is trained with :class:`paperlib.train.Trainer` (full-softmax CE, Adam,
every RecBole training pair once per epoch, early stopping on validation NDCG@10) and scored on the
test split by full ranking. Checkpoints go to ``<checkpoints>/quality/<preset>/…`` (see
``paths.checkpoints_dir``) under a key of the exact settings and training code, so an interrupted compute
run resumes where it stopped; finished runs recorded in the results JSON under the same key are
reused, not retrained.

Spreading the work (see :mod:`paperlib.distributed`): under torchrun every run trains on all the
processes (DistributedDataParallel) and only rank 0 writes; with ``shard`` (``paperlib run
02_quality --shard 2/8``) only every 8th run is computed, starting with the second, and the
partial results go to ``results/shards/``, for ``paperlib merge`` to combine.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from paperlib import distributed, paths, results
from paperlib.config import StudyParams
from paperlib.data import DATASETS, count_pairs, load_dataset
from paperlib.fields import ConfigError, param
from paperlib.models import MODELS, build_model, config_from_dict
from paperlib.distributed import Shard
from paperlib.runtime import TRAINING_CODE, code_fingerprint, run_key
from paperlib.studies import Study

DISPLAY = {"gru4rec": "GRU4Rec", "sasrec": "SASRec", "bert4rec": "BERT4Rec", "mamba4rec": "Mamba4Rec"}
#: Mamba4Rec's reported dropout on the Amazon datasets (0.2 on MovieLens), REFERENCES.md
AMAZON_MAMBA_DROPOUT = 0.4

#: Published figures to compare with: not our results. Each names its source and its protocol:
#: "recbole" (full ranking, seen items stay ranked: the protocol here) or "seen removed" (full
#: ranking without the user's seen items, compared with our ``test_seen_removed``).
PUBLISHED: list[dict[str, Any]] = [
    {"dataset": "ml-1m", "model": "Mamba4Rec", "hr@10": 0.3121, "ndcg@10": 0.1822, "mrr@10": 0.1425,
     "source": "Mamba4Rec paper (Liu et al. 2024, arXiv:2403.03900), as quoted in "
               "github.com/chengkai-liu/Mamba4Rec/issues/1", "protocol": "recbole"},
    {"dataset": "ml-1m", "model": "Mamba4Rec", "hr@10": 0.3169, "ndcg@10": None, "mrr@10": None,
     "source": "a rerun of the official code, github.com/AlwaysFHao/TiM4Rec/issues/1", "protocol": "recbole"},
    {"dataset": "ml-1m", "model": "Mamba4Rec (n_layers=2)", "hr@10": 0.3253, "ndcg@10": None, "mrr@10": None,
     "source": "TiM4Rec's rerun of the official code with 2 layers, github.com/AlwaysFHao/TiM4Rec/issues/1",
     "protocol": "recbole"},
    {"dataset": "amazon-beauty", "model": "Mamba4Rec", "hr@10": 0.0734, "ndcg@10": 0.0431, "mrr@10": 0.034,
     "source": "a rerun of the official code (1 layer, dropout 0.4), "
               "github.com/chengkai-liu/Mamba4Rec/issues/8", "protocol": "recbole"},
    {"dataset": "ml-1m", "model": "SASRec", "hr@10": 0.3152, "ndcg@10": 0.1821, "mrr@10": None,
     "source": "Klenitskiy & Vasilev 2023 (SASRec+ with full-softmax CE), "
               "github.com/antklen/sasrec-bert4rec-recsys23; seen items removed from the ranking",
     "protocol": "seen removed"},
    {"dataset": "ml-1m", "model": "BERT4Rec", "hr@10": 0.2843, "ndcg@10": 0.1537, "mrr@10": None,
     "source": "Klenitskiy & Vasilev 2023, github.com/antklen/sasrec-bert4rec-recsys23; seen items "
               "removed from the ranking", "protocol": "seen removed"},
]
#: what could not be found, said in the notebook
NOT_FOUND = ("The Mamba4Rec paper's own table for Amazon Beauty and Video Games and for its baselines "
             "(GRU4Rec, SASRec, BERT4Rec) could not be read: only its abstract and its ML-1M Mamba4Rec row, "
             "quoted in the official repository's issues, are available here.")


@dataclass
class QualityParams(StudyParams):
    """Parameters of ``02_quality`` (defaults: the ``quick`` preset)."""

    datasets: list[str] = param(["ml-1m", "amazon-beauty", "amazon-video-games"], "datasets to train and test on",
                                choices=tuple(DATASETS))
    models: list[str] = param(["gru4rec", "sasrec", "bert4rec", "mamba4rec"],
                              "model specs: a name, or a name with config options, e.g. mamba4rec{n_layers: 2}")
    extra_ml1m: list[str] = param(["mamba4rec{n_layers: 2}"], "model specs run on ML-1M only (2 Mamba layers "
                                  "reproduce better, say users of the official code)")
    seeds: list[int] = param([2020], "one run per seed; tables show mean ± std over seeds", min=0)
    epochs: int = param(10, "maximum epochs of a run", min=1)
    epochs_ml1m: int = param(6, "maximum epochs on ML-1M, whose epochs cost about 15 Amazon ones; 0 for epochs",
                             min=0)
    patience: int = param(3, "stop after more than this many epochs without a better validation NDCG@10", min=0)
    batch_size: int = param(2048, "(prefix, target) pairs per optimizer step, as RecBole's train_batch_size", min=1)
    window_stride: int = param(0, "training targets counted per window: 0 for max_len (non-overlapping windows), "
                               "1 for RecBole's exact prefixes (far slower)", min=0)
    eval_batch_size: int = param(1024, "users per evaluation batch", min=1)
    lr: float = param(0.001, "Adam's learning rate", min=0.0)
    max_steps_per_epoch: int = param(0, "cap on optimizer steps per epoch, 0 for none (smoke runs)", min=0)
    max_users: int = param(0, "train and evaluate on a random subset of this many users, 0 for all (smoke runs)", min=0)
    device: str = param("auto", "auto (CUDA when present), cpu or cuda")
    resume: bool = param(True, "continue interrupted runs from their checkpoints; reuse finished ones")

    def validate(self) -> None:
        if not self.datasets or not self.seeds:
            raise ConfigError("datasets and seeds must each name at least one entry")
        for spec in self.models + self.extra_ml1m:
            parse_model_spec(spec)


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"mamba4rec{n_layers: 2, dropout: 0.4}"`` → ``("mamba4rec", {"n_layers": 2, "dropout": 0.4})``:
    a registered model name, then optionally its config options as a YAML mapping in braces (no
    ``=``, which papermill's parameter parser cannot take in a default)."""
    import yaml

    name, brace, rest = spec.partition("{")
    name = name.strip()
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r} in {spec!r}: choose from {sorted(MODELS)}")
    if not brace:
        return name, {}
    try:
        overrides = yaml.safe_load("{" + rest)
    except yaml.YAMLError as err:
        raise ConfigError(f"model options in {spec!r} must be a mapping such as {{n_layers: 2}}: {err}") from err
    if not isinstance(overrides, dict):
        raise ConfigError(f"model options in {spec!r} must be a mapping such as {{n_layers: 2}}")
    config_from_dict(name, {"n_items": 1, **overrides})  # unknown options, types, ranges: now, not mid-study
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


def compute(cfg: QualityParams, progress: bool = True, shard: Shard | None = None) -> dict:
    """Train and evaluate every (dataset, model, seed); write the results JSON and return it.

    With ``shard``, only that shard's runs (every ``shard.count``-th, in the study's order) are
    computed and written as partial results (every dataset is still loaded, so each partial
    describes all of them). In a process group every rank calls this; rank 0 writes, the other
    ranks return the same results without writing them.
    """
    from paperlib.train import TrainConfig, fit

    started, t0 = results.now_iso(), time.perf_counter()
    progress = progress and distributed.is_main()
    if progress:
        _log_epochs_to_stdout()
    # rank 0's files decide which runs are already done, for every rank (they must train together)
    finished = distributed.broadcast_object(_finished_runs(cfg, shard) if cfg.resume else {})
    total = len(_runs(cfg)) * len(cfg.seeds)
    chosen = set(shard.select(total)) if shard is not None else set(range(total))
    run_indices: list[int] = []  # the study-order index of each entry of runs
    runs: list[dict[str, Any]] = []
    data_cache: dict[str, Any] = {}
    for spec_index, (dataset, spec) in enumerate(_runs(cfg)):
        if dataset not in data_cache:
            data = load_dataset(dataset)
            data_cache[dataset] = data.subset(cfg.max_users, seed=0) if cfg.max_users else data
        data = data_cache[dataset]
        name, overrides = parse_model_spec(spec)
        if name == "mamba4rec" and dataset.startswith("amazon") and "dropout" not in overrides:
            overrides["dropout"] = AMAZON_MAMBA_DROPOUT
        for run_index, seed in enumerate(cfg.seeds, start=spec_index * len(cfg.seeds)):
            if run_index not in chosen:
                continue  # another shard's run
            run_indices.append(run_index)
            model = build_model(name, n_items=data.n_items, max_len=data.max_len, seed=seed, **overrides)
            tc = TrainConfig(
                epochs=cfg.epochs_ml1m if dataset == "ml-1m" and cfg.epochs_ml1m else cfg.epochs, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, lr=cfg.lr,
                patience=cfg.patience, seed=seed, device=cfg.device,
                max_steps_per_epoch=cfg.max_steps_per_epoch or None, window_stride=cfg.window_stride or None,
            )
            # one key per exact setting and training code: a resumed run never continues a different
            # configuration, nor checkpoints written by other model or trainer code
            key = run_key(asdict(model.config), tc.to_dict(), cfg.max_users, data.n_users, code=QUALITY_CODE)
            if progress:
                print(f"[{dataset} · {run_label(spec)} · seed {seed}]", flush=True)
            if key in finished:
                if progress:
                    print("  finished earlier with the same settings and code: reused, not retrained")
                runs.append(finished[key])
                continue
            ckpt = (paths.checkpoints_dir() / STUDY.name / cfg.preset / dataset
                    / f"{name}-{key}" / str(seed))
            res = fit(model, data, tc, checkpoint_dir=ckpt, resume=cfg.resume, progress=progress)
            runs.append({
                "dataset": dataset, "model": spec, "label": run_label(spec), "seed": seed, "key": key,
                "n_params": sum(p.numel() for p in model.parameters()),
                **res.to_dict(),
            })
    payload = {
        "runs": runs,
        "protocol": {
            "ranking": "full (all items, padding excluded, seen items not masked)",
            "split": "leave-one-out (last = test, second-to-last = validation)",
            "k_core": 5, "ties": "counted against the target",
            "objective": "full-softmax cross-entropy over every RecBole (prefix, target) pair once per epoch "
                         "(causal models: all positions of windows; BERT4Rec: masked items)",
            "batch": f"{cfg.batch_size} (prefix, target) pairs per step",
            "early_stopping": f"validation ndcg@10, patience {cfg.patience}",
        },
        "datasets": {d: {"users": v.n_users, "items": v.n_items, "max_len": v.max_len, "train_pairs": count_pairs(v)}
                     for d, v in data_cache.items()},
    }
    if not distributed.is_main():  # rank 0 writes; the others return what it writes
        return {"study": STUDY.name, "preset": cfg.preset, "params": cfg.to_dict(), "results": payload}
    if shard is not None:
        path = results.save_partial_results(
            STUDY.name, cfg.preset, cfg.to_dict(), payload, output_dir=cfg.output_dir,
            shard={"index": shard.index, "count": shard.count, "runs": run_indices, "total": total},
            code=code_fingerprint(QUALITY_CODE), wall_seconds=time.perf_counter() - t0, started=started)
        return results.load_partial_results(path)
    results.save_results(STUDY.name, cfg.preset, cfg.to_dict(), payload, output_dir=cfg.output_dir,
                         wall_seconds=time.perf_counter() - t0, started=started)
    return STUDY.load(cfg)


#: the code that shapes a quality run (the adaptive optimizers are not used here); partial
#: results of other code are not merged
QUALITY_CODE = tuple(p for p in TRAINING_CODE if not p.startswith("adaptive/")) + ("distributed.py",)


def _finished_runs(cfg: QualityParams, shard: Shard | None = None) -> dict[str, dict]:
    """Runs of the existing results JSON of this preset (of this shard's partial results with
    ``shard``), by key (runs written before keys were recorded have none and are retrained)."""
    try:
        if shard is not None:
            doc = results.load_partial_results(
                results.partial_results_path(STUDY.name, cfg.preset, shard.label, cfg.output_dir))
        else:
            doc = results.load_results(STUDY.name, cfg.preset, cfg.output_dir)
    except results.ResultsError:
        return {}
    return {r["key"]: r for r in doc["results"]["runs"] if r.get("key")}


def _log_epochs_to_stdout() -> None:
    """Show the trainer's one line per epoch in the notebook (once per process)."""
    log = logging.getLogger("paperlib.train")
    if not any(getattr(h, "_paperlib", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._paperlib = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def runs_frame(doc: dict) -> pd.DataFrame:
    """One row per run: dataset, model label, seed, best epoch, epochs run, seconds, test metrics."""
    rows = []
    for r in doc["results"]["runs"]:
        # seconds summed over epochs, so a resumed run counts its whole training
        seen_removed = (r.get("test_seen_removed") or {}).get("ndcg@10", float("nan"))
        rows.append({"dataset": r["dataset"], "model": r["label"], "seed": r["seed"], "best_epoch": r["best_epoch"],
                     "epochs": len(r["history"]), "seconds": round(sum(h["seconds"] for h in r["history"]), 1),
                     **r["test"], "ndcg@10 seen removed": seen_removed})
    return pd.DataFrame(rows)


def _model_order(label: str) -> tuple[int, str]:
    """GRU4Rec, SASRec, BERT4Rec, Mamba4Rec, then variants: the paper's order."""
    base = label.split(" (")[0]
    names = list(DISPLAY.values())
    return (names.index(base) if base in names else len(names), label)


def _sorted_index(df: pd.DataFrame, datasets: list[str]) -> list[tuple[str, str]]:
    return sorted(df.index, key=lambda ix: (datasets.index(ix[0]), _model_order(ix[1])))


def table2(doc: dict, ks: tuple[int, ...] = (10,)) -> pd.DataFrame:
    """Table 2: test HR/NDCG/MRR@K, mean ± std over seeds (std shown only with several seeds)."""
    df = runs_frame(doc)
    cols = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg", "mrr")]
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
    return table.reindex(_sorted_index(table, datasets))


def table2_numeric(doc: dict) -> pd.DataFrame:
    """All K (5, 10, 20), mean and std over seeds as numbers (the csv of Table 2)."""
    df = runs_frame(doc)
    metric_cols = [c for c in df.columns if "@" in c]
    agg = df.groupby(["dataset", "model"], sort=False)[metric_cols].agg(["mean", "std"])
    agg.columns = [f"{m}_{s}" for m, s in agg.columns]
    return agg.reindex(_sorted_index(agg, list(dict.fromkeys(df["dataset"]))))


def _means(doc: dict | None, protocol: str = "recbole") -> pd.DataFrame:
    """Mean test metrics @10 (and epochs run) per (dataset, model) under ``protocol``."""
    cols = ["hr@10", "ndcg@10", "mrr@10"]
    if doc is None:
        return pd.DataFrame(columns=cols + ["epochs"])
    rows = []
    for r in doc["results"]["runs"]:
        test = r["test"] if protocol == "recbole" else r.get("test_seen_removed") or {}
        rows.append({"dataset": r["dataset"], "model": r["label"], "epochs": len(r["history"]),
                     **{c: test.get(c, float("nan")) for c in cols}})
    return pd.DataFrame(rows).groupby(["dataset", "model"], sort=False)[cols + ["epochs"]].mean()


def compare_published(doc: dict, full: dict | None = None) -> pd.DataFrame:
    """Our test metrics beside every published figure for the same dataset and model: this run
    (``doc``), the full-length run (``full``, the ``paper`` preset) where there is one, and the gap
    ``ours / published - 1`` of the longest run we have."""
    rows = []
    for ref in PUBLISHED:
        quick, long = _means(doc, ref["protocol"]), _means(full, ref["protocol"])
        for m in ("hr@10", "ndcg@10", "mrr@10"):
            if ref[m] is None:
                continue
            key = (ref["dataset"], ref["model"])
            q = quick[m].get(key) if key in quick.index and np.isfinite(quick[m].get(key)) else None
            f = long[m].get(key) if key in long.index and np.isfinite(long[m].get(key)) else None
            best = f if f is not None else q
            rows.append({"dataset": ref["dataset"], "model": ref["model"], "metric": m.upper(),
                         "published": ref[m], f"ours ({doc['preset']})": None if q is None else round(q, 4),
                         "ours (full run)": None if f is None else round(f, 4),
                         "gap (%)": None if best is None else round(100 * (best / ref[m] - 1), 1),
                         "protocol": ref["protocol"],
                         "source": ref["source"]})
    return pd.DataFrame(rows).set_index(["dataset", "model", "metric"])


def training_text(doc: dict) -> str:
    """How much each run trained on, from the results: pairs per epoch and optimizer steps per
    epoch, beside RecBole's count for the same batch size."""
    p = doc["params"]
    lines = []
    for dataset, info in doc["results"]["datasets"].items():
        steps = [h["steps"] for r in doc["results"]["runs"] if r["dataset"] == dataset for h in r["history"]]
        pairs = info["train_pairs"]
        recbole = -(-pairs // p["batch_size"])
        capped = f", capped at {p['max_steps_per_epoch']} steps" if p["max_steps_per_epoch"] else ""
        lines.append(f"- **{dataset}**: {info['users']:,} users, {pairs:,} training (prefix, target) pairs; batches of "
                     f"{p['batch_size']:,} pairs give {min(steps)}–{max(steps)} optimizer steps an epoch{capped} "
                     f"(RecBole: {recbole:,}).")
    return "\n".join(lines)


def summary(doc: dict, full: dict | None = None) -> str:
    """The text under Table 2, generated from the results: the ranking of the models on each
    dataset and every gap to a published figure on the same protocol."""
    lines = []
    for label, d in ((doc["preset"], doc), ("full-length", full)):
        if d is None:
            continue
        means = _means(d)
        for dataset in dict.fromkeys(means.index.get_level_values(0)):
            ranked = means.loc[dataset].sort_values("ndcg@10", ascending=False)
            order = " > ".join(f"{m} {v:.4f}" for m, v in ranked["ndcg@10"].items())
            epochs = ", ".join(f"{int(e)}" for e in ranked["epochs"])
            lines.append(f"- **{dataset}, {label} run** (test NDCG@10): {order} (epochs run: {epochs}).")
    cmp = compare_published(doc, full)
    for (dataset, model, metric), row in cmp.iterrows():
        if row["gap (%)"] is None or not np.isfinite(row["gap (%)"]):
            continue
        long = row["ours (full run)"]
        which = "full-length" if long is not None and np.isfinite(long) else doc["preset"]
        ours = long if which == "full-length" else row[f"ours ({doc['preset']})"]
        lines.append(f"- {dataset} {model} {metric} ({row['protocol']} protocol): ours ({which}) {ours:.4f} vs "
                     f"published {row['published']:.4f} ({row['gap (%)']:+.1f} %).")
    return "\n".join(lines)


def load_full(cfg: StudyParams) -> dict | None:
    """The full-length run (the ``paper`` preset's results) beside the rendered preset's, where
    it exists; None otherwise (and when the rendered preset is ``paper`` itself)."""
    if cfg.preset == "paper":
        return None
    try:
        return results.load_results(STUDY.name, "paper", cfg.output_dir)
    except results.ResultsError:
        return None


def figure2(doc: dict, full: dict | None = None):
    """Figure 2: validation NDCG@10 per epoch (top) and against training + validation time
    (bottom), one column per dataset; quick runs solid, the full-length run dashed."""
    import matplotlib.pyplot as plt

    results.set_style()
    runs = doc["results"]["runs"]
    full_runs = full["results"]["runs"] if full else []
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.2 * len(datasets), 7.2), squeeze=False)
    labels = sorted({r["label"] for r in runs + full_runs}, key=_model_order)
    for col, dataset in enumerate(datasets):
        for i, label in enumerate(labels):
            for these, style in ((runs, "-"), (full_runs, "--")):
                curves = [r["history"] for r in these if r["dataset"] == dataset and r["label"] == label]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                ndcg = np.mean([[h["valid"]["ndcg@10"] for h in c[:n]] for c in curves], axis=0)
                secs = np.mean([np.cumsum([h["seconds"] for h in c[:n]]) for c in curves], axis=0)
                name = label if style == "-" else None
                axes[0][col].plot(np.arange(1, n + 1), ndcg, style, color=f"C{i}", label=name)
                axes[1][col].plot(secs / 60, ndcg, style, color=f"C{i}", label=name)
        axes[0][col].set_title(dataset)
        axes[0][col].set_xlabel("epoch")
        axes[1][col].set_xlabel("training + validation time (minutes)")
        for row in (0, 1):
            axes[row][col].set_ylabel("validation NDCG@10")
    handles: dict[str, Any] = {}  # every model of every panel (the extra ML-1M ones too), once
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    axes[0][-1].legend(list(handles.values()), list(handles), fontsize=8,
                       title="solid: quick" + (", dashed: full run" if full_runs else ""), title_fontsize=8)
    fig.tight_layout()
    return fig


def check_results(doc: dict) -> None:
    """What every results JSON of this study satisfies (run on each smoke run)."""
    p = doc["params"]
    runs = doc["results"]["runs"]
    expected = {(d, m, s) for d, m in _runs(QualityParams(**{k: v for k, v in p.items()})) for s in p["seeds"]}
    assert {(r["dataset"], r["model"], r["seed"]) for r in runs} == expected
    for r in runs:
        assert 1 <= len(r["history"]) <= (p["epochs_ml1m"] if r["dataset"] == "ml-1m" and p["epochs_ml1m"] else p["epochs"])
        for h in r["history"]:
            assert h["steps"] >= 1 and h["pairs"] >= h["steps"]
            if p["max_steps_per_epoch"]:
                assert h["steps"] <= p["max_steps_per_epoch"]
            else:  # every RecBole training pair once per epoch
                assert h["pairs"] == doc["results"]["datasets"][r["dataset"]]["train_pairs"]
        t = r["test"]
        assert all(0.0 <= t[f"{m}@10"] <= 1.0 for m in ("hr", "ndcg", "mrr"))
        assert t["mrr@10"] <= t["ndcg@10"] <= t["hr@10"]
    if p["max_users"]:
        assert all(v["users"] == p["max_users"] for v in doc["results"]["datasets"].values())


STUDY = Study(
    name="quality", notebook="02_quality",
    title="Quality: Mamba4Rec vs SASRec, BERT4Rec, GRU4Rec (HR/NDCG/MRR@10)",
    params=QualityParams, compute=compute,
    produces=("table2_quality", "table2_quality_all_k", "table2_published", "fig2_validation_ndcg"),
    check=check_results,
)
