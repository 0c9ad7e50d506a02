"""Readers for the interaction and title files of every accepted format.

Interaction readers return a DataFrame with columns

* ``user`` (str): the dataset's own user id,
* ``item`` (str): the dataset's own item id,
* ``timestamp`` (int64 seconds, or float64 for RecBole files): only for formats that have one,

one row per interaction, users grouped in order of first appearance, each user's rows in time
order: RecBole's, where the format has a timestamp: a stable sort by the timestamp as RecBole holds it,
a float32 (:func:`recbole_time`), so ties keep file order, and on MovieLens ratings that round to the
same 64 s are ties too; file order otherwise (the community formats are written in time order). The
``timestamp`` column keeps the exact values.

Title readers return ``dict[str, str]``: raw item id -> title, items with an empty title left out.

Every reader raises :class:`DataError` naming the file, the line number and what was expected when
a line is malformed. Formats (``fmt`` keys):

================== ===========================================================================
ml1m-ratings       ML-1M ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp`` (latin-1)
ml100k-udata       ML-100K ``u.data``: ``user \\t item \\t rating \\t timestamp``
amazon-reviews     Amazon 2014 ``reviews_*_5.json.gz``: one JSON object (or Python dict literal)
                   a line with ``reviewerID``, ``asin``, ``unixReviewTime``
sasrec-pairs       SASRec: ``user item`` a line, each user's lines in time order
user-sequences     S3-Rec/ICLRec/P5: ``user item item ...`` a line, items in time order
recbole-inter      RecBole atomic ``.inter``: header ``user_id:token\\titem_id:token\\t...``
                   (``timestamp:float`` optional), tab-separated
ml1m-movies        ML-1M ``movies.dat``: ``MovieID::Title::Genres`` (latin-1)
ml100k-uitem       ML-100K ``u.item``: ``id|title|release|video release|URL|19 flags`` (latin-1)
amazon-meta        Amazon 2014 ``meta_*.json.gz``: one dict a line with ``asin`` and ``title``
beauty-titles-tsv  derived ``beauty_item_titles.tsv``: header ``item_id\\tasin\\ttitle``
recbole-item       RecBole atomic ``.item``: header with ``item_id:token`` and a ``*title*`` field
p5-datamaps+recbole-item  P5 ``datamaps.json`` (``id2item``: id -> ASIN) joined with a RecBole
                   ``.item`` file (ASIN -> title): id -> title
================== ===========================================================================
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .sequences import DataError

__all__ = [
    "INTERACTION_READERS",
    "TITLE_READERS",
    "read_bytes",
    "read_interactions",
    "read_titles",
    "parse_interactions",
    "chronological",
    "recbole_time",
]

GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------------------------
# Raw bytes


def read_bytes(path: str | Path, member: str | None = None) -> bytes:
    """The decompressed content of ``path`` (gzip detected by its magic bytes) or of a zip member."""
    path = Path(path)
    try:
        if member is not None:
            with zipfile.ZipFile(path) as zf:
                try:
                    data = zf.read(member)
                except KeyError:
                    names = ", ".join(zf.namelist()[:10])
                    raise DataError(
                        f"{path}: the archive has no member {member!r} (it has: {names} ...). "
                        "Use the official archive or put the extracted file next to it."
                    ) from None
        else:
            data = path.read_bytes()
            if data[:2] == GZIP_MAGIC:
                data = gzip.decompress(data)
    except (zipfile.BadZipFile, gzip.BadGzipFile, EOFError) as err:
        raise DataError(f"{path}: damaged archive ({err}); delete it and download it again") from err
    return data


def _decode(data: bytes, encoding: str, where: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{where}, line {line}: not {encoding} text ({err.reason}); is this the right file?") from err


def _lines(text: str, first: int = 1):
    """(line number, line) for the non-blank lines; '\\n' only, since latin-1 text may hold \\x85."""
    for n, line in enumerate(text.split("\n"), start=first):
        line = line.rstrip("\r")
        if line.strip():
            yield n, line


def _bad_line(where: str, n: int, line: str, problem: str, expected: str) -> DataError:
    shown = line if len(line) <= 160 else line[:160] + "..."
    return DataError(
        f"{where}, line {n}: {problem}; expected {expected}. Got {shown!r}. "
        "Fix or delete the line, or replace the file with the original."
    )


# --------------------------------------------------------------------------------------------
# Tables: a fast pandas parse, with a line-by-line parse that finds the first bad line


_KINDS = {"tok", "int", "num", "any"}  # non-empty token / integer / number / anything


def _check_field(value: str, kind: str) -> str | None:
    if kind == "any":
        return None
    if value == "" or value.strip() != value:
        return "empty field" if value.strip() == "" else "stray whitespace in a field"
    if kind == "int":
        try:
            int(value)
        except ValueError:
            return f"{value!r} is not an integer"
    elif kind == "num":
        try:
            float(value)
        except ValueError:
            return f"{value!r} is not a number"
    return None


def _split(line: str, sep: str) -> list[str]:
    return line.split() if sep == "ws" else line.split(sep)


def _parse_table_slow(text: str, where: str, sep: str, kinds: Sequence[str], expected: str, first: int) -> pd.DataFrame:
    rows: list[list[str]] = []
    for n, line in _lines(text, first):
        parts = _split(line, sep)
        if len(parts) != len(kinds):
            raise _bad_line(where, n, line, f"{len(parts)} fields instead of {len(kinds)}", expected)
        for value, kind in zip(parts, kinds):
            problem = _check_field(value, kind)
            if problem:
                raise _bad_line(where, n, line, problem, expected)
        rows.append(parts)
    return pd.DataFrame(rows, columns=range(len(kinds)), dtype=str)


def _parse_table(text: str, where: str, sep: str, kinds: Sequence[str], expected: str, first: int = 1) -> pd.DataFrame:
    """Parse a delimited table into string columns ``0..len(kinds)-1``, validating each field.

    ``sep`` is a separator string or ``"ws"`` (runs of whitespace). The C parser does the work;
    anything it rejects or that fails validation is re-parsed line by line, which either finds the
    first bad line (DataError with its number) or accepts the file.
    """
    assert set(kinds) <= _KINDS
    if not any(True for _ in _lines(text, first)):
        raise DataError(f"{where}: no data lines; expected {expected}")
    body, psep = text, sep
    if sep == "::":  # a multi-character separator forces pandas' slow python engine
        body, psep = text.replace("::", "\t"), "\t"
    try:
        df = pd.read_csv(
            io.StringIO(body),
            sep=r"\s+" if sep == "ws" else psep,
            header=None,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            quoting=csv.QUOTE_NONE,
            engine="c",
        )
        ok = df.shape[1] == len(kinds) and not df.isna().to_numpy().any()
        for col, kind in enumerate(kinds):
            if not ok:
                break
            values = df[col]
            if kind == "tok":
                ok = not (values == "").any()
            elif kind == "int":
                ok = bool(values.str.fullmatch(r"[+-]?\d+").all())
            elif kind == "num":
                ok = not pd.to_numeric(values, errors="coerce").isna().any()
        if ok:
            df.columns = range(len(kinds))
            return df
    except (pd.errors.ParserError, ValueError):
        pass
    return _parse_table_slow(text, where, sep, kinds, expected, first)


# --------------------------------------------------------------------------------------------
# Interaction readers


def recbole_time(ts: np.ndarray) -> np.ndarray:
    """Timestamps as RecBole 1.2 sorts them: its ``timestamp:float`` field becomes a
    ``torch.FloatTensor`` (float32, 24-bit mantissa), so Unix times of 2^29–2^30 s (Jan 1987 to
    Jan 2004: MovieLens 100K and 1M) are rounded to multiples of 64 s, and RecBole's stable sort by
    (user, time) keeps file order among ratings that round alike. Whole days (Amazon's review
    times) stay exact. Returned as float64 values.

    This is RecBole's order, not strict time order: the published Mamba4Rec figures were trained
    and tested on it (the tie probe, ``paperlib.studies.quality_ties``, measures what it changes)."""
    return np.asarray(ts, dtype=np.float64).astype(np.float32).astype(np.float64)


def chronological(df: pd.DataFrame, key: np.ndarray | None = None) -> pd.DataFrame:
    """Group users in order of first appearance; within a user, stable-sort by ``key`` (default: the
    ``timestamp`` column, if present)."""
    ucode = pd.factorize(df["user"])[0]
    if key is None and "timestamp" in df.columns:
        key = df["timestamp"].to_numpy()
    if key is not None:
        order = np.argsort(key, kind="stable")
        order = order[np.argsort(ucode[order], kind="stable")]
    else:
        order = np.argsort(ucode, kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return df.reset_index(drop=True)
    return df.iloc[order].reset_index(drop=True)


def _frame(user, item, timestamp=None) -> pd.DataFrame:
    """Rows in RecBole's order (see the module doc); the exact timestamps are kept."""
    cols = {"user": pd.Series(user, dtype=str), "item": pd.Series(item, dtype=str)}
    if timestamp is not None:
        cols["timestamp"] = pd.Series(timestamp)
    return chronological(pd.DataFrame(cols), None if timestamp is None else recbole_time(timestamp))


