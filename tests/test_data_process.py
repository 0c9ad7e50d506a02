"""k-core, id remapping, statistics, leave-one-out split and batches; counts on the real datasets."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from paperlib.data import (
    DataError,
    SequentialData,
    dataset_stats,
    eval_batches,
    kcore,
    load_dataset,
    load_interactions,
    load_titles,
    pad_right,
    read_titles,
    TrainLoader,
    count_pairs,
    recbole_pairs,
    to_sequential,
    train_batches,
)

# small test files are not the reference copies of the real files: that warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:.*not the reference copy")

# The real datasets: $PAPERLIB_DATA if set, else ../shared/data beside the repository.
_env = os.environ.get("PAPERLIB_DATA")
SHARED = Path(_env) if _env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PAPERLIB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("PAPERLIB_OFFLINE", "1")  # never touch the network
    monkeypatch.setenv("TQDM_DISABLE", "1")


def frame(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(pairs, columns=["user", "item"], dtype=str)


def pairs(df: pd.DataFrame) -> list[tuple[str, str]]:
    return list(zip(df["user"], df["item"]))


# --------------------------------------------------------------------------------------------
# k-core


TOY = [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "b"), ("u2", "c"),
       ("u3", "a"), ("u3", "b"), ("u3", "d"), ("u4", "d"), ("u4", "e")]  # fmt: skip


def test_kcore_by_hand_needs_several_rounds():
    # k=2. Round 1: item e has 1 -> drop (u4,e). Round 2: u4 has 1 -> drop (u4,d).
    # Round 3: d has 1 -> drop (u3,d). Round 4: every user and item has >= 2: stable.
    out = kcore(frame(TOY), 2)
    assert pairs(out) == [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "b"), ("u2", "c"), ("u3", "a"), ("u3", "b")]
    assert list(out.index) == list(range(8))
    # k=3: c, d, e and u4 go in round 1; then u1..u3 have 2 each and everything goes
    assert kcore(frame(TOY), 3).empty


def test_kcore_counts_duplicates_and_edge_cases():
    df = frame([("u1", "x"), ("u1", "x"), ("u2", "y")])
    assert pairs(kcore(df, 2)) == [("u1", "x"), ("u1", "x")]  # a repeated pair counts twice (RecBole)
    assert pairs(kcore(df, 0)) == pairs(df) == pairs(kcore(df, 1))
    for bad in (-1, 2.5, True, "5"):
        with pytest.raises(DataError, match="non-negative integer"):
            kcore(df, bad)
    # other columns ride along
    ts = df.assign(timestamp=[3, 4, 5])
    assert kcore(ts, 2)["timestamp"].tolist() == [3, 4]


def test_kcore_is_a_fixed_point_on_random_data():
    rng = np.random.default_rng(0)
    df = frame([(f"u{u}", f"i{i}") for u, i in zip(rng.integers(0, 60, 800), rng.zipf(1.6, 800) % 90)])
    out = kcore(df, 5)
    assert out["user"].value_counts().min() >= 5 and out["item"].value_counts().min() >= 5
    assert len(kcore(out, 5)) == len(out)
    # maximal: no removed interaction could be added back (its user or item would stay below 5
    # together with the other removed rows): check with a slow reference
    keep = pd.Series(True, index=df.index)
    while True:
        cur = df[keep]
        ok = cur["user"].map(cur["user"].value_counts()).ge(5) & cur["item"].map(cur["item"].value_counts()).ge(5)
        if ok.all():
            break
        keep[cur.index[~ok]] = False
    assert pairs(out) == pairs(df[keep])


# --------------------------------------------------------------------------------------------
# Remapping and statistics


def test_to_sequential_remaps_in_order_of_first_appearance():
    # users interleaved: grouped in order of first appearance, rows of a user keep their order
    df = frame([("b", "m"), ("a", "n"), ("b", "n"), ("a", "o"), ("b", "o"), ("a", "m")])
    data = to_sequential(df, "toy", max_len=7, titles={"m": "Em", "o": "Oh", "zzz": "unused"})
    assert data.user_raw_ids == ["b", "a"]
    assert data.item_raw_ids == ["", "m", "n", "o"]  # index 0 is padding
    assert [s.tolist() for s in data.sequences] == [[1, 2, 3], [2, 3, 1]]
    assert all(s.dtype == np.int64 for s in data.sequences)
    assert data.n_items == 3 and data.max_len == 7 and data.titles == {1: "Em", 3: "Oh"}
    with pytest.raises(DataError, match="empty after filtering"):
        to_sequential(df.iloc[:0], "toy", 5)
    with pytest.raises(DataError, match="fewer than 3 items"):
        to_sequential(frame([("a", "x"), ("a", "y")]), "toy", 5)


def test_dataset_stats_by_hand():
    df = frame(TOY[:8])  # u1: 3, u2: 3, u3: 2 interactions over items a, b, c
    s = dataset_stats(df)
    assert (s.users, s.items, s.interactions) == (3, 3, 8)
    assert s.avg_len == pytest.approx(8 / 3) and s.median_len == 3.0 and s.sparsity == pytest.approx(1 - 8 / 9)
    data = to_sequential(frame(TOY[:6] + [("u3", "a"), ("u3", "b"), ("u3", "d")]), "toy", 5)
    assert dataset_stats(data).as_dict() == {
        "users": 3, "items": 4, "interactions": 9, "avg_len": 3.0, "median_len": 3.0, "sparsity": 1 - 9 / 12,
    }  # fmt: skip
    with pytest.raises(DataError, match="empty"):
        dataset_stats(df.iloc[:0])


# --------------------------------------------------------------------------------------------
# Leave-one-out split and batches (sequences.py)


def toy_data(max_len: int) -> SequentialData:
    seqs = [np.arange(1, 8), np.array([8, 9, 10]), np.array([3, 1, 4, 1])]
    return SequentialData("toy", seqs, n_items=10, max_len=max_len)


def test_leave_one_out_split():
    data = toy_data(50)
    assert [s.tolist() for s in data.train_sequences()] == [[1, 2, 3, 4, 5], [8], [3, 1]]
    hist, tgt = data.eval_examples("valid")
    assert [h.tolist() for h in hist] == [[1, 2, 3, 4, 5], [8], [3, 1]] and tgt.tolist() == [6, 9, 4]
    hist, tgt = data.eval_examples("test")
    assert [h.tolist() for h in hist] == [[1, 2, 3, 4, 5, 6], [8, 9], [3, 1, 4]] and tgt.tolist() == [7, 10, 1]
    with pytest.raises(ValueError, match="unknown split"):
        data.eval_examples("train")


def test_pad_right_keeps_most_recent_items():
    items, lengths = pad_right([np.array([1, 2, 3, 4, 5]), np.array([7])], max_len=3)
    assert items.tolist() == [[3, 4, 5], [7, 0, 0]] and lengths.tolist() == [3, 1]
    assert items.dtype == torch.int64
    items, lengths = pad_right([np.array([1, 2]), np.array([3])], max_len=10)
    assert items.shape == (2, 2) and items.tolist() == [[1, 2], [3, 0]]
    with pytest.raises(DataError, match="empty history"):
        pad_right([np.array([1]), np.array([], dtype=np.int64)], 5)


def test_train_batches_targets_aligned_and_truncated():
    data = toy_data(max_len=3)
    batches = list(train_batches(data, batch_size=None, shuffle=False))
    assert len(batches) == 1
    b = batches[0]
    # user 2's training part [8] has no (input, target) pair and is skipped
    # user 1: train part 1..5 -> targets 2..5; max_len 3: a first window of 3 targets (2, 3, 4),
    # then a window over the last 3 items whose only new target is 5
    assert b.items.tolist() == [[1, 2, 3], [2, 3, 4], [3, 0, 0]]
    assert b.targets.tolist() == [[2, 3, 4], [3, 4, 5], [1, 0, 0]]
    assert b.loss_mask.tolist() == [[True] * 3, [False, False, True], [True, False, False]]
    assert b.lengths.tolist() == [3, 3, 1]
    assert b.n_pairs == count_pairs(data) == 5
    g = torch.Generator().manual_seed(0)
    shuffled = list(train_batches(data, batch_size=3, generator=g))
    assert sorted(x.n_pairs for x in shuffled) == [1, 1, 3]


def window_pairs(data: SequentialData, stride: int | None = None) -> list[tuple[int, tuple[int, ...], int]]:
    """The (user, history, target) pairs the training windows count, read off the batches."""
    loader = TrainLoader(data, None, shuffle=False, stride=stride)
    (batch,) = list(loader)
    out = []
    for row, w in enumerate(range(len(loader.windows))):
        user = int(loader.windows.user[w])
        for j in np.flatnonzero(batch.counted[row].numpy()):
            out.append((user, tuple(batch.items[row, : j + 1].tolist()), int(batch.targets[row, j])))
    return out


def test_windows_hold_every_recbole_pair_once():
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, 30, size=n) for n in (3, 4, 5, 9, 12, 17, 30)]
    data = SequentialData("toy", seqs, n_items=30, max_len=5)
    recbole = recbole_pairs(data)
    assert len(recbole) == count_pairs(data) == sum(len(s) - 3 for s in seqs)
    # stride 1: every target sees its full max_len history, i.e. exactly RecBole's augmentation
    assert sorted(window_pairs(data, stride=1)) == sorted(recbole)
    for stride in (None, 2, 4):
        # the same targets in the same order, each exactly once; each history a suffix of RecBole's,
        # of at least max_len - stride + 1 items (the whole history while it fits the first window)
        pairs = window_pairs(data, stride=stride)
        assert [(u, t) for u, _, t in pairs] == [(u, t) for u, _, t in recbole]
        least = 5 - (stride or 5) + 1
        for (_, full, _), (_, hist, _) in zip(recbole, pairs):
            assert full[len(full) - len(hist):] == hist and len(hist) >= min(len(full), least)


def test_train_loader_batch_size_counts_pairs_and_can_change():
    rng = np.random.default_rng(0)
    data = SequentialData("toy", [rng.integers(1, 20, size=n) for n in rng.integers(4, 40, size=50)],
                          n_items=20, max_len=8)
    loader = TrainLoader(data, 16, generator=torch.Generator().manual_seed(0))
    sizes = []
    for i, batch in enumerate(loader):
        sizes.append(batch.n_pairs)
        assert batch.n_pairs <= loader.batch_size
        if i == 3:
            loader.batch_size = 40  # taken for the very next batch, the epoch goes on
    assert sum(sizes) == count_pairs(data)
    assert max(sizes[:4]) <= 16 and max(sizes[4:]) > 16
    with pytest.raises(DataError, match="smaller than the 8 targets of one training window"):
        TrainLoader(data, 7)
    with pytest.raises(DataError, match="larger than an epoch"):
        TrainLoader(data, count_pairs(data) + 1)
    with pytest.raises(DataError, match="stride must lie in 1..max_len=8"):
        TrainLoader(data, 16, stride=9)


def test_eval_batches():
    data = toy_data(max_len=2)
    batches = list(eval_batches(data, "test", batch_size=2))
    assert [b.users.tolist() for b in batches] == [[0, 1], [2]]
    assert batches[0].items.tolist() == [[5, 6], [8, 9]] and batches[0].targets.tolist() == [7, 10]
    assert batches[1].items.tolist() == [[1, 4]] and batches[1].lengths.tolist() == [2]
    valid = next(eval_batches(data, "valid", batch_size=3))
    assert valid.items.tolist() == [[4, 5], [8, 0], [3, 1]] and valid.targets.tolist() == [6, 9, 4]
    assert valid.lengths.tolist() == [2, 1, 2]


# --------------------------------------------------------------------------------------------
# load_dataset end to end on small files


def write_ml100k(folder: Path, n_users: int = 6, n_items: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for u in range(1, n_users + 1):
        for i in range(1, n_items + 1):
            lines.append(f"{u}\t{(u + i) % n_items + 1}\t3\t{1000 * u - i}\n")  # time runs backwards in the file
    (folder / "u.data").write_text("".join(lines))
    (folder / "u.item").write_text("".join(f"{i}|Film {i} (1990)|x\n" for i in range(1, n_items + 1)), encoding="latin-1")


def test_load_dataset_small(tmp_path):
    write_ml100k(tmp_path / "data" / "ml-100k")
    data = load_dataset("ml-100k", k=4)
    assert data.name == "ml-100k" and data.max_len == 200 and data.n_users == 6 and data.n_items == 4
    raw = load_interactions("ml-100k")
    first = raw[raw["user"] == "1"]
    assert first["timestamp"].is_monotonic_increasing
    # user 1's items in time order are the file's in reverse; remapped ids follow first appearance
    assert data.item_raw_ids[1:] == first["item"].tolist() and data.sequences[0].tolist() == [1, 2, 3, 4]
    assert data.titles == {i: f"Film {data.item_raw_ids[i]} (1990)" for i in range(1, 5)}
    assert load_dataset("ml-100k", k=4, max_len=3, titles=False).titles is None
    with pytest.raises(DataError, match="empty after the 5-core"):
        load_dataset("ml-100k")  # each item has 6 interactions but each user only 4
    with pytest.raises(DataError, match="max_len must be a positive integer"):
        load_dataset("ml-100k", k=4, max_len=0)


def test_load_interactions_is_cached_and_copy_safe(tmp_path):
    write_ml100k(tmp_path / "data" / "ml-100k")
    a = load_interactions("ml-100k")
    a.loc[0, "item"] = "999"
    a["extra"] = 1
    b = load_interactions("ml-100k")
    assert "extra" not in b.columns and b.loc[0, "item"] != "999"


# --------------------------------------------------------------------------------------------
# The real datasets (skipped where the shared folder is absent)

EXPECTED = {
    # name: (raw users, items, interactions), (5-core users, items, interactions), titles after 5-core
    "ml-1m": ((6040, 3706, 1_000_209), (6040, 3416, 999_611), 3416),
    "ml-100k": ((943, 1682, 100_000), (943, 1349, 99_287), 1349),
    "amazon-beauty": ((22363, 12101, 198_502), (22363, 12101, 198_502), 12094),  # 7 items have no title
    "amazon-video-games": ((31013, 23715, 287_107), (24303, 10672, 231_780), None),  # SASRec file: no titles
}


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real datasets not found at {SHARED}: set PAPERLIB_DATA")
@pytest.mark.parametrize("name", list(EXPECTED))
def test_verified_counts_on_shared_data(monkeypatch, name):
    monkeypatch.setenv("PAPERLIB_DATA", str(SHARED))
    (raw_counts, core_counts, n_titles) = EXPECTED[name]
    t0 = time.perf_counter()
    raw = load_interactions(name)
    s = dataset_stats(raw)
    assert (s.users, s.items, s.interactions) == raw_counts
    data = load_dataset(name)
    elapsed = time.perf_counter() - t0
    s = dataset_stats(data)
    assert (s.users, s.items, s.interactions) == core_counts
    assert data.max_len == (200 if name.startswith("ml") else 50)
    assert (None if data.titles is None else len(data.titles)) == n_titles
    assert elapsed < 20, f"loading {name} took {elapsed:.1f} s"
    if name == "amazon-beauty":
        # Beauty.txt numbers items by first appearance already, so the remap is the identity
        assert data.item_raw_ids[1:] == [str(i) for i in range(1, data.n_items + 1)]
        assert data.titles[1] == "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce"
        folder = SHARED / name
        joined = read_titles(
            "p5-datamaps+recbole-item",
            [(folder / "datamaps.json.gz", None), (folder / "Amazon_Beauty.item.gz", None)],
        )
        assert joined == load_titles(name)  # the download's title join equals the derived tsv
    if name == "ml-1m":
        # RecBole's prefix augmentation of ML-1M: 981,491 training pairs, all held by the windows
        assert count_pairs(data) == TrainLoader(data, 2048).n_pairs == 981_491
    if name == "ml-100k":
        # RecBole's order per user: user 196 (first line of u.data) against a stable pandas sort of
        # the timestamps as RecBole's torch.FloatTensor holds them (64 s steps), not the exact ones
        import torch

        ref = pd.read_csv(SHARED / name / "u.data", sep="\t", header=None, names=["u", "i", "r", "t"])
        ref = ref[ref.u == 196]
        ref = ref.assign(t32=torch.FloatTensor(ref.t.to_numpy(dtype=float)).double().numpy())
        ours = [data.item_raw_ids[i] for i in data.sequences[0]]
        assert data.user_raw_ids[0] == "196"
        assert ours == ref.sort_values("t32", kind="stable").i.astype(str).tolist()
        assert ours != ref.sort_values("t", kind="stable").i.astype(str).tolist()  # 64 s ties differ
