"""From raw files to a :class:`SequentialData`: reading (cached), k-core filter, id remapping, statistics.

The processing is RecBole's, as Mamba4Rec uses it:

1. interactions in time order per user (``readers``);
2. iterative k-core on users and items (``user_inter_num_interval = item_inter_num_interval =
   [k, inf)``): drop every interaction of a user or an item with fewer than k interactions, recount,
   repeat until nothing changes. Repeated (user, item) pairs count as separate interactions, as in
   RecBole (none of the shipped datasets has any);
3. items renumbered ``1..n_items`` in order of first appearance (users grouped, time order), ``0``
   is padding; users keep their order of first appearance;
4. leave-one-out split and batches: ``sequences.SequentialData``.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import paths
from .download import DownloadError, Located, download_allowed, download_dataset, file_digest, get_spec, locate
from .readers import parse_interactions, read_bytes, read_titles
from .registry import FileSpec
from .sequences import DataError, SequentialData

__all__ = [
    "DatasetStats",
    "load_interactions",
    "load_titles",
    "kcore",
    "to_sequential",
    "load_dataset",
    "dataset_stats",
]


# --------------------------------------------------------------------------------------------
# Checksums of files found locally: a warning, not an error, since a user's own copy may differ in
# harmless ways (line endings); the counts then may not match the registry's figures.


def _git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _check_content(path: Path, spec: FileSpec, data: bytes) -> None:
    problems = []
    if spec.md5 and path.suffix == ".zip" and (got := file_digest(path, "md5")) != spec.md5:
        problems.append(f"md5 expected {spec.md5}, got {got}")
    if spec.sha256 and (got := hashlib.sha256(data).hexdigest()) != spec.sha256:
        problems.append(f"content sha256 expected {spec.sha256}, got {got}")
    if spec.git_blob and (got := _git_blob(data)) != spec.git_blob:
        problems.append(f"git blob expected {spec.git_blob}, got {got}")
    if problems:
        warnings.warn(
            f"{path}: not the reference copy of {spec.describe()} ({'; '.join(problems)}). It is read anyway; "
            "counts may differ from the registry's verified figures.",
            stacklevel=4,  # the caller of load_interactions / load_dataset
        )


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=8)
def _read_interactions_cached(stamp: tuple[str, int, int], spec: FileSpec) -> pd.DataFrame:
    # keyed by (path, mtime, size): a changed or different file is read again
    path = Path(stamp[0])
    data = read_bytes(path, spec.member)
    _check_content(path, spec, data)
    where = f"{path}:{spec.member}" if spec.member else str(path)
    return parse_interactions(data, spec.fmt, where)


@functools.lru_cache(maxsize=8)
def _read_titles_cached(fmt: str, files: tuple[tuple[tuple[str, int, int], FileSpec], ...]) -> dict[str, str]:
    return read_titles(fmt, [(stamp[0], spec.member) for stamp, spec in files])


def load_interactions(name: str, download: bool | None = None) -> pd.DataFrame:
    """The raw interactions of dataset ``name`` (before any filtering).

    Args:
        name: registry key (``DATASETS``).
        download: allow downloading into the cache when no files are found; None: unless
            ``PAPERLIB_OFFLINE=1``.

    Returns:
        DataFrame with columns ``user`` (str), ``item`` (str) and, for timestamped formats,
        ``timestamp``; one row per interaction, users grouped, each user's rows in time order.
        Parsed once per process and file (the returned frame is a copy-on-write view).
    """
    found = locate(name, download)
    df = _read_interactions_cached(_stamp(found.interactions), found.layout.interactions)
    return df.copy(deep=False)


def _titles_from(found: Located, download: bool | None = None) -> dict[str, str] | None:
    if not found.layout.titles:
        return None
    hit = found.title_files()
    failed = ""
    if hit is None and found.folder == paths.cache_dir() / found.spec.name and download_allowed(download):
        # an earlier download stopped after the interactions file: fetch the rest now
        try:
            download_dataset(found.spec.name)
            hit = found.title_files()
        except DownloadError as err:
            failed = f" (the download failed: {err})"
    if hit is None:
        options = " or ".join(s.describe() for s in found.layout.titles)
        raise DataError(
            f"dataset {found.spec.name!r}: no title file next to {found.interactions}{failed}; put {options} "
            f"(plain or .gz) into {found.folder}/"
        )
    source, files = hit
    return dict(_read_titles_cached(source.fmt, tuple((_stamp(p), f) for p, f in files)))


def load_titles(name: str, download: bool | None = None) -> dict[str, str] | None:
    """Item titles of dataset ``name``: raw item id -> title, from the files of the layout in use.

    Returns None when the layout has no titles at all (SASRec's ``Video.txt``: no item -> ASIN map
    exists for its ids). Items whose title is empty are left out of the dict.

    Raises:
        DataError: the layout has a title source but its files are missing (the message names them).
    """
    return _titles_from(locate(name, download), download)


# --------------------------------------------------------------------------------------------
# Processing


def kcore(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iterative k-core on users and items (RecBole ``[k, inf)`` on both), repeated until stable.

    Each round counts the interactions of every user and item among the rows still kept and drops
    the rows of users or items with fewer than ``k`` (both at once, as RecBole does; the fixed point
    is the same in any order). Rows keep their order; the index is reset. ``k <= 1`` keeps all.

    Args:
        df: ``user``, ``item`` (+ any other columns), shape (N, ...).
        k: minimum number of interactions per user and per item.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise DataError(f"k-core needs a non-negative integer k, got {k!r}")
    if k <= 1 or df.empty:
        return df.reset_index(drop=True)
    users = pd.factorize(df["user"])[0]
    items = pd.factorize(df["item"])[0]
    keep = np.ones(len(df), dtype=bool)
    while True:
        user_count = np.bincount(users[keep], minlength=users.max() + 1)
        item_count = np.bincount(items[keep], minlength=items.max() + 1)
        drop = keep & ((user_count[users] < k) | (item_count[items] < k))
        if not drop.any():
            break
        keep &= ~drop
    return df[keep].reset_index(drop=True)


def to_sequential(
    df: pd.DataFrame, name: str, max_len: int, titles: dict[str, str] | None = None
) -> SequentialData:
    """Remap ids and build per-user sequences.

    Users are grouped in order of first appearance (rows of a user keep their order, which is time
    order for frames from ``load_interactions``); items get ids ``1..n_items`` in order of first
    appearance in that grouped order; ``titles`` (raw id -> title) are carried over to the new ids.
    """
    if df.empty:
        raise DataError(f"dataset {name!r} is empty after filtering: lower k or check the input files")
    ucode, users = pd.factorize(df["user"])
    order = np.argsort(ucode, kind="stable")
    if not np.array_equal(order, np.arange(len(order))):
        df, ucode = df.iloc[order], ucode[order]
    icode, items = pd.factorize(df["item"])
    item_ids = icode.astype(np.int64) + 1
    bounds = np.cumsum(np.bincount(ucode, minlength=len(users)))[:-1]
    sequences = np.split(item_ids, bounds)
    item_raw_ids = [""] + [str(x) for x in items]
    mapped = None
    if titles is not None:
        mapped = {i: titles[raw] for i, raw in enumerate(item_raw_ids) if i and raw in titles}
    return SequentialData(
        name=name,
        sequences=sequences,
        n_items=len(items),
        max_len=int(max_len),
        item_raw_ids=item_raw_ids,
        user_raw_ids=[str(u) for u in users],
        titles=mapped,
    )


def load_dataset(
    name: str,
    k: int | None = None,
    max_len: int | None = None,
    *,
    titles: bool = True,
    download: bool | None = None,
) -> SequentialData:
    """Load, k-core filter and remap dataset ``name`` into a :class:`SequentialData`.

    Args:
        name: registry key, e.g. ``"ml-1m"``.
        k: k-core threshold; None takes the registry's (5 for every dataset, as Mamba4Rec).
        max_len: history length for the models; None takes the registry's (200 ML, 50 Amazon).
        titles: attach item titles when the layout has them (missing title files: a warning and
            ``titles=None``).
        download: see :func:`load_interactions`.
    """
    spec = get_spec(name)
    k = spec.kcore if k is None else k
    max_len = spec.max_len if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise DataError(f"max_len must be a positive integer, got {max_len!r}")
    found = locate(name, download)
    raw = _read_interactions_cached(_stamp(found.interactions), found.layout.interactions)
    filtered = kcore(raw, k)
    if filtered.empty:
        raise DataError(
            f"dataset {name!r} is empty after the {k}-core filter ({len(raw)} interactions before): lower k"
        )
    item_titles = None
    if titles:
        try:
            item_titles = _titles_from(found, download)
        except DataError as err:
            warnings.warn(f"{err}. Loading without titles.", stacklevel=2)
    return to_sequential(filtered, name, max_len, item_titles)


@dataclass(frozen=True)
class DatasetStats:
    """Summary counts of a dataset (history length = interactions per user)."""

    users: int
    items: int
    interactions: int
    avg_len: float
    median_len: float
    sparsity: float  # 1 - interactions / (users * items)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def dataset_stats(data: pd.DataFrame | SequentialData) -> DatasetStats:
    """Users, items, interactions, mean and median history length and sparsity.

    Accepts an interactions frame (``user``, ``item`` columns) or a :class:`SequentialData`.
    """
    if isinstance(data, SequentialData):
        lengths = np.array([len(s) for s in data.sequences])
        n_items = data.n_items
    else:
        if data.empty:
            raise DataError("no interactions: the dataset is empty (after filtering?)")
        lengths = data.groupby("user", sort=False).size().to_numpy()
        n_items = int(data["item"].nunique())
    n_users, n_inter = len(lengths), int(lengths.sum())
    return DatasetStats(
        users=n_users,
        items=n_items,
        interactions=n_inter,
        avg_len=float(lengths.mean()),
        median_len=float(np.median(lengths)),
        sparsity=float(1.0 - n_inter / (n_users * n_items)),
    )
