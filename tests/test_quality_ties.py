"""The tie probe: counting same-second ratings, the four orders, paired differences, and a smoke
run on real ML-1M users (timestamps made up for the test, consistent with the copy's order)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from paperlib.data.sequences import DataError
from paperlib.studies import quality_ties as q


def frame(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def test_tie_report_counts_ties_and_sees_one_global_order():
    # three users; the same-second groups always list movies a < b < c, as one global order would
    rows = [("u1", "a", 1), ("u1", "b", 1), ("u1", "c", 1), ("u1", "d", 2), ("u1", "e", 3),
            ("u2", "x", 1), ("u2", "a", 5), ("u2", "b", 5), ("u2", "c", 5),
            ("u3", "a", 7), ("u3", "c", 7), ("u3", "b", 8), ("u3", "y", 8)]
    rep = q.tie_report(frame(rows), min_users=2)
    # consecutive pairs: u1 4 (2 tied), u2 3 (2 tied), u3 3 (2 tied)
    assert rep["tied_consecutive"] == pytest.approx(6 / 10)
    assert rep["users"] == 3 and rep["interactions"] == 13
    assert rep["test_tied"] == pytest.approx(2 / 3)  # u2 (b, c) and u3 (b, y) end in a tie
    # pairs tied in >= 2 users: (a,b) 2×, (a,c) 3×, (b,c) 2×; all in one order
    assert rep["pairs"] == 3 and rep["order_consistency"] == 1.0
    # reversing one user's group breaks the global order
    flipped = rows[:]
    flipped[6:9] = [("u2", "c", 5), ("u2", "b", 5), ("u2", "a", 5)]
    assert q.tie_report(frame(flipped), min_users=2)["order_consistency"] < 1.0


def test_orders_keep_each_users_items_and_time():
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{rng.integers(10**6)}", t // 4) for u in range(5) for t in range(40)]
    df = frame(rows)
    file = q.ordered(df, "file")
    assert file[["user", "item"]].equals(df[["user", "item"]])
    shuffled = q.ordered(df, "shuffled", seed=1)
    ts = dict(zip(zip(df["user"], df["item"]), df["timestamp"]))
    for u, g in shuffled.groupby("user", sort=False):
        stamps = [ts[(u, i)] for i in g["item"]]
        assert stamps == sorted(stamps), "ties are shuffled, time order is kept"
        assert sorted(g["item"]) == sorted(df.loc[df["user"] == u, "item"])
    assert not shuffled["item"].equals(file["item"]), "groups of four are reordered"
    assert q.ordered(df, "shuffled", seed=1).equals(shuffled), "seeded"


def test_recbole_order_ties_ratings_that_round_alike_in_float32():
    # the file lists b (978300790) before a (978300775); RecBole's float32 makes both 978300800
    df = frame([("u1", "x", 978300700), ("u1", "b", 978300790), ("u1", "a", 978300775), ("u1", "c", 978300900),
                ("u2", "y", 978300775), ("u2", "z", 978300760)])
    assert q.ordered(df, "recbole")["item"].tolist() == ["x", "b", "a", "c", "z", "y"]
    assert q.ordered(df, "file")["item"].tolist() == ["x", "a", "b", "c", "z", "y"]
    rep = q.tie_report(df)
    assert rep["tied_consecutive"] == 0.0  # no two ratings share their exact second
    assert rep["tied_consecutive_recbole"] == pytest.approx(1 / 4)  # (a, b) of u1's 3 pairs and u2's 1
    assert rep["moved_recbole"] == pytest.approx(2 / 6) and rep["test_moved_recbole"] == 0.0
    # a frame read by read_timed is already in RecBole's order: ordering it again changes nothing
    assert q.ordered(df.iloc[[0, 1, 2, 3, 5, 4]], "recbole")["item"].tolist() == ["x", "b", "a", "c", "z", "y"]


def test_copy_order_drops_users_whose_items_differ():
    df = frame([("1", "a", 1), ("1", "b", 1), ("2", "c", 1), ("2", "d", 2), ("3", "f", 1), ("3", "g", 2)])
    copy = pd.DataFrame({"user": ["1", "1", "2", "2", "3", "3"], "item": ["b", "a", "c", "e", "g", "f"]})
    out = q.ordered(df, "copy", copy)
    # user 2: other items; user 3: the copy puts g (second 2) before f (second 1)
    assert out.values.tolist() == [["1", "b"], ["1", "a"]] and out.attrs["dropped"] == 2
    with pytest.raises(DataError, match="needs the copy"):
        q.ordered(df, "copy")
    with pytest.raises(DataError, match="unknown variant"):
        q.ordered(df, "random")


def test_a_file_without_timestamps_is_refused(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text("user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(DataError, match="no timestamp field"):
        q.read_timed(path)
    with pytest.raises(DataError, match="give 'inter'"):
        q.TieProbeParams()


def test_cli_reports_a_bad_file(tmp_path, capsys):
    from paperlib.cli import main

    path = tmp_path / "x.inter"
    path.write_text("user_id:token\titem_id:token\n1\t2\n")
    assert main(["ties", str(path)]) == 2
    assert "no timestamp field" in capsys.readouterr().err
    assert main(["ties", str(tmp_path / "missing.inter")]) == 2
    timed = tmp_path / "t.inter"
    timed.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n")
    assert main(["ties", str(timed), "--orders", "recbole", "exact"]) == 2
    assert "variants must be a non-empty subset" in capsys.readouterr().err


def test_cli_passes_the_chosen_orders(tmp_path, monkeypatch):
    from paperlib.cli import main

    seen = {}

    def fake_compute(cfg, progress=True):
        seen["cfg"] = cfg
        raise q.DataError("stop here")

    monkeypatch.setattr(q, "compute", fake_compute)
    assert main(["ties", str(tmp_path / "x.inter"), "--orders", "recbole", "copy", "--seeds", "1", "2"]) == 2
    assert seen["cfg"].variants == ("recbole", "copy") and seen["cfg"].seeds == (1, 2)
    main(["ties", str(tmp_path / "x.inter")])
    assert seen["cfg"].variants == q.VARIANTS


def test_tie_agreement_of_two_orders():
    df = frame([("1", "a", 1), ("1", "b", 1), ("1", "c", 1), ("1", "d", 2), ("2", "e", 1), ("2", "f", 1)])
    same = df[["user", "item"]]
    assert q.tie_agreement(df, same) == 1.0
    reverse = pd.DataFrame({"user": ["1"] * 4 + ["2"] * 2, "item": ["c", "b", "a", "d", "f", "e"]})
    assert q.tie_agreement(df, reverse) == 0.0
    half = pd.DataFrame({"user": ["1"] * 4 + ["2"] * 2, "item": ["b", "a", "c", "d", "e", "f"]})
    assert q.tie_agreement(df, half) == pytest.approx(3 / 4)  # (a,b) reversed of a-b, a-c, b-c, e-f


def test_paired_difference_is_per_user():
    def run(v, ranks):
        return {"variant": v, "seed": 1, "user_ids": ["1", "2", "3"], "test_ranks": ranks}
    doc = {"results": {"runs": [run("file", [1, 3, 50]), run("copy", [1, 50, 50])]}}
    d = q.paired(doc, "file", "copy")
    assert d["n"] == 3 and d["mean"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert q.paired(doc, "file", "shuffled")["n"] == 0


def test_probe_smoke_on_real_ml1m_users(real_data, tmp_path):
    from paperlib.data.process import load_interactions

    copy = load_interactions("ml-1m")
    users = copy["user"].drop_duplicates().iloc[:40]
    part = copy[copy["user"].isin(users)].copy()
    part["timestamp"] = part.groupby("user").cumcount() // 3  # ties of three, in the copy's order
    path = tmp_path / "ml-1m.inter"
    with open(path, "w") as fh:
        fh.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, i, t in part[["user", "item", "timestamp"]].itertuples(index=False):
            fh.write(f"{u}\t{i}\t{t}\n")
    cfg = q.TieProbeParams(inter=str(path), epochs=1, output_dir=str(tmp_path / "out"))
    doc = q.compute(cfg, progress=False)
    runs = {r["variant"]: r for r in doc["results"]["runs"]}
    assert set(runs) == {"recbole", "file", "copy", "shuffled"} and doc["results"]["source"]["users"] == 40
    # the file was written in the copy's order, with small timestamps that float32 holds exactly, so
    # those three orders are the same data
    assert runs["file"]["test_ranks"] == runs["copy"]["test_ranks"] == runs["recbole"]["test_ranks"]
    assert q.paired(doc, "file", "copy") == {"mean": 0.0, "se": 0.0, "n": 40}
    assert doc["results"]["report"]["tied_consecutive"] > 0.5
    assert doc["results"]["report"]["copy_agreement"] == 1.0  # the file was written in the copy's order
    assert q.load(str(tmp_path / "out"))["results"] == doc["results"]
    text = q.summary(doc)
    assert "40 users" in text and "file − shuffled" in text
    assert list(q.table(doc).index) == ["recbole", "file", "copy", "shuffled"]
    assert "0% of the positions hold another item" in text
    # beside the full-length run, the summary puts the probe's difference next to the published gap
    full = {"results": {"runs": [{"dataset": "ml-1m", "label": "Mamba4Rec", "test": {"ndcg@10": 0.1}}]}}
    assert "the published figure 0.1822 is +82% above it" in q.summary(doc, full)