def _parse_ml1m_ratings(text: str, where: str) -> pd.DataFrame:
    df = _parse_table(
        text, where, "::", ("int", "int", "num", "int"), "'UserID::MovieID::Rating::Timestamp' with integer ids"
    )
    return _frame(df[0].to_numpy(), df[1].to_numpy(), df[3].astype("int64").to_numpy())


def _parse_ml100k_udata(text: str, where: str) -> pd.DataFrame:
    df = _parse_table(
        text, where, "\t", ("int", "int", "num", "int"), "'user<TAB>item<TAB>rating<TAB>timestamp' with integer ids"
    )
    return _frame(df[0].to_numpy(), df[1].to_numpy(), df[3].astype("int64").to_numpy())


def _parse_sasrec_pairs(text: str, where: str) -> pd.DataFrame:
    df = _parse_table(text, where, "ws", ("tok", "tok"), "'user item' (two ids separated by a space)")
    return _frame(df[0].to_numpy(), df[1].to_numpy())


def _parse_user_sequences(text: str, where: str) -> pd.DataFrame:
    users: list[str] = []
    items: list[str] = []
    for n, line in _lines(text):
        parts = line.split()
        if len(parts) < 2:
            raise _bad_line(where, n, line, "a user without items", "'user item item ...' (a user id then its items)")
        users.extend([parts[0]] * (len(parts) - 1))
        items.extend(parts[1:])
    if not users:
        raise DataError(f"{where}: no data lines; expected 'user item item ...' lines")
    return _frame(users, items)


