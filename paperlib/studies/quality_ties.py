"""Same-second ratings ("ties") in ML-1M, and what their order does to Table 2: a probe of the
quality study.

MovieLens stores ratings with a one-second clock, and its users rate many movies in the same second:
about half of consecutive ML-1M ratings share a timestamp. RecBole sorts each user's ratings by time
with a *stable* sort, so ties keep the order of the file. In ML-1M's ``ratings.dat`` that order is
close to one global order of the movies, the same for every user; a model can learn it, and the
next item inside a same-second group becomes partly predictable from the items before it. The
community ML-1M file ``ml-1m_sequences.txt.gz`` (the ``sequences`` layout in
``$PAPERLIB_DATA/ml-1m/``: one ``user movie`` line each, without timestamps) orders ties as an
unstable sort left them.

RecBole's ties are wider than a second: it holds ``timestamp:float`` as float32, which resolves
ML-1M's Unix times to 64 s (:func:`paperlib.data.readers.recbole_time`), so all ratings of a user
that round to the same 64 s keep file order, even where their exact seconds differ.

The probe takes a RecBole ``.inter`` file with timestamps (the whole of ML-1M, or the first users of
one) and trains the same model, with the quality study's ``paper`` settings, on four orders of the
same interactions:

* ``recbole``: RecBole 1.2's order (stable sort by the float32 timestamp, ties in file order);
* ``file``: a stable sort by the exact second, same-second ties in file order (RecBole's order, were
  its timestamps exact);
* ``copy``: the order of the ML-1M copy found by :func:`paperlib.data.load_interactions` for the
  same users (with ``ml-1m_sequences.txt.gz`` in ``$PAPERLIB_DATA/ml-1m/``, its order; with the
  official ``ratings.dat`` there, ``recbole`` again);
* ``shuffled``: RecBole's timestamps, ties in a random order (seeded).

Everything else is equal: users, items, the 5-core filter, the leave-one-out split sizes. The test
metrics are paired by user, so their differences come with a standard error.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from paperlib import paths, results
from paperlib.data.process import kcore, load_interactions, to_sequential
from paperlib.data.readers import chronological, read_interactions, recbole_time
from paperlib.data.sequences import DataError, SequentialData, eval_batches
from paperlib.fields import Checked, param
from paperlib.metrics import RankingAccumulator
from paperlib.runtime import code_fingerprint
from paperlib.studies.quality import QUALITY_CODE, _log_epochs_to_stdout

#: where the probe's results go: ``figures/results/quality_ties.paper.json``
RESULTS, PRESET = "quality_ties", "paper"  # not a registered study: a probe of quality's
VARIANTS = ("recbole", "file", "copy", "shuffled")


@dataclass(frozen=True)
class TieProbeParams(Checked):
    """Settings of the probe; training as the quality study's ``paper`` preset."""

    inter: str = param("", "RecBole .inter file of ML-1M with a timestamp field (the whole file or its first users)")
    model: str = param("mamba4rec", "model trained on each order")
    variants: tuple[str, ...] = param(VARIANTS, "orders to compare: recbole, file, copy, shuffled")
    seeds: tuple[int, ...] = param((2020,), "one run per order and seed")
    epochs: int = param(300, "maximum epochs", min=1)
    patience: int = param(10, "early-stopping patience on validation NDCG@10", min=0)
    batch_size: int = param(2048, "(prefix, target) pairs per step", min=1)
    lr: float = param(1e-3, "Adam's learning rate", min=0.0)
    device: str = param("cpu", "cpu, cuda or auto")
    output_dir: str = param("", "folder for results/; empty: the repository's figures/")
    note: str = param("", "where the .inter file came from, shown with the results")

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise DataError(f"variants must be a non-empty subset of {VARIANTS}, got {list(self.variants)}")
        if not self.inter:
            raise DataError("give 'inter': the path of a RecBole ml-1m.inter file with a timestamp field")


def read_timed(path: str | Path) -> pd.DataFrame:
    """A RecBole ``.inter`` file as ``user``, ``item``, ``timestamp`` (exact), users grouped, each
    user's rows in RecBole's order (a stable sort by the float32 timestamp: ties keep file order). A
    file without timestamps is refused: ties need them."""
    df = read_interactions(path, "recbole-inter")
    if "timestamp" not in df.columns:
        raise DataError(f"{path}: no timestamp field; the tie probe needs RecBole's 'timestamp:float' column")
    return df


