"""Cost benchmarks that print tables (``paperlib bench <name>``); not unit tests.

The measurements are :mod:`paperlib.cost`'s, as the cost study (``notebooks/03_cost.ipynb``) takes
them: the model benchmarks run every point in its own process (median and quartiles of repeated
runs after a warm-up, peak memory as defined there); the scan and metrics benchmarks time code in
this process. Every benchmark names the device and prints the load average before and after, so a
busy machine shows.

``paperlib bench train-step``: one training step of Mamba4Rec (2 layers) and SASRec (2 layers) at
batch 256 × L 200 and batch 64 × L 800 (51,200 (prefix, target) pairs each; all-position
full-softmax CE over ML-1M's 3,417-row catalogue, Adam), the two models alternating, with the
ratio against its target (Mamba4Rec ≤ 0.8× SASRec at L 200, ≤ 0.5× at L 800).

``paperlib bench scaling``: training-step time and peak memory of the four models against L
(50 … 800, 16 sequences a step) and the exponent of a fitted power law (target for Mamba4Rec: ≤ 1.1).

``paperlib bench streaming``: latency of one user's update after one new item against the history
already seen (1 … 3200): Mamba4Rec's and GRU4Rec's state step, SASRec's key/value cache and SASRec
recomputing (target for Mamba4Rec: at 3200 within 1.5× of 50, below 5 ms).

``paperlib bench scan``: one forward + backward of the selective scan at batch 256, L 200, D_inner
128, N 32 (float32): our numba kernels, mambapy's parallel scan, and the plain PyTorch loop.

``paperlib bench metrics``: HR/NDCG/MRR@10 for all 6,040 ML-1M users over all 3,417 items from a
given score matrix (full ranking, ties against the target).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch

from paperlib import cost

#: ML-1M's catalogue (items 1..3416 and the padding row)
ML1M_ITEMS = 3416
#: the Mamba4Rec depth compared with the 2-layer SASRec
MAMBA_2 = {"n_layers": 2}


# --------------------------------------------------------------------------------------------
# printing


def _header(title: str, device: str = "cpu", threads: int = 0) -> None:
    """The title, the device (``threads`` 0: every usable core, as the points use) and the load."""
    print(title)
    print(f"  {cost.describe_device(device, threads)}, torch {torch.__version__}, "
          f"load average before: {cost.load_average()}")


def _footer() -> None:
    print(f"  load average after: {cost.load_average()}")


def _table(rows: Sequence[Sequence[str]], head: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  " + "  ".join(str(c).ljust(w) if i in (0, len(head) - 1) else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))


def _median(record: dict[str, Any], key: str = "seconds") -> float | None:
    return cost.summary(record[key])["median"] if record["status"] == "ok" and record.get(key) else None


def _spread(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record['message'].splitlines()[0][:60]}"
    s = cost.summary(record["seconds"])
    return f"[{cost.fmt_seconds(s['q25'])}–{cost.fmt_seconds(s['q75'])}], {s['n']} runs"


def _gb(record: dict[str, Any]) -> str:
    peak = _median(record, "peak_bytes")
    return "-" if peak is None else f"{peak / cost.GB:.2f}"


def _verdict(value: float | None, goal: float, below: bool = True) -> str:
    if value is None:
        return "not measured"
    return "met" if (value <= goal if below else value >= goal) else "NOT met"


# --------------------------------------------------------------------------------------------
# model benchmarks (each point in its own process)


def bench_train_step(args: argparse.Namespace | None = None, shapes: Sequence[tuple[int, int, float]] = (
        (256, 200, 0.8), (64, 800, 0.5)), rounds: int = 2, repeats: int = 3, threads: int = 0,
        n_items: int = ML1M_ITEMS) -> None:
    """Mamba4Rec (2 layers) vs SASRec (2 layers): one training step at each (batch, L, target ratio)
    of ``shapes`` (by default 256 × 200 and 64 × 800)."""
    _header(f"one training step (all-position CE + Adam), hidden 64, {n_items + 1}-row catalogue; "
            f"Mamba4Rec and SASRec alternate, {rounds} rounds × {repeats} runs each", threads=threads)
    rows = []
    for batch, length, goal in shapes:
        make = {
            "Mamba4Rec, 2 layers": lambda: cost.TrainStepPoint(model="mamba4rec", options=MAMBA_2, batch=batch,
                                                               length=length, n_items=n_items, repeats=repeats,
                                                               threads=threads),
            "SASRec, 2 layers": lambda: cost.TrainStepPoint(model="sasrec", batch=batch, length=length,
                                                            n_items=n_items, repeats=repeats, threads=threads),
        }
        pooled: dict[str, dict[str, Any]] = {}
        for _ in range(rounds):  # alternate, so that a change of load touches both models
            for name, point in make.items():
                rec = cost.run_point(point())
                if name in pooled and rec["status"] == "ok" and pooled[name]["status"] == "ok":
                    pooled[name]["seconds"] += rec["seconds"]
                    pooled[name]["peak_bytes"] += rec["peak_bytes"]
                else:
                    pooled.setdefault(name, rec)
        for name, rec in pooled.items():
            s = _median(rec)
            rows.append((f"{name}, B {batch} L {length}", "-" if s is None else f"{s:.3f}", _gb(rec), _spread(rec)))
        m, s = (_median(pooled[n]) for n in make)
        ratio = None if m is None or s is None else m / s
        rows.append((f"  Mamba4Rec / SASRec at L {length}", "-" if ratio is None else f"{ratio:.2f}", "",
                     f"target ≤ {goal}: {_verdict(ratio, goal)}"))
    _table(rows, ("model", "seconds", "peak GB", "median of the runs; quartiles"))
    _footer()


def bench_scaling(args: argparse.Namespace | None = None, lengths: Sequence[int] = (50, 100, 200, 400, 800),
                  batch: int = 16, repeats: int = 3, threads: int = 0, n_items: int = ML1M_ITEMS) -> None:
    """Training-step time and peak memory against L for the four models; fitted exponents."""
    models = [("GRU4Rec", "gru4rec", {}), ("SASRec", "sasrec", {}), ("BERT4Rec", "bert4rec", {}),
              ("Mamba4Rec", "mamba4rec", {}), ("Mamba4Rec, 2 layers", "mamba4rec", MAMBA_2)]
    _header(f"training step against the history length L, {batch} sequences a step ({batch}·L pairs)",
            threads=threads)
    points, names = [], []
    for length in lengths:  # every model at one length before the next length
        for label, name, options in models:
            points.append(cost.TrainStepPoint(model=name, options=options, batch=batch, length=length,
                                              n_items=n_items, repeats=repeats, threads=threads))
            names.append(label)
    records = cost.run_points(points, progress=False)
    rows = []
    for label, _, _ in models:
        mine = [r for r, n in zip(records, names) if n == label]
        times = [_median(r) for r in mine]
        cells = [("-" if t is None else f"{t:.3f}") for t in times]
        ok = [(r["length"], t) for r, t in zip(mine, times) if t is not None]
        k = cost.fit_exponent([x for x, _ in ok], [t for _, t in ok])
        peaks = [_gb(r) for r in mine]
        goal = f" (target ≤ 1.1: {_verdict(k, 1.1)})" if label.startswith("Mamba4Rec") else ""
        rows.append((label, *cells, "-" if k is None else f"{k:.2f}{goal}"))
        rows.append(("  peak GB", *peaks, ""))
    _table(rows, ("model", *[f"L {n}" for n in lengths], "exponent of time in L"))
    _footer()


def bench_streaming(args: argparse.Namespace | None = None, histories: Sequence[int] = (1, 50, 200, 800, 3200),
                    repeats: int = 30, threads: int = 0, n_items: int = ML1M_ITEMS) -> None:
    """One user's update after one new item against the history already seen."""
    lines = [("Mamba4Rec: state step", "mamba4rec", "step"), ("GRU4Rec: state step", "gru4rec", "step"),
             ("SASRec: key/value cache", "sasrec", "kv_cache"), ("SASRec: recompute", "sasrec", "recompute")]
    _header("latency of one user's update (new hidden state, scores of every item, top 10) after one new item",
            threads=threads)
    points, names = [], []
    for h in histories:
        for label, name, mode in lines:
            points.append(cost.StreamPoint(model=name, mode=mode, history=h, n_items=n_items, repeats=repeats,
                                           threads=threads))
            names.append(label)
    records = cost.run_points(points, progress=False)
    rows = []
    for label, _, _ in lines:
        mine = {r["history"]: r for r, n in zip(records, names) if n == label}
        rows.append((label, *[("-" if _median(mine[h]) is None else cost.fmt_seconds(_median(mine[h])))
                              for h in histories], f"{mine[histories[-1]].get('state_bytes', 0) / 1024:.1f} KiB"))
    _table(rows, ("update", *[f"history {h}" for h in histories], "state per user at the longest"))
    mamba = {r["history"]: _median(r) for r, n in zip(records, names) if n == lines[0][0]}
    top, base = mamba.get(histories[-1]), mamba.get(50)
    growth = None if top is None or base is None else top / base
    print(f"  Mamba4Rec at {histories[-1]} / at 50: {'-' if growth is None else f'{growth:.2f}'} "
          f"(target ≤ 1.5: {_verdict(growth, 1.5)}); at {histories[-1]}: "
          f"{'-' if top is None else cost.fmt_seconds(top)} (target < 5 ms: {_verdict(top, 5e-3)})")
    _footer()


