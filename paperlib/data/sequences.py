"""Per-user item sequences, the leave-one-out split and padded batches.

Conventions (RecBole, as Mamba4Rec uses):

* item ids are remapped to ``1..n_items`` in order of first appearance; ``0`` is padding;
* each user's items are in time order; the last item is the test target, the second to last the
  validation target, the rest is training data (leave-one-out);
* histories longer than ``max_len`` keep their most recent ``max_len`` items (documented
  truncation, as RecBole's ``MAX_ITEM_LIST_LENGTH``);
* batches are right-padded with ``0`` (RecBole's layout): a causal model's output at a real position
  never sees padding, and the last real position is ``lengths - 1``;
* training covers RecBole's one-example-per-prefix augmentation (981,491 pairs on ML-1M) exactly
  once per epoch, through windows over each user's training part that a causal model trains on at
  every position at once (:class:`Windows`), in batches that count pairs as RecBole does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class DataError(ValueError):
    """Bad or missing data: the message says what is wrong and how to fix it."""


@dataclass
class SequentialData:
    """A processed dataset: one chronological item sequence per user.

    Attributes:
        name: registry name, e.g. ``"ml-1m"``.
        sequences: per user, an int64 array of item ids in ``1..n_items`` in time order.
        n_items: number of real items (the embedding table has ``n_items + 1`` rows, row 0 padding).
        max_len: maximum history length used by the models.
        item_raw_ids: ``item_raw_ids[i]`` is the dataset's own id of item ``i`` (index 0: ``""``).
        user_raw_ids: the dataset's own id of each user, in the order of ``sequences``.
        titles: item title per remapped item id, where the dataset has titles.
    """

    name: str
    sequences: list[np.ndarray]
    n_items: int
    max_len: int
    item_raw_ids: list[str] = field(default_factory=list)
    user_raw_ids: list[str] = field(default_factory=list)
    titles: dict[int, str] | None = None

    def __post_init__(self) -> None:
        if not self.sequences:
            raise DataError(f"dataset {self.name!r} has no users (empty after filtering?)")
        short = sum(1 for s in self.sequences if len(s) < 3)
        if short:
            raise DataError(
                f"dataset {self.name!r}: {short} users have fewer than 3 items; leave-one-out needs "
                "at least 3 (train, validation, test). Apply the k-core filter (k >= 3) first."
            )

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def train_sequences(self) -> list[np.ndarray]:
        """Training part of each user's sequence: all but the last two items."""
        return [s[:-2] for s in self.sequences]

    def eval_examples(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """Histories and targets for ``split`` in {"valid", "test"} (one target per user)."""
        if split == "valid":
            return [s[:-2] for s in self.sequences], np.array([s[-2] for s in self.sequences])
        if split == "test":
            return [s[:-1] for s in self.sequences], np.array([s[-1] for s in self.sequences])
        raise ValueError(f"unknown split {split!r}: use 'valid' or 'test'")

    def subset(self, n_users: int, seed: int = 0) -> "SequentialData":
        """A random subset of users (same catalogue), for smoke runs."""
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(self.n_users, size=min(n_users, self.n_users), replace=False))
        return SequentialData(
            name=self.name,
            sequences=[self.sequences[i] for i in idx],
            n_items=self.n_items,
            max_len=self.max_len,
            item_raw_ids=self.item_raw_ids,
            user_raw_ids=[self.user_raw_ids[i] for i in idx] if self.user_raw_ids else [],
            titles=self.titles,
        )