def tie_report(df: pd.DataFrame, min_users: int = 3, seed: int = 0) -> dict[str, Any]:
    """How often ratings share a second, and whether the file orders ties the same way for everyone.

    Args:
        df: ``user``, ``item``, ``timestamp``, each user's rows in RecBole's order (:func:`read_timed`).
        min_users: a pair of movies counts for the consistency when it is tied in at least this many
            users.
        seed: shuffles the ties once for the consistency a random order gives.

    Returns: ``tied_consecutive`` (share of consecutive pairs in a user's sequence with equal
    timestamps), ``test_tied`` / ``valid_tied`` (share of users whose test / validation item shares its
    second with a neighbour), ``order_consistency`` (over movie pairs tied in ``min_users`` users or
    more: the share of their ties in the pair's majority order; 1 = one global order),
    ``order_consistency_random`` (the same with ties shuffled) and ``pairs`` (how many movie pairs);
    for RecBole's float32 timestamps: ``tied_consecutive_recbole`` (consecutive pairs that tie there),
    ``moved_recbole`` (share of positions whose item differs between the ``recbole`` and ``file``
    orders) and ``test_moved_recbole`` (share of users whose test item differs).
    """
    recbole = ordered(df, "recbole")
    df = chronological(df)  # the counts below are of exact seconds, same-second ties in df's order
    users = df["user"].to_numpy()
    same_user = users[1:] == users[:-1]
    rt = recbole_time(df["timestamp"].to_numpy())  # nondecreasing within a user in both orders
    moved = recbole["item"].to_numpy() != df["item"].to_numpy()
    last = np.r_[~same_user, True]  # each user's test row
    votes: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    shuffled: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    rng = np.random.default_rng(seed)
    tied = pairs = test_tied = valid_tied = n_users = 0
    for _, g in df.groupby("user", sort=False):
        items, ts = g["item"].to_numpy(), g["timestamp"].to_numpy()
        n_users += 1
        same = ts[1:] == ts[:-1]
        tied, pairs = tied + int(same.sum()), pairs + len(same)
        test_tied += bool(len(same) and same[-1])
        valid_tied += bool(len(same) >= 2 and (same[-1] or same[-2]))
        for _, idx in itertools.groupby(range(len(items)), key=lambda i: ts[i]):
            group = list(idx)
            if len(group) < 2:
                continue
            for tally, order in ((votes, group), (shuffled, list(rng.permutation(group)))):
                for a, b in itertools.combinations(order, 2):
                    x, y = items[a], items[b]
                    tally[(min(x, y), max(x, y))][0 if x < y else 1] += 1

    def consistency(tally: dict[tuple[str, str], list[int]]) -> tuple[float, int]:
        kept = [v for v in tally.values() if sum(v) >= min_users]
        total = sum(sum(v) for v in kept)
        return (sum(max(v) for v in kept) / total if total else float("nan")), len(kept)

    held, n_pairs = consistency(votes)
    return {
        "tied_consecutive_recbole": float(((rt[1:] == rt[:-1]) & same_user).sum() / max(same_user.sum(), 1)),
        "moved_recbole": float(moved.mean()) if len(df) else 0.0,
        "test_moved_recbole": float(moved[last].mean()) if len(df) else 0.0,
        "users": n_users, "interactions": len(df),
        "tied_consecutive": tied / max(pairs, 1), "test_tied": test_tied / max(n_users, 1),
        "valid_tied": valid_tied / max(n_users, 1), "order_consistency": held,
        "order_consistency_random": consistency(shuffled)[0], "pairs": n_pairs, "min_users": min_users,
    }


def tie_agreement(df: pd.DataFrame, other: pd.DataFrame) -> float:
    """Share of tied pairs (same user, same second in ``df``) that ``other`` (``user``, ``item`` in
    its own order) puts in ``df``'s order: 1 = the same order, 0.5 = unrelated, 0 = reversed."""
    pos = {(u, i): k for k, (u, i) in enumerate(zip(other["user"], other["item"]))}
    same = total = 0
    for (u, _), g in df.groupby(["user", "timestamp"], sort=False):
        if len(g) < 2 or (u, g["item"].iloc[0]) not in pos:
            continue
        where = [pos[(u, i)] for i in g["item"]]
        for a, b in itertools.combinations(where, 2):
            same, total = same + (a < b), total + 1
    return same / total if total else float("nan")


