"""Study 03: the cost of Mamba4Rec vs SASRec, BERT4Rec and GRU4Rec (Table 3, Figures 3 and 4).

Every number comes from :mod:`paperlib.cost`, one process per measured point, all models in the
same run and interleaved (for each length, every model in turn), so that a change in the machine's
load during the run touches every model alike:

* **Table 3**, the Mamba4Rec paper's efficiency table on the device used: peak training memory and
  training epoch time on a real dataset (batches of ``train_batch_size`` (prefix, target) pairs; the
  first ``epoch_steps`` batches of an epoch timed and scaled to its number of steps, or whole epochs),
  and the time to score every item for a batch of ``eval_batch_size`` users, each the median of
  ``repeats`` runs with its quartiles; beside it the published GPU figures (with their source), both
  as ratios to SASRec;
* **Figure 3**, scaling: training-step time, inference time and peak training memory against the
  history length L, for ``scaling_batch`` sequences of L items (a training step on
  ``scaling_batch · L`` pairs), log-log, with the exponent of a power law fitted to each model's
  points; a point that runs out of memory or time is recorded and drawn, and the longer lengths of
  that model are recorded as skipped;
* **Figure 4**, streaming: the latency of updating one user's top 10 after one new item, against the
  number of items already seen: a constant-size state step for Mamba4Rec and GRU4Rec, SASRec
  recomputing the sequence and SASRec with a key/value cache, BERT4Rec recomputing.

The results JSON holds every record (every timed run), the machine (CPU, cores, memory), the load
average before and after the run and around every point, and the published figures quoted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from paperlib import cost, results
from paperlib.config import StudyParams
from paperlib.data import DATASETS
from paperlib.fields import ConfigError, param
from paperlib.studies import Study
from paperlib.studies.quality import DISPLAY, parse_model_spec, run_label

#: The Mamba4Rec paper's efficiency table: published figures, not ours (quoted beside ours).
PUBLISHED: dict[str, Any] = {
    "source": "Mamba4Rec paper (Liu et al. 2024, arXiv:2403.03900), efficiency table: ML-1M, one GPU, "
              "RecBole's batch sizes (2,048 training pairs, 4,096 users per evaluation batch)",
    "rows": {
        "SASRec": {"memory_gb": 14.98, "epoch_s": 131.24, "inference_s": 0.27},
        "BERT4Rec": {"memory_gb": 15.48, "epoch_s": 207.60, "inference_s": 0.90},
        "Mamba4Rec": {"memory_gb": 4.82, "epoch_s": 75.52, "inference_s": 0.14},
    },
}

#: the issue's targets for the CPU path, checked by :func:`targets` on the measured records
TARGETS = {"step_ratio_200": 0.8, "step_ratio_800": 0.5, "mamba_exponent": 1.1, "stream_growth": 1.5,
           "stream_ms": 5.0, "table3_runs": 5}

#: what Table 3 reports: (column of the published rows, records section/kind, value, label, unit)
QUANTITIES = [
    ("memory_gb", "epoch", "peak_bytes", "peak training memory", "GB"),
    ("epoch_s", "epoch", "epoch_seconds", "training epoch", "s"),
    ("inference_s", "inference", "seconds", "inference per batch", "s"),
]


@dataclass
class CostParams(StudyParams):
    """Parameters of ``03_cost`` (defaults: the ``quick`` preset)."""

    models: list[str] = param(["gru4rec", "sasrec", "bert4rec", "mamba4rec", "mamba4rec{n_layers: 2}"],
                              "model specs: a name, or a name with config options, e.g. mamba4rec{n_layers: 2}")
    device: str = param("cpu", "cpu, cuda, cuda:N, or auto (CUDA when present)")
    threads: int = param(0, "torch and numba threads of each measured process; 0 for every usable core", min=0)
    repeats: int = param(5, "timed runs per point after the warm-up (median and quartiles)", min=1)
    warmup: int = param(1, "untimed runs per point before the timed ones", min=0)
    dataset: str = param("ml-1m", "dataset of Table 3", choices=tuple(DATASETS))
    max_users: int = param(0, "Table 3 on a random subset of this many users, 0 for all (smoke runs)", min=0)
    train_batch_size: int = param(2048, "(prefix, target) pairs per training step in Table 3, as RecBole's "
                                  "train_batch_size", min=1)
    epoch_steps: int = param(20, "training steps timed per run in Table 3, their time scaled to a whole epoch; "
                             "0 times whole epochs", min=0)
    eval_batch_size: int = param(1024, "users per inference batch in Table 3 (the paper's is 4096)", min=1)
    lengths: list[int] = param([50, 100, 200, 400, 800, 1600, 3200], "history lengths L of Figure 3", min=1)
    scaling_batch: int = param(16, "sequences per training step and users per inference batch in Figure 3 "
                               "(a step trains on B·L pairs)", min=1)
    histories: list[int] = param([1, 50, 100, 200, 400, 800, 1600, 3200],
                                 "items already seen before the new one in Figure 4", min=1)
    stream_repeats: int = param(30, "timed updates per point in Figure 4", min=1)
    memory_limit_gb: float = param(0.0, "memory a CPU point may use before it counts as out of memory; 0 for "
                                   "three quarters of the memory free at the start", min=0.0)
    point_timeout_s: int = param(600, "a point still running after this many seconds is stopped and recorded "
                                 "as a timeout", min=1)

    def validate(self) -> None:
        if not self.models or not self.lengths or not self.histories:
            raise ConfigError("models, lengths and histories must each name at least one entry")
        for spec in self.models:
            parse_model_spec(spec)
        if "sasrec" not in [parse_model_spec(s)[0] for s in self.models]:
            raise ConfigError("models must include sasrec: Table 3 and the crossovers are ratios to SASRec")
        if self.device != "auto":
            cost.check_device_name(self.device)  # whether this machine has it is checked when the study runs


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` where a GPU is present, else ``cpu``; any other name is checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cost.check_device(device)


# --------------------------------------------------------------------------------------------
# compute


def _points(cfg: CostParams, device: str) -> list[tuple[dict[str, Any], cost.Point]]:
    """Every point of the study, in the order they run, each with its section and model spec."""
    common = dict(device=device, threads=cfg.threads, warmup=cfg.warmup, repeats=cfg.repeats)
    specs = [(spec, *parse_model_spec(spec)) for spec in cfg.models]
    out: list[tuple[dict[str, Any], cost.Point]] = []
    for spec, name, options in specs:  # Table 3
        meta = {"section": "table3", "spec": spec, "label": run_label(spec)}
        out.append((meta, cost.EpochPoint(model=name, options=options, dataset=cfg.dataset, max_users=cfg.max_users,
                                          batch_size=cfg.train_batch_size, steps=cfg.epoch_steps, **common)))
        out.append((meta, cost.InferencePoint(model=name, options=options, dataset=cfg.dataset,
                                              max_users=cfg.max_users, batch=cfg.eval_batch_size, **common)))
    for length in sorted(cfg.lengths):  # Figure 3: each length for every model in turn
        for spec, name, options in specs:
            meta = {"section": "scaling", "spec": spec, "label": run_label(spec)}
            out.append((meta, cost.TrainStepPoint(model=name, options=options, batch=cfg.scaling_batch,
                                                  length=length, **common)))
            out.append((meta, cost.InferencePoint(model=name, options=options, batch=cfg.scaling_batch,
                                                  length=length, **common)))
    stream_common = {**common, "repeats": cfg.stream_repeats, "warmup": max(cfg.warmup, 3)}
    for history in sorted(cfg.histories):  # Figure 4
        for spec, name, options in specs:
            for mode in stream_modes(name):
                meta = {"section": "streaming", "spec": spec, "label": run_label(spec)}
                out.append((meta, cost.StreamPoint(model=name, options=options, mode=mode, history=history,
                                                   **stream_common)))
    return out


def stream_modes(name: str) -> list[str]:
    """The streaming modes Figure 4 draws for a model: its constant-size state step, SASRec's
    key/value cache and recomputation, BERT4Rec's recomputation (it sees the future: no cache)."""
    return [m for m in ("step", "kv_cache", "recompute") if name in cost.STREAM_MODELS[m]
            and (m != "recompute" or name in ("sasrec", "bert4rec"))]


