"""Readers of every accepted format, on small files written in tmp_path; malformed lines."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from paperlib.data import DataError, read_interactions, read_titles
from paperlib.data.readers import INTERACTION_READERS, TITLE_READERS


def write(path: Path, text: str, encoding: str = "utf-8", gz: bool = False) -> Path:
    data = text.encode(encoding)
    if gz:
        path = path.with_name(path.name + ".gz") if not path.name.endswith(".gz") else path
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def rows(df: pd.DataFrame) -> list[tuple]:
    return [tuple(r) for r in df.itertuples(index=False)]


# --------------------------------------------------------------------------------------------
# Interactions: official formats


def test_ml1m_ratings_sorted_per_user_stably(tmp_path):
    # user 2 appears first; user 1's two ratings at t=50 keep file order (RecBole's stable sort)
    text = "2::20::5::300\n1::10::3::100\n1::11::4::50\n1::12::4::50\n2::21::1::200\n"
    df = read_interactions(write(tmp_path / "ratings.dat", text, "latin-1"), "ml1m-ratings")
    assert list(df.columns) == ["user", "item", "timestamp"]
    assert df["user"].dtype == "str" and df["item"].dtype == "str" and df["timestamp"].dtype == "int64"
    assert rows(df) == [("2", "21", 200), ("2", "20", 300), ("1", "11", 50), ("1", "12", 50), ("1", "10", 100)]


def test_ml1m_ratings_in_recbole_order(tmp_path):
    # 978300790 and 978300775 are one float32 (978300800) in RecBole: file order, not time order
    text = "1::10::3::978300790\n1::11::4::978300775\n1::12::4::978300760\n"
    df = read_interactions(write(tmp_path / "ratings.dat", text, "latin-1"), "ml1m-ratings")
    assert rows(df) == [("1", "12", 978300760), ("1", "10", 978300790), ("1", "11", 978300775)]


@pytest.mark.parametrize("gz", [False, True])
def test_ml100k_udata_plain_and_gz(tmp_path, gz):
    text = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n"
    df = read_interactions(write(tmp_path / "u.data", text, gz=gz), "ml100k-udata")
    assert rows(df) == [("196", "377", 878887116), ("196", "242", 881250949), ("186", "302", 891717742)]


def test_zip_member(tmp_path):
    path = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
        zf.writestr("ml-1m/movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n")
    df = read_interactions(path, "ml1m-ratings", member="ml-1m/ratings.dat")
    assert rows(df) == [("1", "1193", 978300760), ("1", "661", 978302109)]
    assert read_titles("ml1m-movies", [(path, "ml-1m/movies.dat")]) == {"1193": "One Flew Over the Cuckoo's Nest (1975)"}
    with pytest.raises(DataError, match="no member 'ml-1m/users.dat'"):
        read_interactions(path, "ml1m-ratings", member="ml-1m/users.dat")


def test_amazon_reviews_json_and_dict_literals(tmp_path):
    lines = [
        json.dumps({"reviewerID": "A2", "asin": "B01", "overall": 5.0, "unixReviewTime": 1400000000}),
        # the 2014 dumps also come as Python dict literals (single quotes), read with ast.literal_eval
        "{'reviewerID': 'A1', 'asin': 'B02', 'reviewText': \"it's fine\", 'unixReviewTime': 1300000000}",
        json.dumps({"reviewerID": "A1", "asin": "B01", "unixReviewTime": 1200000000}),
    ]
    path = write(tmp_path / "reviews_Beauty_5.json", "\n".join(lines) + "\n", gz=True)
    df = read_interactions(path, "amazon-reviews")
    assert rows(df) == [("A2", "B01", 1400000000), ("A1", "B01", 1200000000), ("A1", "B02", 1300000000)]


# --------------------------------------------------------------------------------------------
# Interactions: community and RecBole formats


def test_sasrec_pairs_keep_file_order_and_group_users(tmp_path):
    # interleaved users are grouped; within a user the file order (= time order) is kept
    text = "1 5\n2 7\n1 3\r\n1 5\n\n2 1\n"
    df = read_interactions(write(tmp_path / "Video.txt", text), "sasrec-pairs")
    assert list(df.columns) == ["user", "item"]
    assert rows(df) == [("1", "5"), ("1", "3"), ("1", "5"), ("2", "7"), ("2", "1")]


def test_user_sequences(tmp_path):
    df = read_interactions(write(tmp_path / "Beauty.txt", "1 1 2 3\n2 4 2\n", gz=True), "user-sequences")
    assert rows(df) == [("1", "1"), ("1", "2"), ("1", "3"), ("2", "4"), ("2", "2")]


def test_recbole_inter(tmp_path):
    text = (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ti9\t4\t20.5\nu2\ti8\t3\t5\nu1\ti7\t5\t10\n"
    )
    df = read_interactions(write(tmp_path / "ml-1m.inter", text), "recbole-inter")
    assert rows(df) == [("u1", "i7", 10.0), ("u1", "i9", 20.5), ("u2", "i8", 5.0)]
    no_time = read_interactions(write(tmp_path / "x.inter", "item_id:token\tuser_id:token\na\tu\nb\tu\n"), "recbole-inter")
    assert rows(no_time) == [("u", "a"), ("u", "b")]


def test_recbole_inter_is_sorted_as_recbole_sorts_it(tmp_path):
    """RecBole holds ``timestamp:float`` as float32: 978300775 and 978300790 both become 978300800,
    a tie that keeps file order although the second rating is 15 s earlier; 978300760 (→ 978300736)
    stays before them. The exact timestamps are returned."""
    import numpy as np
    import torch

    from paperlib.data.readers import recbole_time

    text = ("user_id:token\titem_id:token\ttimestamp:float\n"
            "u1\tlate\t978300790\nu1\tearly\t978300775\nu1\tfirst\t978300760\nu1\tlast\t978300850\n")
    df = read_interactions(write(tmp_path / "ml-1m.inter", text), "recbole-inter")
    assert rows(df) == [("u1", "first", 978300760.0), ("u1", "late", 978300790.0), ("u1", "early", 978300775.0),
                        ("u1", "last", 978300850.0)]
    ts = np.array([956703932, 978300760, 978300775, 1046454590, 1_300_000_000, 17.5], dtype=np.float64)
    assert recbole_time(ts).tolist() == torch.FloatTensor(ts).double().tolist()  # RecBole's conversion
    assert recbole_time(ts)[2] == 978300800.0 and recbole_time(ts)[-1] == 17.5
    days = np.arange(10_957, 16_437, dtype=np.float64) * 86_400  # every day of 2000-2014 (Amazon 2014)
    assert (recbole_time(days) == days).all(), "whole days keep their exact order"


# --------------------------------------------------------------------------------------------
# Titles


def test_title_readers(tmp_path):
    movies = write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation\n2::Café Society: A Film (1995)::Drama\n", "latin-1")
    assert read_titles("ml1m-movies", [(movies, None)]) == {"1": "Toy Story (1995)", "2": "Café Society: A Film (1995)"}

    uitem = write(tmp_path / "u.item", "1|Toy Story (1995)|01-Jan-1995||http://x|0|0\n267|unknown||||1|0\n", "latin-1")
    assert read_titles("ml100k-uitem", [(uitem, None)]) == {"1": "Toy Story (1995)", "267": "unknown"}

    meta = write(
        tmp_path / "meta_Beauty.json",
        "{'asin': 'B01', 'title': 'Nail Polish', 'price': 3.0}\n{'asin': 'B02', 'categories': [['Beauty']]}\n"
        + json.dumps({"asin": "B03", "title": "Shampoo &amp; Co"})
        + "\n",
        gz=True,
    )
    assert read_titles("amazon-meta", [(meta, None)]) == {"B01": "Nail Polish", "B03": "Shampoo &amp; Co"}

    tsv = write(tmp_path / "beauty_item_titles.tsv", "item_id\tasin\ttitle\n1\tB01\tNail Polish\n2\tB02\t\n", gz=True)
    assert read_titles("beauty-titles-tsv", [(tsv, None)]) == {"1": "Nail Polish"}  # empty titles left out

    # RecBole .item: quoted title with a newline inside (as in the real Amazon_Beauty.item)
    item = write(
        tmp_path / "Amazon_Beauty.item",
        'item_id:token\ttitle:token\tbrand:token\nB01\tNail Polish\tOPI\nB02\t"Neem Cream 2 oz \nVanilla"\tX\nB03\t\tY\n',
    )
    assert read_titles("recbole-item", [(item, None)]) == {"B01": "Nail Polish", "B02": "Neem Cream 2 oz  Vanilla"}

    datamaps = write(tmp_path / "datamaps.json", json.dumps({"id2item": {"1": "B01", "2": "B02", "3": "B03"}}))
    joined = read_titles("p5-datamaps+recbole-item", [(datamaps, None), (item, None)])
    assert joined == {"1": "Nail Polish", "2": "Neem Cream 2 oz  Vanilla"}


# --------------------------------------------------------------------------------------------
# Malformed input: the message names the file, the line number and what was expected

BAD = [
    ("ml1m-ratings", "ratings.dat", "1::2::3::4\n1::2::3\n", 2, "UserID::MovieID::Rating::Timestamp"),
    ("ml1m-ratings", "ratings.dat", "1::2::3::4\n\n1::x::3::4\n", 3, "integer"),
    ("ml100k-udata", "u.data", "1\t2\t3\t4\n1\t2\t3\t4\t5\n", 2, "user<TAB>item<TAB>rating<TAB>timestamp"),
    ("ml100k-udata", "u.data", "1\t2\t3\tnoon\n", 1, "integer"),
    ("sasrec-pairs", "Video.txt", "1 2\n1 2 3\n1 4\n", 2, "'user item'"),
    ("sasrec-pairs", "Video.txt", "1 2\n3\n", 2, "'user item'"),
    ("user-sequences", "Beauty.txt", "1 2 3\n2\n", 2, "'user item item ...'"),
    ("amazon-reviews", "reviews_Beauty_5.json", '{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n{"reviewerID": "A"\n', 2, "reviewerID"),
    ("amazon-reviews", "reviews_Beauty_5.json", '{"reviewerID": "A", "asin": "B"}\n', 1, "unixReviewTime"),
    ("recbole-inter", "x.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\ti\n", 3, "3 tab-separated fields"),
    ("recbole-inter", "x.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ti\tyesterday\n", 2, "not a number"),
    ("recbole-inter", "x.inter", "user item\nu i\n", 1, "RecBole header"),
]


@pytest.mark.parametrize("fmt,name,text,line,expected", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
@pytest.mark.parametrize("gz", [False, True])
def test_malformed_interactions(tmp_path, fmt, name, text, line, expected, gz):
    path = write(tmp_path / name, text, gz=gz)
    with pytest.raises(DataError) as info:
        read_interactions(path, fmt)
    msg = str(info.value)
    assert str(path) in msg and f"line {line}:" in msg and "expected" in msg and expected in msg


BAD_TITLES = [
    ("ml1m-movies", "movies.dat", "1::Toy Story::Animation\nJumanji::Adventure\n", 2, "MovieID::Title::Genres"),
    ("ml100k-uitem", "u.item", "1|Toy Story|x\nno id here\n", 2, "movie id|title"),
    ("amazon-meta", "meta.json", "{'asin': 'B1', 'title': 'x'}\n{'title': 'no asin'}\n", 2, "asin"),
    ("beauty-titles-tsv", "titles.tsv", "item_id\tasin\ttitle\n1\tB1\tx\n2\tB2\n", 3, "item_id<TAB>asin<TAB>title"),
    ("recbole-item", "x.item", "item_id:token\ttitle:token\nB1\tx\nB2\n", 3, "item_id, title"),
]


@pytest.mark.parametrize("fmt,name,text,line,expected", BAD_TITLES, ids=[b[0] for b in BAD_TITLES])
def test_malformed_titles(tmp_path, fmt, name, text, line, expected):
    path = write(tmp_path / name, text, "latin-1" if fmt.startswith("ml") else "utf-8")
    with pytest.raises(DataError) as info:
        read_titles(fmt, [(path, None)])
    msg = str(info.value)
    assert str(path) in msg and f"line {line}:" in msg and expected in msg


def test_empty_file_and_bad_encoding(tmp_path):
    with pytest.raises(DataError, match="no data lines"):
        read_interactions(write(tmp_path / "u.data", "\n\n"), "ml100k-udata")
    bad = tmp_path / "Video.txt"
    bad.write_bytes(b"1 2\n1 \xff\n")
    with pytest.raises(DataError, match=r"line 2: not utf-8 text"):
        read_interactions(bad, "sasrec-pairs")
    broken = tmp_path / "Beauty.txt.gz"
    broken.write_bytes(gzip.compress(b"1 2 3\n" * 100)[:30])
    with pytest.raises(DataError, match="damaged archive"):
        read_interactions(broken, "user-sequences")


def test_unknown_format(tmp_path):
    path = write(tmp_path / "x.txt", "1 2\n")
    with pytest.raises(DataError, match="unknown interactions format 'csv'"):
        read_interactions(path, "csv")
    with pytest.raises(DataError, match="unknown titles format"):
        read_titles("csv", [(path, None)])


def test_registry_formats_have_readers():
    from paperlib.data import DATASETS

    for spec in DATASETS.values():
        for layout in spec.layouts:
            assert layout.interactions.fmt in INTERACTION_READERS
            for source in layout.titles:
                assert source.fmt in TITLE_READERS or source.fmt == "p5-datamaps+recbole-item"
                assert all(f.fmt in TITLE_READERS for f in source.files)