def ordered(df: pd.DataFrame, variant: str, copy: pd.DataFrame | None = None, seed: int = 0) -> pd.DataFrame:
    """``user``, ``item`` rows of ``df``'s users in the order ``variant`` gives (see the module doc);
    ``df`` holds each user's rows in file order or in RecBole's (:func:`read_timed`): ties keep it.

    ``copy`` (``user``, ``item`` in its own time order) is needed for ``variant="copy"``; users whose
    items differ between ``df`` and ``copy``, or whose copy order goes back in ``df``'s time, are
    dropped (their count is in the returned frame's ``attrs["dropped"]``).
    """
    if variant == "recbole":
        out = chronological(df, recbole_time(df["timestamp"].to_numpy()))[["user", "item"]]
    elif variant == "file":
        out = chronological(df)[["user", "item"]]
    elif variant == "shuffled":
        exact = chronological(df)
        rng = np.random.default_rng(seed)
        key = rng.permutation(len(exact))  # a random order, then a stable sort by (user, second)
        shuffled = exact.iloc[np.lexsort((key, exact["timestamp"].to_numpy(), pd.factorize(exact["user"])[0]))]
        out = shuffled[["user", "item"]]
    elif variant == "copy":
        if copy is None:
            raise DataError("variant 'copy' needs the copy's interactions")
        stamps = {u: dict(zip(g["item"], g["timestamp"])) for u, g in df.groupby("user", sort=False)}
        theirs = copy[copy["user"].isin(stamps)].groupby("user", sort=False)["item"].apply(list)

        def agrees(u: str) -> bool:
            """Same items, and the copy's order is a time order of the file's timestamps."""
            ts = stamps[u]
            if u not in theirs.index or len(theirs[u]) != len(ts) or set(theirs[u]) != set(ts):
                return False
            seq = [ts[i] for i in theirs[u]]
            return all(a <= b for a, b in zip(seq, seq[1:]))

        same = [u for u in stamps if agrees(u)]
        out = pd.DataFrame({"user": np.repeat(same, [len(theirs[u]) for u in same]),
                            "item": [i for u in same for i in theirs[u]]})
        out.attrs["dropped"] = len(stamps) - len(same)
        return out
    else:
        raise DataError(f"unknown variant {variant!r}: use one of {VARIANTS}")
    out = out.reset_index(drop=True)
    out.attrs["dropped"] = 0
    return out


def _test_ranks(model, data: SequentialData) -> np.ndarray:
    """Rank of each user's test item (1 = first), in user order."""
    acc = RankingAccumulator((10,))
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for b in eval_batches(data, "test", 4096):
            acc.add(model.score(b.items.to(device), b.lengths.to(device)), b.targets.to(device))
    return acc.ranks.numpy()