def compute(cfg: CostParams, progress: bool = True) -> dict:
    """Measure every point of the study, write the results JSON and return it."""
    started, t0 = results.now_iso(), time.perf_counter()
    device = resolve_device(cfg.device)
    limit = int(cfg.memory_limit_gb * cost.GB) if cfg.memory_limit_gb else cost.default_memory_limit()
    machine = cost.machine_info(device)
    planned = _points(cfg, device)
    if progress:
        print(f"{len(planned)} points on {cost.describe_device(device, cfg.threads)}; load average "
              f"{machine['load_average']}; memory limit per point "
              f"{'none' if limit is None else f'{limit / cost.GB:.1f} GB'}", flush=True)
    records = cost.run_points([p for _, p in planned], timeout_s=cfg.point_timeout_s, memory_limit=limit,
                              progress=progress)
    payload = {
        "device": device,
        "device_description": cost.describe_device(device, cfg.threads),
        "threads": cfg.threads or cost.usable_cores(),
        "machine": machine,
        "load_average": {"before": machine["load_average"], "after": cost.load_average()},
        "memory_limit_bytes": limit,
        "points": [{**meta, **rec} for (meta, _), rec in zip(planned, records)],
        "published": PUBLISHED,
        "targets": TARGETS,
    }
    results.save_results(STUDY.name, cfg.preset, cfg.to_dict(), payload, output_dir=cfg.output_dir,
                         wall_seconds=time.perf_counter() - t0, started=started)
    return STUDY.load(cfg)