def _load_record(line: str):
    """A JSON object, or the Python dict literal of the 2014 Amazon dumps (read without eval)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None


def _parse_amazon_reviews(text: str, where: str) -> pd.DataFrame:
    expected = "one JSON object a line with 'reviewerID', 'asin' and 'unixReviewTime'"
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    for n, line in _lines(text):
        rec = _load_record(line)
        if not isinstance(rec, dict):
            raise _bad_line(where, n, line, "not a JSON object", expected)
        missing = [k for k in ("reviewerID", "asin", "unixReviewTime") if k not in rec]
        if missing:
            raise _bad_line(where, n, line, f"missing {', '.join(missing)}", expected)
        try:
            times.append(int(rec["unixReviewTime"]))
        except (TypeError, ValueError):
            raise _bad_line(where, n, line, "unixReviewTime is not an integer", expected) from None
        users.append(str(rec["reviewerID"]))
        items.append(str(rec["asin"]))
    if not users:
        raise DataError(f"{where}: no data lines; expected {expected}")
    return _frame(users, items, np.array(times, dtype=np.int64))


def _recbole_header(text: str, where: str) -> tuple[list[str], str]:
    head, _, body = text.partition("\n")
    head = head.rstrip("\r")
    fields = head.split("\t")
    if not head.strip() or not all(":" in f for f in fields):
        raise _bad_line(
            where, 1, head, "not a RecBole header", "tab-separated 'name:type' fields, e.g. 'user_id:token<TAB>item_id:token'"
        )
    return [f.split(":", 1)[0] for f in fields], body


def _parse_recbole_inter(text: str, where: str) -> pd.DataFrame:
    names, body = _recbole_header(text, where)
    for need in ("user_id", "item_id"):
        if need not in names:
            raise DataError(f"{where}, line 1: the header has no {need!r} field (fields: {names}); RecBole .inter files need user_id and item_id")
    kinds = ["any"] * len(names)
    kinds[names.index("user_id")] = kinds[names.index("item_id")] = "tok"
    if "timestamp" in names:
        kinds[names.index("timestamp")] = "num"
    expected = f"{len(names)} tab-separated fields ({', '.join(names)})"
    df = _parse_table(body, where, "\t", kinds, expected, first=2)
    ts = df[names.index("timestamp")].astype("float64").to_numpy() if "timestamp" in names else None
    return _frame(df[names.index("user_id")].to_numpy(), df[names.index("item_id")].to_numpy(), ts)


# --------------------------------------------------------------------------------------------
# Title readers


def _parse_ml1m_movies(text: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, line in _lines(text):
        parts = line.split("::")
        if len(parts) < 3 or not parts[0].strip().isdigit():
            raise _bad_line(where, n, line, "not 'id::title::genres'", "'MovieID::Title::Genres' with an integer id")
        title = "::".join(parts[1:-1]).strip()
        if title:
            out[parts[0].strip()] = title
    return out


def _parse_ml100k_uitem(text: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, line in _lines(text):
        parts = line.split("|")
        if len(parts) < 2 or not parts[0].strip().isdigit():
            raise _bad_line(where, n, line, "not 'id|title|...'", "'movie id|title|release date|...' with an integer id")
        if parts[1].strip():
            out[parts[0].strip()] = parts[1].strip()
    return out


def _parse_amazon_meta(text: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, line in _lines(text):
        rec = _load_record(line)
        if not isinstance(rec, dict) or "asin" not in rec:
            raise _bad_line(where, n, line, "not an object with 'asin'", "one JSON object (or Python dict) a line with 'asin' and 'title'")
        title = str(rec.get("title") or "").strip()
        if title:
            out[str(rec["asin"])] = title
    return out


def _parse_beauty_titles(text: str, where: str) -> dict[str, str]:
    expected = "'item_id<TAB>asin<TAB>title' after the header line"
    out: dict[str, str] = {}
    for n, line in _lines(text):
        parts = line.split("\t")
        if n == 1 and parts[:1] == ["item_id"]:
            continue
        if len(parts) != 3 or not parts[0]:
            raise _bad_line(where, n, line, f"{len(parts)} fields instead of 3", expected)
        if parts[2].strip():
            out[parts[0]] = parts[2].strip()
    return out


def _parse_recbole_item(text: str, where: str) -> dict[str, str]:
    # RecBole reads atomic files with pandas' default CSV quoting, and real .item files hold quoted
    # titles with newlines inside (Amazon_Beauty.item), hence the csv module, not line splitting.
    names, body = _recbole_header(text, where)
    titles = [i for i, name in enumerate(names) if "title" in name]
    if "item_id" not in names or not titles:
        raise DataError(f"{where}, line 1: a RecBole .item header needs item_id and a title field (fields: {names})")
    iid, tid = names.index("item_id"), titles[0]
    out: dict[str, str] = {}
    reader = csv.reader(io.StringIO(body, newline=""), delimiter="\t")
    start = 2
    try:
        for parts in reader:
            n, start = start, reader.line_num + 2  # the record's first line; the header is line 1
            if not parts or not "".join(parts).strip():
                continue
            if len(parts) != len(names) or not parts[iid]:
                line = "\t".join(parts)
                raise _bad_line(where, n, line, f"{len(parts)} fields instead of {len(names)}", f"tab-separated {', '.join(names)}")
            # line breaks and tabs inside a quoted title become spaces, as in the derived tsv
            title = parts[tid].replace("\r\n", " ").replace("\n", " ").replace("\t", " ").strip()
            if title:
                out[parts[iid]] = title
    except csv.Error as err:
        raise DataError(f"{where}, line {start}: {err}; expected tab-separated {', '.join(names)}") from err
    return out


def _parse_p5_datamaps(text: str, where: str) -> dict[str, str]:
    """P5 ``datamaps.json``: the ``id2item`` map (dataset id -> ASIN)."""
    try:
        maps = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}, line {err.lineno}: not valid JSON ({err.msg}); expected P5's datamaps.json") from err
    if not isinstance(maps, dict) or not isinstance(maps.get("id2item"), dict):
        raise DataError(f"{where}: no 'id2item' map; expected P5's datamaps.json (id2item, item2id, user2id, ...)")
    return {str(k): str(v) for k, v in maps["id2item"].items()}


# --------------------------------------------------------------------------------------------
# Registry of formats


@dataclass(frozen=True)
class Reader:
    """A parser of decoded text and the text encoding of its files."""

    encoding: str
    parse: Callable[[str, str], object]


INTERACTION_READERS: dict[str, Reader] = {
    "ml1m-ratings": Reader("latin-1", _parse_ml1m_ratings),
    "ml100k-udata": Reader("latin-1", _parse_ml100k_udata),
    "amazon-reviews": Reader("utf-8", _parse_amazon_reviews),
    "sasrec-pairs": Reader("utf-8", _parse_sasrec_pairs),
    "user-sequences": Reader("utf-8", _parse_user_sequences),
    "recbole-inter": Reader("utf-8", _parse_recbole_inter),
}

TITLE_READERS: dict[str, Reader] = {
    "ml1m-movies": Reader("latin-1", _parse_ml1m_movies),
    "ml100k-uitem": Reader("latin-1", _parse_ml100k_uitem),
    "amazon-meta": Reader("utf-8", _parse_amazon_meta),
    "beauty-titles-tsv": Reader("utf-8", _parse_beauty_titles),
    "recbole-item": Reader("utf-8", _parse_recbole_item),
    "p5-datamaps": Reader("utf-8", _parse_p5_datamaps),
}


def _where(path: str | Path, member: str | None) -> str:
    return f"{path}:{member}" if member else str(path)


def parse_interactions(data: bytes, fmt: str, where: str) -> pd.DataFrame:
    """Parse the decompressed bytes of an interactions file of format ``fmt`` (see module doc)."""
    if fmt not in INTERACTION_READERS:
        raise DataError(f"unknown interactions format {fmt!r}; known: {', '.join(INTERACTION_READERS)}")
    reader = INTERACTION_READERS[fmt]
    return reader.parse(_decode(data, reader.encoding, where), where)  # type: ignore[return-value]


def read_interactions(path: str | Path, fmt: str, member: str | None = None) -> pd.DataFrame:
    """Read an interactions file (plain, gzipped or a zip ``member``) into ``user, item[, timestamp]``."""
    return parse_interactions(read_bytes(path, member), fmt, _where(path, member))


def parse_titles(data: bytes, fmt: str, where: str) -> dict[str, str]:
    """Parse the decompressed bytes of a one-file title source of format ``fmt``."""
    if fmt not in TITLE_READERS:
        raise DataError(f"unknown titles format {fmt!r}; known: {', '.join(TITLE_READERS)}")
    reader = TITLE_READERS[fmt]
    return reader.parse(_decode(data, reader.encoding, where), where)  # type: ignore[return-value]


def read_titles(fmt: str, files: Sequence[tuple[str | Path, str | None]]) -> dict[str, str]:
    """Read item titles (raw item id -> title) from the ``(path, zip member or None)`` files of a source.

    ``fmt`` is a key of ``TITLE_READERS`` (one file) or ``"p5-datamaps+recbole-item"`` (two files:
    ``datamaps.json`` then the RecBole ``.item`` file keyed by ASIN).
    """
    if fmt == "p5-datamaps+recbole-item":
        if len(files) != 2:
            raise DataError(f"{fmt} needs two files (datamaps.json, .item), got {len(files)}")
        (p1, m1), (p2, m2) = files
        id2asin = parse_titles(read_bytes(p1, m1), "p5-datamaps", _where(p1, m1))
        asin2title = parse_titles(read_bytes(p2, m2), "recbole-item", _where(p2, m2))
        return {i: asin2title[a] for i, a in id2asin.items() if asin2title.get(a)}
    if len(files) != 1:
        raise DataError(f"titles format {fmt!r} reads one file, got {len(files)}")
    (path, member), = files
    return parse_titles(read_bytes(path, member), fmt, _where(path, member))