def ndcg_at(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k of one target at rank ``ranks`` (1-based)."""
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def compute(cfg: TieProbeParams, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.model`` on every order and seed; write and return the results document."""
    from paperlib.models import build_model
    from paperlib.train import TrainConfig, fit

    started, t0 = results.now_iso(), time.perf_counter()
    if progress:
        _log_epochs_to_stdout()
    timed = read_timed(cfg.inter)
    digest = hashlib.sha256(Path(cfg.inter).read_bytes()).hexdigest()
    common = set(timed["user"])
    n_file = len(common)
    copy_rows = None
    if "copy" in cfg.variants:  # every order on the same users: those the copy holds identically
        copy_rows = ordered(timed, "copy", load_interactions("ml-1m"))
        common = set(copy_rows["user"])
    timed = timed[timed["user"].isin(common)].reset_index(drop=True)
    runs = []
    for variant, seed in itertools.product(cfg.variants, cfg.seeds):
        rows = copy_rows if variant == "copy" else ordered(timed, variant, seed=seed)
        data = to_sequential(kcore(rows, 5), "ml-1m", 200)
        model = build_model(cfg.model, n_items=data.n_items, max_len=data.max_len, seed=seed)
        tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.patience,
                         seed=seed, device=cfg.device)
        if progress:
            print(f"[tie probe · {variant} · seed {seed} · {data.n_users} users]", flush=True)
        # checkpoints per input file, order, seed, settings and training code: an interrupted probe
        # resumes, and never from checkpoints of other settings or code
        shaping = {k: v for k, v in asdict(cfg).items() if k not in ("variants", "seeds", "output_dir", "note")}
        code = code_fingerprint(QUALITY_CODE)
        key = hashlib.sha256(f"{digest}{variant}{seed}{shaping}{code}".encode()).hexdigest()[:12]
        ckpt = paths.checkpoints_dir() / RESULTS / f"{variant}-{seed}-{key}"
        res = fit(model, data, tc, checkpoint_dir=ckpt, resume=True, progress=progress)
        ranks = _test_ranks(model, data)
        runs.append({"variant": variant, "seed": seed, "users": data.n_users, "items": data.n_items,
                     "best_epoch": res.best_epoch, "epochs_run": len(res.history),
                     "best_valid": res.best_valid, "test": res.test,
                     "valid_ndcg": [h["valid"]["ndcg@10"] for h in res.history],
                     "user_ids": list(data.user_raw_ids), "test_ranks": ranks.tolist()})
    report = tie_report(timed)
    if copy_rows is not None:
        report["copy_agreement"] = tie_agreement(timed, copy_rows)
    payload = {"report": report, "runs": runs,
               "source": {"file": str(cfg.inter), "sha256": digest,
                          "users": len(common), "users_in_file": n_file,
                          "copy": "ml-1m as paperlib.data.load_interactions finds it"}}
    results.save_results(RESULTS, PRESET, asdict(cfg), payload, output_dir=cfg.output_dir,
                         wall_seconds=time.perf_counter() - t0, started=started)
    return results.load_results(RESULTS, PRESET, cfg.output_dir or None)


def load(output_dir: str | None = None) -> dict[str, Any] | None:
    """The committed probe results, or None where the probe has not been run."""
    try:
        return results.load_results(RESULTS, PRESET, output_dir or None)
    except results.ResultsError:
        return None


def paired(doc: dict[str, Any], a: str, b: str) -> dict[str, float]:
    """Test NDCG@10 of order ``a`` minus order ``b``, paired by user and seed: mean and standard error."""
    by = {(r["variant"], r["seed"]): r for r in doc["results"]["runs"]}
    diffs = []
    for (v, s), ra in by.items():
        if v != a or (b, s) not in by:
            continue
        rb = by[(b, s)]
        xa = dict(zip(ra["user_ids"], ndcg_at(np.asarray(ra["test_ranks"]))))
        xb = dict(zip(rb["user_ids"], ndcg_at(np.asarray(rb["test_ranks"]))))
        diffs += [xa[u] - xb[u] for u in xa if u in xb]
    d = np.asarray(diffs)
    if not len(d):
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"),
            "n": int(len(d))}


def table(doc: dict[str, Any]) -> pd.DataFrame:
    """One row per order: best validation NDCG@10, test HR/NDCG/MRR@10 and best epoch (means over
    seeds), test NDCG@10 of each seed."""
    rows = [{"order": r["variant"], "seed": r["seed"], "users": r["users"], "best epoch": r["best_epoch"],
             "valid ndcg@10": r["best_valid"]["ndcg@10"],
             **{m: r["test"][m] for m in ("hr@10", "ndcg@10", "mrr@10")}} for r in doc["results"]["runs"]]
    df = pd.DataFrame(rows)
    out = df.groupby("order", sort=False).mean(numeric_only=True).drop(columns="seed").round(4)
    out["ndcg@10 per seed"] = df.groupby("order", sort=False).apply(
        lambda g: ", ".join(f"{s}: {v:.4f}" for s, v in zip(g["seed"], g["ndcg@10"])), include_groups=False)
    return out


def _full_gap(full: dict[str, Any] | None) -> tuple[float, float] | None:
    """The full-length run's Mamba4Rec test NDCG@10 on ML-1M and the published figure, if both exist."""
    from paperlib.studies.quality import PUBLISHED

    if full is None:
        return None
    ours = [r["test"]["ndcg@10"] for r in full["results"]["runs"] if r["dataset"] == "ml-1m" and r["label"] == "Mamba4Rec"]
    ref = [p["ndcg@10"] for p in PUBLISHED if p["dataset"] == "ml-1m" and p["model"] == "Mamba4Rec"
           and p["protocol"] == "recbole"]
    return (float(np.mean(ours)), ref[0]) if ours and ref else None