# --------------------------------------------------------------------------------------------
# reading the results


def _labels(doc: dict) -> list[str]:
    """Model labels in the order the study lists its models."""
    return [run_label(s) for s in doc["params"]["models"]]


def _records(doc: dict, section: str, kind: str | None = None) -> list[dict]:
    return [r for r in doc["results"]["points"] if r["section"] == section and (kind is None or r["kind"] == kind)]


def _median(record: dict, key: str) -> float | None:
    """Median of a record's repeated values, None when the point did not run to the end."""
    if record["status"] != "ok" or not record.get(key):
        return None
    return cost.summary(record[key])["median"]


def points_frame(doc: dict) -> pd.DataFrame:
    """Every measured point: section, model, kind, size, status, median and quartiles, memory, load."""
    rows = []
    for r in doc["results"]["points"]:
        s = cost.summary(r["seconds"]) if r["status"] == "ok" else {}
        peak = _median(r, "peak_bytes")
        rows.append({
            "section": r["section"], "model": r["label"], "kind": r["kind"], "mode": r.get("mode", ""),
            "size": r.get("history") or r.get("length") or r.get("batch_size"), "batch": r.get("batch", ""),
            "status": r["status"], "median_s": s.get("median"), "q25_s": s.get("q25"), "q75_s": s.get("q75"),
            "runs": s.get("n", 0), "peak_gb": None if peak is None else round(peak / cost.GB, 4),
            "load_before": (r.get("load_before") or [None])[0], "message": r["message"].splitlines()[0][:120]
            if r["message"] else "",
        })
    return pd.DataFrame(rows)


def _cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    s = cost.summary([v / scale for v in values])
    return f"{s['median']:.{digits}g} [{s['q25']:.{digits}g}–{s['q75']:.{digits}g}]"


