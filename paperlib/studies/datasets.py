"""Study 01: the datasets (Table 1, Figure 1).

Statistics of each dataset before and after the iterative k-core filter (users, items,
interactions, average/median history length, sparsity), and the distribution of history lengths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from paperlib import results
from paperlib.config import StudyParams
from paperlib.data import DATASETS, kcore, load_interactions
from paperlib.fields import ConfigError, param
from paperlib.studies import Study

#: log-spaced bin edges for history lengths (1 … 10⁴ items), shared by every dataset
LENGTH_BINS: list[float] = np.unique(np.round(np.logspace(0, 4, 41))).tolist()


@dataclass
class DatasetsParams(StudyParams):
    """Parameters of ``01_datasets``."""

    datasets: list[str] = param(["ml-1m", "amazon-beauty", "amazon-video-games", "ml-100k"],
                                "datasets to describe", choices=tuple(DATASETS))
    k_core: int = param(5, "minimum interactions per user and per item (5 as Mamba4Rec/RecBole)", min=1)

    def validate(self) -> None:
        if not self.datasets:
            raise ConfigError("datasets is empty: name at least one dataset")


def describe(df: pd.DataFrame) -> dict:
    """Statistics of an interaction table with columns ``user``, ``item``."""
    lengths = df.groupby("user", sort=False).size().to_numpy()
    n_users, n_items, n = len(lengths), int(df["item"].nunique()), len(df)
    counts, _ = np.histogram(lengths, bins=LENGTH_BINS)
    return {
        "users": n_users,
        "items": n_items,
        "interactions": n,
        "avg_length": float(lengths.mean()) if n_users else 0.0,
        "median_length": float(np.median(lengths)) if n_users else 0.0,
        "max_length": int(lengths.max()) if n_users else 0,
        "sparsity": 1.0 - n / (n_users * n_items) if n_users and n_items else 1.0,
        "length_hist": counts.tolist(),
    }


def compute(cfg: DatasetsParams, progress: bool = True) -> dict:
    """Describe every dataset of ``cfg``, write the results JSON, and return it as loaded."""
    started, t0 = results.now_iso(), time.perf_counter()
    out: dict[str, dict] = {}
    for name in cfg.datasets:
        t = time.perf_counter()
        raw = load_interactions(name)
        filtered = kcore(raw, cfg.k_core)
        out[name] = {"raw": describe(raw), "kcore": describe(filtered), "max_len": DATASETS[name].max_len}
        if progress:
            s = out[name]["kcore"]
            print(f"{name}: {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions "
                  f"after {cfg.k_core}-core ({time.perf_counter() - t:.1f} s)")
    payload = {"length_bins": LENGTH_BINS, "datasets": out, "protocol": {"k_core": cfg.k_core, "iterative": True}}
    results.save_results(STUDY.name, cfg.preset, cfg.to_dict(), payload, output_dir=cfg.output_dir,
                         wall_seconds=time.perf_counter() - t0, started=started)
    return STUDY.load(cfg)


def table1(doc: dict) -> pd.DataFrame:
    """Table 1: one row per (dataset, stage), stage ``raw`` or ``k-core``."""
    k = doc["results"]["protocol"]["k_core"]
    rows = []
    for name, entry in doc["results"]["datasets"].items():
        for stage, key in (("raw", "raw"), (f"{k}-core", "kcore")):
            s = entry[key]
            rows.append({
                "dataset": name, "stage": stage, "users": s["users"], "items": s["items"],
                "interactions": s["interactions"], "avg. length": round(s["avg_length"], 1),
                "median length": s["median_length"], "sparsity (%)": round(100 * s["sparsity"], 2),
            })
    return pd.DataFrame(rows).set_index(["dataset", "stage"])


def figure1(doc: dict):
    """Figure 1: history-length distribution per dataset (k-core solid, raw dashed), log-log."""
    import matplotlib.pyplot as plt

    results.set_style()
    bins = np.asarray(doc["results"]["length_bins"])
    k = doc["results"]["protocol"]["k_core"]
    fig, ax = plt.subplots()
    for i, (name, entry) in enumerate(doc["results"]["datasets"].items()):
        color = f"C{i}"
        for key, style, label in (("kcore", "-", f"{name} ({k}-core)"), ("raw", ":", None)):
            counts = np.asarray(entry[key]["length_hist"], dtype=float)
            ax.stairs(np.where(counts > 0, counts, np.nan), bins, color=color, linestyle=style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("history length (interactions per user)")
    ax.set_ylabel("users")
    ax.set_title(f"History lengths (solid: {k}-core, dotted: raw)")
    ax.legend(fontsize=8)
    return fig


def check_results(doc: dict) -> None:
    """What every results JSON of this study satisfies (run on each smoke run)."""
    for name in doc["params"]["datasets"]:
        entry = doc["results"]["datasets"][name]
        for stage in ("raw", "kcore"):
            s = entry[stage]
            assert s["users"] > 0 and s["items"] > 0 and s["interactions"] >= s["users"]
            assert sum(s["length_hist"]) == s["users"]
        assert entry["kcore"]["interactions"] <= entry["raw"]["interactions"]


STUDY = Study(
    name="datasets", notebook="01_datasets", title="Datasets: statistics before and after the 5-core filter",
    params=DatasetsParams, compute=compute, produces=("table1_datasets", "fig1_history_lengths"),
    check=check_results,
)
