"""Metrics on hand-computed rankings (RecBole definitions, DESIGN §5)."""

import math

import numpy as np
import pytest
import torch

from paperlib.metrics import (
    RankingAccumulator, full_ranking_metrics, metrics_from_ranks, sample_negatives, sampled_ranks, target_ranks,
)


def test_ranks_by_hand():
    # item 0 is padding; scores for items 1..5
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9, 0.2],
                           [9.0, 0.1, 0.5, 0.3, 0.9, 0.2]])
    targets = torch.tensor([2, 1])  # item 2 is 2nd best (after item 4); item 1 is last of 5
    assert target_ranks(scores, targets).tolist() == [2, 5]


def test_metrics_by_hand():
    m = metrics_from_ranks(torch.tensor([1, 2, 11]), ks=(10,))
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(3)) / 3)
    assert m["mrr@10"] == pytest.approx((1.0 + 0.5) / 3)


def test_ties_count_against_target():
    scores = torch.zeros(1, 6)
    assert target_ranks(scores, torch.tensor([3])).item() == 5  # all five real items tie: rank last
    scores = torch.tensor([[0.0, 1.0, 2.0, 2.0, 0.0, 0.0]])
    assert target_ranks(scores, torch.tensor([2])).item() == 2


def test_padding_never_ranked():
    scores = torch.tensor([[100.0, 1.0, 2.0]])
    assert target_ranks(scores, torch.tensor([2])).item() == 1


def test_k_larger_than_catalogue():
    scores = torch.randn(4, 4)
    m = full_ranking_metrics(scores, torch.tensor([1, 2, 3, 1]), ks=(50,))
    assert m["hr@50"] == 1.0


def test_full_ranking_matches_sorting():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 30, generator=g)
    targets = torch.randint(1, 30, (50,), generator=g)
    ranks = target_ranks(scores, targets)
    for b in range(50):
        order = torch.argsort(scores[b, 1:], descending=True) + 1
        assert ranks[b].item() == (order == targets[b]).nonzero().item() + 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="padding"):
        target_ranks(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets"):
        target_ranks(torch.randn(2, 5), torch.tensor([1, 9]))
    with pytest.raises(ValueError, match="zero users"):
        metrics_from_ranks(torch.tensor([]))
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([1]))


def test_sampled_protocol():
    hist = [np.array([1, 2]), np.array([3])]
    neg = sample_negatives(hist, np.array([4, 5]), n_items=300, n_neg=100, seed=1)
    assert neg.shape == (2, 100)
    assert not set(neg[0]) & {1, 2, 4} and not set(neg[1]) & {3, 5}
    assert all(len(set(row)) == 100 for row in neg)
    scores = torch.zeros(2, 301)
    scores[0, 4] = 1.0  # target beats all negatives
    r = sampled_ranks(scores, torch.tensor([4, 5]), torch.from_numpy(neg))
    assert r.tolist() == [1, 101]


def test_accumulator():
    acc = RankingAccumulator(ks=(1,))
    acc.add(torch.tensor([[0.0, 2.0, 1.0]]), torch.tensor([1]))
    acc.add(torch.tensor([[0.0, 2.0, 1.0]]), torch.tensor([2]))
    assert acc.result()["hr@1"] == 0.5