def table3(doc: dict) -> pd.DataFrame:
    """Table 3: for each quantity, our median [quartiles] on this device, ours / SASRec, the published
    GPU figure and published / SASRec; one column per model."""
    labels = _labels(doc)
    device = doc["results"]["device"]
    recs = {(r["label"], r["kind"]): r for r in _records(doc, "table3")}
    published = doc["results"]["published"]["rows"]
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for key, kind, field, name, unit in QUANTITIES:
        scale = cost.GB if unit == "GB" else 1.0
        medians = {lab: _median(recs[(lab, kind)], field) for lab in labels if (lab, kind) in recs}
        base = medians.get("SASRec")
        ours, ratio, pub, pub_ratio = {}, {}, {}, {}
        for lab in labels:
            rec = recs.get((lab, kind))
            if rec is None or rec["status"] != "ok":
                ours[lab] = ratio[lab] = rec["status"] if rec else "—"
            else:
                ours[lab] = _cell(rec[field], scale)
                ratio[lab] = f"{medians[lab] / base:.2f}" if base else "—"
            p, p_base = published.get(lab, {}).get(key), published["SASRec"][key]
            pub[lab] = "—" if p is None else f"{p:g}"
            pub_ratio[lab] = "—" if p is None else f"{p / p_base:.2f}"
        quantity = f"{name} ({unit})"
        rows[(quantity, f"ours ({device})")] = ours
        rows[(quantity, "ours / SASRec")] = ratio
        rows[(quantity, "published (GPU)")] = pub
        rows[(quantity, "published / SASRec")] = pub_ratio
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["quantity", "figure"])
    return table


def table3_text(doc: dict) -> str:
    """How Table 3 was measured, from the results."""
    p = doc["params"]
    ep = next((r for r in _records(doc, "table3", "epoch") if r["status"] == "ok"), None)
    inf = next((r for r in _records(doc, "table3", "inference") if r["status"] == "ok"), None)
    lines = [f"Measured on {doc['results']['device_description']}, median [quartiles] of {p['repeats']} runs "
             f"after {p['warmup']} warm-up run(s), each in a fresh process."]
    if ep:
        how = ("whole epochs" if ep["steps_timed"] == ep["steps_per_epoch"] else
               f"the first {ep['steps_timed']} of the epoch's {ep['steps_per_epoch']} steps, scaled to the epoch")
        lines.append(f"Training epoch on {p['dataset']}: batches of {p['train_batch_size']:,} (prefix, target) pairs "
                     f"({ep['pairs_per_epoch']:,} pairs an epoch), {how}; peak memory over those steps.")
    if inf:
        lines.append(f"Inference: scores of every item for {inf['users']:,} users' test histories (up to "
                     f"{inf['length']} items) per batch.")
    lines.append(f"Published: {doc['results']['published']['source']}. Its absolute figures come from another "
                 "device; compare the ratios to SASRec.")
    lines.append(f"Peak memory: {ep['memory_method'] if ep else 'n/a'}.")
    return "\n\n".join(lines)


def sizes(doc: dict) -> pd.DataFrame:
    """Parameters of each model (as built for Table 3's dataset) and the matrix-product FLOPs of its
    forward pass per history item at each length of Figure 3 (see :mod:`paperlib.cost`)."""
    rows = {}
    for label in _labels(doc):
        epoch = next((r for r in _records(doc, "table3", "epoch") if r["label"] == label and r["status"] == "ok"), None)
        row: dict[str, Any] = {"parameters": None if epoch is None else f"{epoch['params']:,}"}
        for r in sorted((r for r in _records(doc, "scaling", "train_step") if r["label"] == label),
                        key=lambda r: r["length"]):
            flops = r.get("flops_per_item") if r["status"] == "ok" else None
            row[f"kFLOPs/item at L {r['length']}"] = None if flops is None else round(flops / 1e3, 1)
        rows[label] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


