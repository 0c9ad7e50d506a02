"""Datasets: registry, readers, lookup and download, k-core filter, leave-one-out split, batches.

Typical use::

    from paperlib.data import load_dataset, train_batches
    data = load_dataset("ml-1m")            # 5-core, max_len 200, titles attached
    for batch in train_batches(data, 2048):  # windows, about 2,048 (prefix, target) pairs a batch
        ...

Files are looked up in ``$PAPERLIB_DATA/<dataset>/``, then ``$PAPERLIB_CACHE/<dataset>/``, then
downloaded with a checksum check (see ``download``). Known datasets: ``DATASETS``.
"""

from .download import DownloadError, Located, download_dataset, get_spec, locate
from .process import (
    DatasetStats,
    dataset_stats,
    kcore,
    load_dataset,
    load_interactions,
    load_titles,
    to_sequential,
)
from .readers import read_interactions, read_titles
from .registry import DATASETS, DatasetSpec, Download, FileSpec, Layout, TitleSource
from .sequences import (
    DataError,
    EvalBatch,
    SequentialData,
    TrainBatch,
    TrainLoader,
    Windows,
    count_pairs,
    eval_batches,
    pad_right,
    recbole_pairs,
    train_batches,
    training_windows,
)

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "DatasetStats",
    "DataError",
    "Download",
    "DownloadError",
    "EvalBatch",
    "FileSpec",
    "Layout",
    "Located",
    "SequentialData",
    "TitleSource",
    "TrainBatch",
    "TrainLoader",
    "Windows",
    "count_pairs",
    "recbole_pairs",
    "training_windows",
    "dataset_stats",
    "download_dataset",
    "eval_batches",
    "get_spec",
    "kcore",
    "load_dataset",
    "load_interactions",
    "load_titles",
    "locate",
    "pad_right",
    "read_interactions",
    "read_titles",
    "to_sequential",
    "train_batches",
]