def summary(doc: dict[str, Any], full: dict[str, Any] | None = None) -> str:
    """What the probe shows, written from its results (and, with ``full``, the quality study's
    full-length results, how it compares with the gap to the published Mamba4Rec figure)."""
    rep, src = doc["results"]["report"], doc["results"]["source"]
    t = table(doc)
    seeds = sorted({r["seed"] for r in doc["results"]["runs"]})
    lines = [
        f"On {rep['users']:,} users of `{Path(src['file']).name}` ("
        + "; ".join(x for x in (doc["params"].get("note", ""), (
            f"{src['users_in_file'] - src['users']} more in the file left out: their items or time order "
            "differ from the copy's") if src.get("users_in_file", src["users"]) > src["users"] else "") if x)
        + f"), {rep['interactions']:,} ratings in all, "
        f"{rep['tied_consecutive']:.0%} of consecutive ratings share their second; the test item shares "
        f"its second with the item before it for {rep['test_tied']:.0%} of users, the validation item with a "
        f"neighbour for {rep['valid_tied']:.0%}.",
        f"Movie pairs tied in at least {rep['min_users']} users ({rep['pairs']:,} pairs) come in their "
        f"majority order {rep['order_consistency']:.1%} of the time in the file, against "
        f"{rep['order_consistency_random']:.1%} for a random order of the ties: "
        + ("the file orders ties (nearly) the same way for every user, so the order is learnable."
           if rep["order_consistency"] - rep["order_consistency_random"] > 0.1 else
           "the file's order of ties is not much more consistent than chance."),
    ]
    if "moved_recbole" in rep:
        lines.append(
            f"RecBole holds the timestamps as float32 (64 s steps for these dates) and sorts by them: "
            f"{rep['tied_consecutive_recbole']:.0%} of consecutive ratings tie there and keep file order, "
            f"so {rep['moved_recbole']:.0%} of the positions hold another item than in the exact time order "
            f"(`file`), and the test item is another for {rep['test_moved_recbole']:.0%} of users.")
    if len(t):
        lines.append(f"Test NDCG@10 of the same model and settings on each order (mean over {len(seeds)} "
                     f"seed{'s' if len(seeds) > 1 else ''}): "
                     + ", ".join(f"{o} {row['ndcg@10']:.4f}" for o, row in t.iterrows()) + ".")
        lines.append("Best validation NDCG@10: " + ", ".join(
            f"{o} {row['valid ndcg@10']:.4f}" for o, row in t.iterrows()) + ".")
    for a, b in (("recbole", "file"), ("recbole", "copy"), ("file", "copy"), ("file", "shuffled"),
                 ("shuffled", "copy")):
        if a in t.index and b in t.index:
            d = paired(doc, a, b)
            rel = t.loc[a, "ndcg@10"] / t.loc[b, "ndcg@10"] - 1
            lines.append(f"{a} − {b}: {d['mean']:+.4f} ± {d['se']:.4f} (standard error over "
                         f"{d['n']:,} user-runs, paired by user and seed; {rel:+.0%}).")
    if {"copy", "shuffled"} <= set(t.index):
        d = paired(doc, "shuffled", "copy")
        agree = rep.get("copy_agreement", float("nan"))
        lines.append(f"The copy puts {agree:.1%} of tied pairs in the file's order (50% is chance); its ties "
                     "and the shuffled ones "
                     + ("differ by less than two standard errors." if abs(d["mean"]) < 2 * d["se"] else
                        "differ by more than two standard errors."))
    gap = _full_gap(full)
    theirs = next((v for v in ("recbole", "file") if v in t.index), None)
    if gap and theirs and "copy" in t.index:
        ours, ref = gap
        what = "RecBole's order" if theirs == "recbole" else "the exact time order with ties in file order"
        lines.append(f"For scale: the full-length run's Mamba4Rec, trained on the copy, has test NDCG@10 "
                     f"{ours:.4f}; the published figure {ref:.4f} is {ref / ours - 1:+.0%} above it. On these users "
                     f"{what} gives {t.loc[theirs, 'ndcg@10'] / t.loc['copy', 'ndcg@10'] - 1:+.0%} "
                     f"over the copy's.")
    return "\n\n".join(lines)