def _series(doc: dict, label: str, kind: str, field: str) -> tuple[list[int], list[float | None], list[dict]]:
    """Lengths, medians (None for a point that did not run to the end) and records of one model."""
    recs = sorted((r for r in _records(doc, "scaling", kind) if r["label"] == label), key=lambda r: r["length"])
    return [r["length"] for r in recs], [_median(r, field) for r in recs], recs


def exponents(doc: dict) -> pd.DataFrame:
    """The exponent k of a power law ``c · L^k`` fitted (least squares in log-log) to each model's
    training-step time, inference time and peak training memory, over the lengths it ran at."""
    rows = {}
    for label in _labels(doc):
        row = {}
        for name, kind, field in (("train step time", "train_step", "seconds"),
                                  ("inference time", "inference", "seconds"),
                                  ("peak training memory", "train_step", "peak_bytes")):
            lengths, values, _ = _series(doc, label, kind, field)
            ok = [(x, y) for x, y in zip(lengths, values) if y is not None]
            k = cost.fit_exponent([x for x, _ in ok], [y for _, y in ok])
            row[name] = None if k is None else round(k, 2)
        lengths, values, _ = _series(doc, label, "train_step", "seconds")
        ok = [x for x, y in zip(lengths, values) if y is not None]
        row["fitted over L"] = f"{min(ok)}–{max(ok)}" if ok else "—"
        rows[label] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


def crossovers(doc: dict) -> pd.DataFrame:
    """For each Mamba4Rec variant and quantity, the length from which it is cheaper than SASRec at
    every longer measured length (a SASRec point that ran out of memory counts as dearer), and the
    log-log interpolation of where the two cross."""
    rows = []
    for label in _labels(doc):
        if not label.startswith(DISPLAY["mamba4rec"]):
            continue
        for name, kind, field in (("training step time", "train_step", "seconds"),
                                  ("inference time", "inference", "seconds"),
                                  ("peak training memory", "train_step", "peak_bytes"),
                                  ("peak inference memory", "inference", "peak_bytes")):
            l_m, v_m, _ = _series(doc, label, kind, field)
            l_s, v_s, _ = _series(doc, "SASRec", kind, field)
            common = sorted(set(l_m) & set(l_s))
            m = dict(zip(l_m, v_m))
            s = dict(zip(l_s, v_s))
            c = cost.crossover(common, [m[x] for x in common], [s[x] for x in common])
            if c["always"]:
                text = f"at every measured L (from {common[0]})"
            elif c["never"]:
                text = f"at no measured L (up to {common[-1]})" if common else "not measured"
            else:
                text = f"from L = {c['from']}"
            rows.append({"model": label, "quantity": name, "cheaper than SASRec": text,
                         "crossing (log-log estimate)": None if c["estimate"] is None else round(c["estimate"])})
    return pd.DataFrame(rows).set_index(["model", "quantity"]) if rows else pd.DataFrame()


def crossover_text(doc: dict) -> str:
    """The crossovers of :func:`crossovers` as sentences."""
    table = crossovers(doc)
    lines = []
    for (model, quantity), row in table.iterrows():
        est = row["crossing (log-log estimate)"]
        extra = f" (the curves cross near L ≈ {est:.0f})" if est is not None and est == est else ""
        lines.append(f"- {model} is cheaper than SASRec in {quantity} {row['cheaper than SASRec']}{extra}.")
    p = doc["params"]
    lines.append(f"\n(Training steps on {p['scaling_batch']} sequences of L items, i.e. {p['scaling_batch']}·L "
                 f"(prefix, target) pairs; inference for {p['scaling_batch']} users.)")
    return "\n".join(lines)