# --------------------------------------------------------------------------------------------
# selective scan (in this process)


def _scan_inputs(batch: int, dim: int, length: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        # pre-softplus Δ as the Mamba block feeds it (bias added in the scan)
        delta=torch.randn(batch, dim, length, generator=g) * 0.5,
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(batch, n, length, generator=g),
        C=torch.randn(batch, n, length, generator=g),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, length, generator=g),
        delta_bias=torch.full((dim,), -1.0),
    )


def _scan_step(backend: str, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    from paperlib.models.scan import selective_scan

    def run() -> None:
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out = selective_scan(**leaves, delta_softplus=True, backend=backend)
        out.sum().backward()

    return run


def _mambapy_step(inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """mambapy's pscan selective scan (its layout (batch, L, D)), with the same softplus, D and gate."""
    import torch.nn.functional as F
    from mambapy.mamba import MambaBlock as PyBlock

    def run() -> None:
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        x = leaves["u"].transpose(1, 2)
        delta = F.softplus(leaves["delta"].transpose(1, 2) + leaves["delta_bias"])
        y = PyBlock.selective_scan(
            None, x, delta, leaves["A"], leaves["B"].transpose(1, 2), leaves["C"].transpose(1, 2), leaves["D"]
        )
        out = y * F.silu(leaves["z"].transpose(1, 2))
        out.sum().backward()

    return run


def _in_process(fn: Callable[[], None], warmup: int, repeats: int) -> tuple[float, float, int]:
    """(median seconds, best seconds, median peak bytes) of ``fn`` in this process."""
    meter = cost.MemoryMeter("cpu")
    meter.set_baseline()
    times, peaks = cost.time_runs(fn, warmup, repeats, "cpu", meter)
    return cost.summary(times)["median"], min(times), int(cost.summary(peaks)["median"])


def bench_scan(args: argparse.Namespace | None = None) -> None:
    """Forward + backward of the selective scan, B=256, L=200, D_inner=128, N=32, float32."""
    import numba

    batch, dim, length, n = 256, 128, 200, 32
    repeats = getattr(args, "repeats", 3) if args is not None else 3
    slow = getattr(args, "slow", True) if args is not None else True
    _header(f"selective scan, forward + backward, batch {batch}, L {length}, D_inner {dim}, N {n}, float32",
            threads=torch.get_num_threads())
    inputs = _scan_inputs(batch, dim, length, n)
    med, best, peak = _in_process(_scan_step("cpu", inputs), 1, repeats)
    rows = [(f"ours: numba kernels ({numba.threading_layer()} threads)", f"{med:.3f}", f"{peak / cost.GB:.2f}",
             f"best {best:.3f} s of {repeats}")]
    if slow:
        try:
            med_p, _, peak_p = _in_process(_mambapy_step(inputs), 0, 1)
            rows.append(("mambapy pscan", f"{med_p:.3f}", f"{peak_p / cost.GB:.2f}", f"ours is {med_p / med:.0f}x faster"))
        except ImportError:
            rows.append(("mambapy pscan", "-", "-", "mambapy not installed (pip install mambapy)"))
        med_r, _, peak_r = _in_process(_scan_step("reference", inputs), 0, 1)
        rows.append(("plain PyTorch loop (reference)", f"{med_r:.3f}", f"{peak_r / cost.GB:.2f}",
                     f"ours is {med_r / med:.0f}x faster"))
    _table(rows, ("implementation", "seconds", "peak GB", "notes"))
    _footer()


# --------------------------------------------------------------------------------------------
# metrics (in this process)


def bench_metrics(args: argparse.Namespace | None = None) -> None:
    """Full-ranking HR/NDCG/MRR@10 of 6,040 users × 3,417 items from a given score matrix."""
    from paperlib.metrics import full_ranking_metrics

    users, items = 6040, 3417
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(users, items, generator=g)
    targets = torch.randint(1, items, (users,), generator=g)
    _header(f"full-ranking metrics@10, {users} users x {items} items (ML-1M size), score matrix given",
            threads=torch.get_num_threads())
    med, best, peak = _in_process(lambda: full_ranking_metrics(scores, targets, ks=(10,)), 1, 5)
    _table([("HR/NDCG/MRR@10", f"{med:.3f}", f"{peak / cost.GB:.2f}", f"median of 5, best {best:.3f} s")],
           ("computation", "seconds", "peak GB", "notes"))
    _footer()


#: name → benchmark, as ``paperlib bench <name>`` spells it
BENCHMARKS: dict[str, Callable[[argparse.Namespace | None], None]] = {
    "metrics": bench_metrics,
    "scan": bench_scan,
    "train-step": bench_train_step,
    "scaling": bench_scaling,
    "streaming": bench_streaming,
}


# --------------------------------------------------------------------------------------------
# several processes (DistributedDataParallel)


def _ddp_bench_worker(rank: int, world: int, port: int, threads: int, name: str, dataset: str, out: str) -> None:
    """One rank of ``bench_ddp``: one training epoch and one validation, timed, weights saved by rank 0."""
    import os
    import time

    from paperlib import distributed
    from paperlib.data import load_dataset
    from paperlib.models import build_model
    from paperlib.train import Trainer, TrainConfig

    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        distributed.init_from_env()
    try:
        data = load_dataset(dataset)
        off = {"dropout": 0.0} if name == "mamba4rec" else {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0}
        model = build_model(name, n_items=data.n_items, max_len=data.max_len, seed=0, **off)
        # evaluation is sharded by evaluation batches: two of them keep both processes busy
        eval_batch = -(-data.n_users // 2)
        trainer = Trainer(model, data, TrainConfig(epochs=1, eval_batch_size=eval_batch, device="cpu", seed=0),
                          progress=False)
        t0 = time.perf_counter()
        losses, _ = trainer.train_epoch(1)
        t1 = time.perf_counter()
        valid = trainer.validate()
        t2 = time.perf_counter()
        if rank == 0:
            torch.save({"train": t1 - t0, "valid": t2 - t1, "steps": len(losses), "loss": sum(losses) / len(losses),
                        "ndcg": valid["ndcg@10"], "weights": model.state_dict()}, out)
    finally:
        distributed.destroy()


def bench_ddp(args: argparse.Namespace | None = None) -> None:
    """``paperlib bench ddp``: one training epoch (and one validation) of SASRec and Mamba4Rec on
    ML-100K in 1 process and in 2 (DistributedDataParallel, gloo on CPU), side by side, with the
    speed-up and how far apart the two runs end (epoch loss, validation NDCG@10, weights; dropout
    off, so they differ only by float rounding, which Adam's normalised steps amplify over the
    epoch). Both runs use the same cores: each of the 2 processes gets half the
    threads of the single one. On a 2-core machine expect little speed-up; the point is that it
    runs and agrees."""
    import os
    import socket
    import tempfile
    from pathlib import Path

    import torch.multiprocessing as mp

    from paperlib.data import count_pairs, load_dataset

    dataset = "ml-100k"
    data = load_dataset(dataset)
    threads = torch.get_num_threads()
    print(f"DDP: one epoch on {dataset} ({data.n_users:,} users, {count_pairs(data):,} training pairs), "
          "batch 2048 pairs, gloo on CPU; "
          f"1 process x {threads} thread(s) vs 2 processes x {max(1, threads // 2)}")
    print(f"  load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("sasrec", "mamba4rec"):
            got = {}
            for world in (1, 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                out = str(Path(tmp) / f"{name}-{world}.pt")
                mp.spawn(_ddp_bench_worker, args=(world, port, max(1, threads // world), name, dataset, out),
                         nprocs=world, join=True)
                got[world] = torch.load(out, weights_only=True)
            diff = max(float((got[1]["weights"][k] - got[2]["weights"][k]).abs().max()) for k in got[1]["weights"])
            one, two = got[1], got[2]
            rows.append((name, str(one["steps"]), f"{one['train']:.1f}", f"{two['train']:.1f}",
                         f"{one['train'] / two['train']:.2f}x", f"{one['valid']:.1f} / {two['valid']:.1f}",
                         f"{one['loss']:.5f} / {two['loss']:.5f}", f"{one['ndcg']:.4f} / {two['ndcg']:.4f}",
                         f"{diff:.1e}"))
    head = ("model", "steps", "epoch, 1 proc (s)", "epoch, 2 procs (s)", "speed-up", "valid 1 / 2 (s)",
            "epoch loss 1 / 2", "valid NDCG@10 1 / 2", "max |w1 - w2|")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for line in (head, *rows):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)))
    print(f"  load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


BENCHMARKS["ddp"] = bench_ddp
