"""Per-user item sequences, the leave-one-out split and padded batches.

Conventions (RecBole, as Mamba4Rec uses):

* item ids are remapped to ``1..n_items`` in order of first appearance; ``0`` is padding;
* each user's items are in time order; the last item is the test target, the second to last the
  validation target, the rest is training data (leave-one-out);
* histories longer than ``max_len`` keep their most recent ``max_len`` items (documented
  truncation, as RecBole's ``MAX_ITEM_LIST_LENGTH``);
* batches are right-padded with ``0`` (RecBole's layout): a causal model's output at a real position
  never sees padding, and the last real position is ``lengths - 1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

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
    """All-position training batch: ``targets[b, t]`` is the item after ``items[b, t]`` (0 = pad)."""

    items: torch.Tensor  # (B, L) input item ids, right-padded
    targets: torch.Tensor  # (B, L) next item ids, 0 where there is no target
    lengths: torch.Tensor  # (B,)


def train_batches(
    data: SequentialData, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True
) -> Iterator[TrainBatch]:
    """Yield all-position training batches over the training part of every user.

    Each user's training part ``s[:-2]`` of length n gives inputs ``s[:n-1]`` and targets
    ``s[1:n]``: the same (prefix, next item) pairs as RecBole's prefix augmentation, truncated to
    the last ``max_len`` positions.
    """
    seqs = [s for s in data.train_sequences() if len(s) >= 2]
    order = torch.randperm(len(seqs), generator=generator).tolist() if shuffle else range(len(seqs))
    order = list(order)
    for start in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[start : start + batch_size]]
        # one window of max_len + 1 items gives max_len (input, target) pairs
        items, lengths = pad_right([s[:-1] for s in chunk], data.max_len)
        targets, _ = pad_right([s[1:] for s in chunk], data.max_len)
        yield TrainBatch(items=items, targets=targets, lengths=lengths)


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