def _log_axes(ax, ticks: list[int]) -> None:
    """Log-log axes with plain numbers: the measured lengths on x, 1-2-5 steps on y."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _failed_marker(ax, x: float, color: str) -> None:
    """An out-of-memory or timed-out point: a cross at the top of the panel at its length."""
    ax.plot([x], [0.96], marker="X", markersize=10, color=color, transform=ax.get_xaxis_transform(),
            linestyle="none", clip_on=False)


def figure3(doc: dict):
    """Figure 3: training-step time, inference time and peak training memory against L (log-log),
    with each model's fitted exponent in the legend; a cross at the top marks a point that ran out
    of memory or time."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    results.set_style()
    panels = [("training step (s)", "train_step", "seconds", 1.0, "train step time"),
              ("inference per batch (s)", "inference", "seconds", 1.0, "inference time"),
              ("peak training memory (GB)", "train_step", "peak_bytes", cost.GB, "peak training memory")]
    fits = exponents(doc)
    fig, axes = plt.subplots(1, 3, figsize=(15.5, 4.6))
    any_failed = False
    for ax, (ylabel, kind, field, scale, fit_name) in zip(axes, panels):
        for i, label in enumerate(_labels(doc)):
            lengths, values, recs = _series(doc, label, kind, field)
            ok = [(x, y / scale) for x, y in zip(lengths, values) if y is not None]
            k = fits.loc[label, fit_name] if label in fits.index else None
            name = f"{label} (∝ L^{k:.2f})" if k is not None and k == k else label
            if ok:
                ax.plot([x for x, _ in ok], [y for _, y in ok], "o-", color=f"C{i}", label=name)
            for r in recs:
                if r["status"] in ("oom", "timeout"):
                    _failed_marker(ax, r["length"], f"C{i}")
                    any_failed = True
        _log_axes(ax, sorted(doc["params"]["lengths"]))
        ax.set_xlabel("history length L")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7.5)
    p = doc["params"]
    fig.suptitle(f"{doc['results']['device_description']}; {p['scaling_batch']} sequences per batch", fontsize=10)
    if any_failed:
        axes[0].legend(handles=axes[0].get_legend_handles_labels()[0] + [
            Line2D([], [], marker="X", color="grey", linestyle="none", label="out of memory or time")],
            fontsize=7.5)
    fig.tight_layout()
    return fig


def _stream_series(doc: dict, label: str, mode: str, field: str) -> tuple[list[int], list[float | None]]:
    recs = sorted((r for r in _records(doc, "streaming") if r["label"] == label and r["mode"] == mode),
                  key=lambda r: r["history"])
    values = [(_median(r, field) if field == "seconds" else (r.get(field) if r["status"] == "ok" else None))
              for r in recs]
    return [r["history"] for r in recs], values


MODE_NAMES = {"step": "state step", "kv_cache": "key/value cache", "recompute": "recompute"}


def stream_lines(doc: dict) -> list[tuple[str, str]]:
    """(label, mode) of every line of Figure 4, in the study's model order."""
    seen = {(r["label"], r["mode"]) for r in _records(doc, "streaming")}
    return [(lab, m) for lab in _labels(doc) for m in MODE_NAMES if (lab, m) in seen]


def stream_table(doc: dict) -> pd.DataFrame:
    """Median update latency (ms) per line of Figure 4 and history length."""
    rows = {}
    for label, mode in stream_lines(doc):
        hist, vals = _stream_series(doc, label, mode, "seconds")
        rows[f"{label}: {MODE_NAMES[mode]}"] = {h: (None if v is None else round(v * 1e3, 3)) for h, v in zip(hist, vals)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("update latency (ms) / history")


def figure4(doc: dict):
    """Figure 4: latency of one user's update after one new item (left) and the memory kept per
    user between items (right), against the history already seen, log-log."""
    import matplotlib.pyplot as plt

    results.set_style()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.4))
    styles = {"step": "o-", "kv_cache": "s--", "recompute": "^:"}
    colors = {lab: f"C{i}" for i, lab in enumerate(_labels(doc))}
    for label, mode in stream_lines(doc):
        name = f"{label}: {MODE_NAMES[mode]}"
        for ax, field, scale in ((ax_t, "seconds", 1e3), (ax_m, "state_bytes", 1 / 1024)):
            hist, vals = _stream_series(doc, label, mode, field)
            ok = [(h, v * scale) for h, v in zip(hist, vals) if v is not None]
            if ok:
                ax.plot([h for h, _ in ok], [v for _, v in ok], styles[mode], color=colors[label], label=name)
    for ax, ylabel in ((ax_t, "update latency (ms), one user"), (ax_m, "state kept per user (KiB)")):
        _log_axes(ax, sorted(doc["params"]["histories"]))
        ax.set_xlabel("items already seen")
        ax.set_ylabel(ylabel)
    ax_t.legend(fontsize=7.5)
    fig.suptitle(f"{doc['results']['device_description']}: new hidden state, scores of every item and the top 10",
                 fontsize=10)
    fig.tight_layout()
    return fig


