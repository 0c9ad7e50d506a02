"""Ranking metrics: full ranking over the whole catalogue (the reported protocol) and the sampled
1 + 100 protocol of the SASRec papers (a labelled extra; the two are not comparable).

One target per user at 1-based rank r:  HR@K = [r <= K],  MRR@K = 1/r if r <= K else 0,
NDCG@K = 1/log2(r + 1) if r <= K else 0 (RecBole's definitions).

Ties: the target's rank is 1 + the number of other items with a score *strictly greater or equal*
to it (pessimistic). A model that gives every item the same score therefore ranks the target last,
not first. RecBole takes ``torch.topk``'s order among ties, which is implementation-defined; with
real-valued scores ties are rare and both agree.

Padding (item 0) is never ranked. Already-seen items are not masked, as RecBole does for
sequential models (set ``exclude`` to mask them if you want the other convention).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

DEFAULT_KS: tuple[int, ...] = (5, 10, 20)
METRIC_NAMES: tuple[str, ...] = ("hr", "ndcg", "mrr")


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based rank of each target among all items, ties counted against the target.

    Args:
        scores: (B, V) scores; column 0 is padding and is never ranked.
        targets: (B,) item ids in ``1..V-1``.
        exclude: optional (B, V) boolean mask of items to leave out of the ranking (the target is
            never excluded).

    Returns:
        LongTensor (B,) of ranks in ``1..V-1``.
    """
    if scores.ndim != 2 or targets.ndim != 1 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"scores must be (B, V) and targets (B,); got {tuple(scores.shape)} and {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= scores.shape[1]):
        raise ValueError(f"targets must be item ids in 1..{scores.shape[1] - 1} (0 is padding)")
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    beats = scores >= target_scores  # (B, V), includes the target itself
    beats[:, 0] = False  # padding is not an item
    if exclude is not None:
        beats &= ~exclude
        beats.scatter_(1, targets[:, None], True)
    # NaN scores compare False: a NaN target score would get rank 1, so refuse it.
    if torch.isnan(target_scores).any():
        raise ValueError("NaN in the scores of a target item: the model output is not finite")
    return beats.sum(dim=1)


def metrics_from_ranks(ranks: torch.Tensor | np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR@K over users from their 1-based target ranks.

    K larger than the catalogue is allowed (every target is then a hit).
    """
    r = torch.as_tensor(ranks, dtype=torch.float64)
    if r.numel() == 0:
        raise ValueError("no ranks given: cannot average metrics over zero users")
    out: dict[str, float] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"K must be a positive integer, got {k}")
        hit = r <= k
        out[f"hr@{k}"] = hit.double().mean().item()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 1.0), 0.0).mean().item()
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / r, 0.0).mean().item()
    return out


def full_ranking_metrics(
    scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """HR/NDCG/MRR@K of one score matrix (B, V) against targets (B,), full ranking."""
    return metrics_from_ranks(target_ranks(scores, targets), ks)


def sample_negatives(
    histories: Iterable[np.ndarray],
    targets: np.ndarray,
    n_items: int,
    n_neg: int = 100,
    seed: int = 0,
) -> np.ndarray:
    """For each user, ``n_neg`` items drawn uniformly from the items they never interacted with
    (SASRec's protocol). Returns (B, n_neg) item ids in ``1..n_items``."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(targets), n_neg), dtype=np.int64)
    for row, (hist, tgt) in enumerate(zip(histories, targets)):
        seen = set(hist.tolist()) | {int(tgt)}
        if n_items - len(seen) < n_neg:
            raise ValueError(f"user {row} has seen too many items to draw {n_neg} unseen negatives")
        picked: list[int] = []
        while len(picked) < n_neg:
            cand = rng.integers(1, n_items + 1, size=2 * n_neg)
            for c in cand.tolist():
                if c not in seen:
                    seen.add(c)
                    picked.append(c)
                    if len(picked) == n_neg:
                        break
        out[row] = picked
    return out


def sampled_ranks(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Rank of the target among itself + its sampled negatives (1-based, ties against the target).

    Args:
        scores: (B, V) full scores; targets: (B,); negatives: (B, n_neg) item ids.
    """
    target_scores = scores.gather(1, targets[:, None])
    neg_scores = scores.gather(1, negatives)
    return 1 + (neg_scores >= target_scores).sum(dim=1)


class RankingAccumulator:
    """Collects target ranks over evaluation batches, then averages metrics once.

    >>> acc = RankingAccumulator(); acc.add(scores, targets); acc.result()
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS) -> None:
        self.ks = tuple(ks)
        self._ranks: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        self._ranks.append(target_ranks(scores, targets).cpu())

    @property
    def ranks(self) -> torch.Tensor:
        return torch.cat(self._ranks) if self._ranks else torch.empty(0, dtype=torch.long)

    def result(self) -> dict[str, float]:
        return metrics_from_ranks(self.ranks, self.ks)