def pad_right(seqs: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad sequences with 0 after keeping the last ``max_len`` items of each.

    Returns:
        items: LongTensor (B, L) with L = min(max_len, longest sequence).
        lengths: LongTensor (B,) of real lengths (>= 1).
    """
    if any(len(s) == 0 for s in seqs):
        raise DataError("empty history: every sequence needs at least one item")
    lengths = np.array([min(len(s), max_len) for s in seqs], dtype=np.int64)
    out = np.zeros((len(seqs), int(lengths.max())), dtype=np.int64)
    for row, (s, n) in enumerate(zip(seqs, lengths)):
        out[row, :n] = s[len(s) - n :]
    return torch.from_numpy(out), torch.from_numpy(lengths)


@dataclass
class TrainBatch:
    """All-position training batch: ``targets[b, t]`` is the item after ``items[b, t]`` (0 = pad).

    ``loss_mask`` (B, L) marks the targets this batch counts; None counts every real target. A
    window over a long history repeats items of the previous window as context (``window_stride``
    below ``max_len``); their targets were counted there and are masked here.
    """

    items: torch.Tensor  # (B, L) input item ids, right-padded
    targets: torch.Tensor  # (B, L) next item ids, 0 where there is no target
    lengths: torch.Tensor  # (B,)
    loss_mask: torch.Tensor | None = None  # (B, L) bool, True = a counted target

    @property
    def counted(self) -> torch.Tensor:
        """(B, L) bool: the targets this batch trains on."""
        real = self.targets > 0
        return real if self.loss_mask is None else real & self.loss_mask

    @property
    def n_pairs(self) -> int:
        """(prefix, target) pairs in the batch, as RecBole counts its ``train_batch_size``."""
        return int(self.counted.sum())

    def split(self, m: int) -> list["TrainBatch"]:
        """The batch's rows (windows) in ``m`` consecutive groups of nearly equal size."""
        if not 1 <= m <= self.items.shape[0]:
            raise ValueError(f"cannot split {self.items.shape[0]} windows into {m} groups (need 1 <= m <= windows)")
        parts = [torch.tensor_split(t, m) if t is not None else [None] * m
                 for t in (self.items, self.targets, self.lengths, self.loss_mask)]
        return [TrainBatch(*(p[j] for p in parts)) for j in range(m)]

    def rows(self, start: int, stop: int) -> "TrainBatch":
        """Windows ``start..stop-1`` of the batch (a rank's share of a global batch)."""
        if not 0 <= start < stop <= self.items.shape[0]:
            raise ValueError(f"cannot take windows {start}..{stop - 1} of a batch of {self.items.shape[0]}")
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return TrainBatch(cut(self.items), cut(self.targets), cut(self.lengths), cut(self.loss_mask))

    def to(self, device: torch.device | str) -> "TrainBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TrainBatch(move(self.items), move(self.targets), move(self.lengths), move(self.loss_mask))


def recbole_pairs(data: SequentialData) -> list[tuple[int, tuple[int, ...], int]]:
    """RecBole's training augmentation, written out: for every user and every position t >= 1 of
    the user's training part s, the pair (history s[max(0, t - max_len):t], target s[t]).

    Returns ``(user row, history, target)`` tuples. Meant for tests and small data: it holds every
    history explicitly (on ML-1M that is 981,491 pairs).
    """
    out = []
    for u, s in enumerate(data.train_sequences()):
        for t in range(1, len(s)):
            out.append((u, tuple(int(x) for x in s[max(0, t - data.max_len) : t]), int(s[t])))
    return out


def count_pairs(data: SequentialData) -> int:
    """Number of RecBole (prefix, target) training pairs: one per training item after the first."""
    return int(sum(max(len(s) - 3, 0) for s in data.sequences))


@dataclass(frozen=True)
class Windows:
    """Training windows that together hold every RecBole (prefix, target) pair exactly once.

    A user's training part ``s`` (n items) has targets ``s[1..n-1]``; target ``s[t]`` has the
    history ``s[max(0, t - max_len):t]`` in RecBole. The targets are cut into consecutive chunks of
    ``stride``; the window of a chunk ending at target ``e`` feeds the model the (at most
    ``max_len``) items before it, ``s[start:e]`` with ``start = max(0, e - max_len)``, so position
    j predicts ``s[start + j + 1]``, and counts only the chunk's targets (the positions before them
    are context). A target thus sees at least ``max_len - stride + 1`` items of history, all of it
    while the history is shorter than that.

    ``stride = max_len`` (the default) gives non-overlapping windows, each item fed about once;
    ``stride = 1`` gives every target its full RecBole history (RecBole's pairs exactly, at
    RecBole's cost); in between, more users per batch and more history per target for a few
    times the compute.

    Arrays, one entry per window: ``user`` (row in ``data.sequences``), ``start``, ``stop`` (the
    end ``e`` above) and ``first_new`` (position of the first counted target within the window).
    """

    user: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    first_new: np.ndarray
    stride: int

    @property
    def n_targets(self) -> np.ndarray:
        """(W,) counted targets per window."""
        return self.stop - self.start - self.first_new

    def __len__(self) -> int:
        return len(self.user)


def training_windows(data: SequentialData, stride: int | None = None) -> Windows:
    """The windows of ``data``'s training parts (see :class:`Windows`); ``stride`` defaults to
    ``data.max_len``."""
    size = data.max_len
    stride = size if stride is None else stride
    if not 1 <= stride <= size:
        raise DataError(f"window stride must lie in 1..max_len={size}, got {stride}")
    user, start, stop, first = [], [], [], []
    for u, seq in enumerate(data.sequences):
        last = len(seq) - 3  # the last training target's index (training part: all but 2 items)
        for prev in range(0, last, stride):  # targets prev+1 .. end
            end = min(prev + stride, last)
            a = max(0, end - size)
            user.append(u), start.append(a), stop.append(end), first.append(prev - a)
    as_array = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return Windows(as_array(user), as_array(start), as_array(stop), as_array(first), stride)


class TrainLoader:
    """Batches of windows in shuffled passes over the training data.

    ``batch_size`` counts (prefix, target) pairs, as RecBole's ``train_batch_size`` does: windows
    are taken in order until the next one would push the batch over ``batch_size`` targets, so a
    pass has about ``count_pairs / batch_size`` steps (RecBole's update count; a window is never
    split). ``batch_size`` may be changed between steps (an adaptive batch-size policy sets it);
    the next batch is formed with the new value, without restarting the pass.

    Iterating gives one whole pass. :meth:`next_batch` instead continues the current pass across
    calls (the trainer's evaluation periods may end inside a pass); :meth:`state_dict` holds the
    pass's order and position, so a resumed run continues exactly.

    Args:
        data: the dataset.
        batch_size: target pairs per batch; None puts the whole pass in one batch.
        generator: shuffles the windows (the trainer checkpoints its state for exact resume).
        shuffle: False keeps the windows in user order.
        stride: see :class:`Windows` (default ``max_len``).
    """

    def __init__(self, data: SequentialData, batch_size: int | None, generator: torch.Generator | None = None,
                 shuffle: bool = True, stride: int | None = None) -> None:
        self.data = data
        self.windows = training_windows(data, stride)
        if len(self.windows) == 0:
            raise DataError(f"dataset {data.name!r}: no user has the 2 training items a training target needs")
        self.n_pairs = int(self.windows.n_targets.sum())
        self.generator = generator
        self.shuffle = shuffle
        self.batch_size = self.n_pairs if batch_size is None else batch_size
        self._order: np.ndarray | None = None  # the current pass's window order; None between passes
        self._pos = 0

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        most = int(self.windows.n_targets.max())
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DataError(f"batch_size must be an integer number of (prefix, target) pairs, got {value!r}")
        if value < most:
            raise DataError(
                f"batch_size {value} is smaller than the {most} targets of one training window of "
                f"{self.data.name!r} (a window is never split): use at least {most} pairs"
            )
        if value > self.n_pairs:
            raise DataError(
                f"batch_size {value} is larger than an epoch of {self.data.name!r} ({self.n_pairs:,} "
                f"pairs): use at most {self.n_pairs}"
            )
        self._batch_size = int(value)

    def steps_estimate(self) -> int:
        """Steps in a pass at the current batch size (exact up to the packing of whole windows)."""
        return math.ceil(self.n_pairs / self.batch_size)

    def next_batch(self) -> TrainBatch | None:
        """The next batch of the current pass; None once the pass is over (the call after that
        starts a new shuffled pass)."""
        n = len(self.windows)
        if self._order is None:
            self._order = torch.randperm(n, generator=self.generator).numpy() if self.shuffle else np.arange(n)
            self._pos = 0
        if self._pos >= n:
            self._order = None
            return None
        counts = self.windows.n_targets
        start, stop, total = self._pos, self._pos, 0
        while stop < n and total + counts[self._order[stop]] <= self.batch_size:
            total += counts[self._order[stop]]
            stop += 1
        self._pos = stop
        return self._batch(self._order[start:stop])

    def __iter__(self) -> Iterator[TrainBatch]:
        """One whole pass, from its start."""
        self._order = None
        while (batch := self.next_batch()) is not None:
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The pass in progress: order and position (tensors and ints), and the batch size."""
        order = None if self._order is None else torch.from_numpy(self._order.copy())
        return {"order": order, "pos": self._pos, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order = None if state["order"] is None else state["order"].numpy()
        self._pos = int(state["pos"])
        self.batch_size = int(state["batch_size"])

    def _batch(self, idx: np.ndarray) -> TrainBatch:
        w, seqs = self.windows, self.data.sequences
        lengths = w.stop[idx] - w.start[idx]
        width = int(lengths.max())
        items = np.zeros((len(idx), width), dtype=np.int64)
        targets = np.zeros_like(items)
        mask = np.zeros(items.shape, dtype=bool)
        for row, i in enumerate(idx):
            s, a, b = seqs[w.user[i]], w.start[i], w.stop[i]
            items[row, : b - a] = s[a:b]
            targets[row, : b - a] = s[a + 1 : b + 1]
            mask[row, w.first_new[i] : b - a] = True
        return TrainBatch(torch.from_numpy(items), torch.from_numpy(targets), torch.from_numpy(lengths),
                          torch.from_numpy(mask))


def train_batches(
    data: SequentialData, batch_size: int | None, generator: torch.Generator | None = None, shuffle: bool = True,
    stride: int | None = None,
) -> Iterator[TrainBatch]:
    """One epoch of training batches of about ``batch_size`` (prefix, target) pairs each (see
    :class:`TrainLoader`); every RecBole training pair is counted exactly once per epoch."""
    return iter(TrainLoader(data, batch_size, generator=generator, shuffle=shuffle, stride=stride))


@dataclass
class EvalBatch:
    """Evaluation batch: score the next item after each history; one target per user."""

    items: torch.Tensor  # (B, L) history, right-padded
    lengths: torch.Tensor  # (B,)
    targets: torch.Tensor  # (B,)
    users: torch.Tensor  # (B,) row index into data.sequences


def eval_batches(data: SequentialData, split: str, batch_size: int) -> Iterator[EvalBatch]:
    """Yield evaluation batches for ``split`` ("valid" or "test") in user order."""
    histories, targets = data.eval_examples(split)
    for start in range(0, len(histories), batch_size):
        stop = min(start + batch_size, len(histories))
        items, lengths = pad_right(histories[start:stop], data.max_len)
        yield EvalBatch(
            items=items,
            lengths=lengths,
            targets=torch.from_numpy(targets[start:stop].astype(np.int64)),
            users=torch.arange(start, stop),
        )