def targets(doc: dict) -> pd.DataFrame:
    """The issue's targets for the CPU path, each with what was measured and whether it is met."""
    rows = []
    p = doc["params"]
    t = doc["results"]["targets"]
    device = doc["results"]["device_description"]
    mambas = [lab for lab in _labels(doc) if lab.startswith(DISPLAY["mamba4rec"])]
    sas = {r["length"]: _median(r, "seconds") for r in _records(doc, "scaling", "train_step") if r["label"] == "SASRec"}
    for label in mambas:
        mine = {r["length"]: _median(r, "seconds") for r in _records(doc, "scaling", "train_step")
                if r["label"] == label}
        for length, goal in ((200, t["step_ratio_200"]), (800, t["step_ratio_800"])):
            a, b = mine.get(length), sas.get(length)
            measured = None if a is None or b is None else a / b
            rows.append({"target": f"{label} training step ≤ {goal}× SASRec's at L = {length} "
                                   f"({p['scaling_batch']} sequences)",
                         "measured": "not measured" if measured is None else f"{measured:.2f}×",
                         "met": None if measured is None else measured <= goal})
    fits = exponents(doc)
    for label in mambas + ["SASRec"]:
        k = fits.loc[label, "train step time"] if label in fits.index else None
        goal = t["mamba_exponent"] if label != "SASRec" else None
        rows.append({"target": f"fitted exponent of {label}'s step time in L" + (f" ≤ {goal}" if goal else
                     " (reported as measured)"),
                     "measured": "not measured" if k is None or k != k else f"{k:.2f}",
                     "met": None if goal is None or k is None or k != k else bool(k <= goal)})
    for label in mambas:
        hist, vals = _stream_series(doc, label, "step", "seconds")
        lat = dict(zip(hist, vals))
        top = max(hist) if hist else None
        a, b = lat.get(top), lat.get(50)
        rows.append({"target": f"{label}'s update at history {top} within {t['stream_growth']}× of its update at 50",
                     "measured": "not measured" if a is None or b is None else f"{a / b:.2f}×",
                     "met": None if a is None or b is None else bool(a / b <= t["stream_growth"])})
        rows.append({"target": f"{label}'s update at history {top} below {t['stream_ms']:g} ms for one user",
                     "measured": "not measured" if a is None else f"{a * 1e3:.2f} ms",
                     "met": None if a is None else bool(a * 1e3 < t["stream_ms"])})
    runs = [len(r["seconds"]) for r in _records(doc, "table3") if r["status"] == "ok"]
    rows.append({"target": f"every figure in Table 3 from at least {t['table3_runs']} runs",
                 "measured": f"{min(runs)} runs" if runs else "not measured",
                 "met": bool(runs) and min(runs) >= t["table3_runs"]})
    table = pd.DataFrame(rows).set_index("target")
    table["met"] = table["met"].map({True: "yes", False: "no", None: "—"})
    table.attrs["device"] = device
    return table


def others_load(doc: dict) -> float | None:
    """An estimate of the load other work put on the machine during the run: the median over points
    of the 1-minute load average before the point minus this run's own threads (the load average
    counts the threads of the previous point), and the load before the run began."""
    threads = doc["results"]["threads"]
    before = [r["load_before"][0] - threads for r in doc["results"]["points"] if r.get("load_before")]
    start = (doc["results"]["load_average"]["before"] or [None])[0]
    values = [x for x in ([float(np.median(before))] if before else []) + ([start] if start is not None else [])]
    return max(values) if values else None


def load_text(doc: dict) -> str:
    """Where and under what load the numbers were measured; a loaded machine is said to be one."""
    res = doc["results"]
    cores = res["machine"]["usable_cores"]
    other = others_load(doc)
    before, after = res["load_average"]["before"], res["load_average"]["after"]
    text = (f"Measured on **{res['device_description']}**, {cores} usable cores, "
            f"{res['machine']['memory_total_gb']} GB of memory; load average (1, 5, 15 min) {before} before the "
            f"run and {after} after it.")
    if other is not None and other > 0.5 * cores:
        text += (f" **The machine was loaded** (other work ≈ {other:.1f} runnable threads on {cores} cores): these "
                 "timings are disturbed; ratios between models, measured interleaved, suffer less than absolute "
                 "times.")
    else:
        text += " The machine was otherwise quiet."
    return text


def check_results(doc: dict) -> None:
    """What every results JSON of this study satisfies (run on each smoke run)."""
    p = doc["params"]
    res = doc["results"]
    pts = res["points"]
    labels = _labels(doc)
    assert res["load_average"]["before"] is not None and res["load_average"]["after"] is not None
    assert all(r["status"] in cost.STATUSES for r in pts)
    # every model in every section, each (model, length) of Figure 3 once per kind
    for label in labels:
        assert {r["kind"] for r in pts if r["section"] == "table3" and r["label"] == label} == {"epoch", "inference"}
        for kind in ("train_step", "inference"):
            assert sorted(r["length"] for r in pts if r["section"] == "scaling" and r["label"] == label
                          and r["kind"] == kind) == sorted(p["lengths"])
    for label, name in zip(labels, [parse_model_spec(s)[0] for s in p["models"]]):
        for mode in stream_modes(name):
            assert sorted(r["history"] for r in pts if r["section"] == "streaming" and r["label"] == label
                          and r["mode"] == mode) == sorted(p["histories"])
    for r in pts:
        if r["status"] != "ok":
            assert r["message"], "a point that did not finish says why"
            continue
        assert len(r["seconds"]) == r["repeats"] and all(s > 0 for s in r["seconds"])
        assert r["params"] > 0 and r["load_before"] is not None and r["load_after"] is not None
        if r["kind"] in ("train_step", "epoch"):
            assert len(r["peak_bytes"]) == r["repeats"]
            assert min(r["peak_bytes"]) >= 4 * r["params"], "a training step holds at least weights and Adam state"
        if r["kind"] == "train_step":
            assert r["pairs"] == r["batch"] * r["length"] and r["flops_per_item"] > 0
        if r["kind"] == "epoch":
            assert 1 <= r["steps_timed"] <= r["steps_per_epoch"]
            assert all(e >= s for e, s in zip(r["epoch_seconds"], r["seconds"]))
        if r["kind"] == "stream":
            assert r["state_bytes"] > 0
    # a constant-size state does not grow with the history; a key/value cache does
    for label in labels:
        for mode, grows in (("step", False), ("kv_cache", True)):
            hist, sizes = _stream_series(doc, label, mode, "state_bytes")
            ok = [s for s in sizes if s is not None]
            if len(ok) >= 2:
                assert (ok[-1] > ok[0]) if grows else (ok[-1] == ok[0]), (label, mode, ok)


STUDY = Study(
    name="cost", notebook="03_cost",
    title="Cost: time, memory and scaling of Mamba4Rec vs SASRec, BERT4Rec, GRU4Rec",
    params=CostParams, compute=compute,
    produces=("table3_cost", "table3_targets", "fig3_scaling", "fig4_streaming"),
    check=check_results,
)
