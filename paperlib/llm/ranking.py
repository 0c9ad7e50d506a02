"""Ranking candidate items with a causal LM.

A candidate's score is the model's length-normalised log-likelihood of its title (plus the end
token) after the prompt: the mean log-probability of its tokens, the quantity ORPO's odds are
built from. The prompt runs once; its key/value cache is repeated over a batch of candidates, so
each candidate costs only its own tokens.

Two protocols (ranks are 1-based, ties counted against the true item as in ``paperlib.metrics``):

* ``rank_sampled``: the true test item among itself + 19 items drawn uniformly from those the user
  never interacted with (seeded), as in LLM-recommender papers that score a short candidate list;
* ``rerank``: a given top-20 list per user from a trained sequential model; a true item outside
  the list is a miss (rank ``n_candidates + 1``).

Metrics (HR@K, NDCG@K, MRR@K) come from ``paperlib.metrics``. Neither protocol is comparable with
full ranking over the catalogue.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from paperlib.data.sequences import SequentialData, pad_right
from paperlib.llm.pairs import EvalPrompts, Pair, PairSet, ScoreFn
from paperlib.llm.prompts import Titles, encode_prompt
from paperlib.metrics import metrics_from_ranks, sample_negatives, sampled_ranks

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Token ids of an answer as TRL's ORPO trainer appends it to a prompt: the text's tokens, then
    the end token (prompts end with a newline, so no token spans the boundary)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: ids (n, L) and attention mask (n, L)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r)
        mask[k, : len(r)] = 1
    return ids, mask


def _mean_logp(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits (n, L, V) predicting ids (n, L) -> (n,) mean log-probability over mask."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1) / mask.sum(-1)


@torch.no_grad()
def score_candidates(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    candidates: Sequence[str],
    batch_size: int = 20,
    use_cache: bool = True,
) -> torch.Tensor:
    """Length-normalised log-likelihood of each candidate answer after ``prompt``.

    Args:
        model: a causal LM (a peft model works too).
        tokenizer: its tokenizer.
        prompt: prompt text (as ``PromptBuilder`` writes it).
        candidates: C answer texts (titles).
        batch_size: candidates per forward pass.
        use_cache: run the prompt once and reuse its key/value cache (``False`` runs prompt +
            candidate for every candidate; same scores, slower; kept to test the cache).

    Returns:
        (C,) float32 scores on the CPU, higher = more likely.
    """
    if not candidates:
        raise ValueError("no candidates to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = encode_prompt(tokenizer, prompt)
    n_prompt = len(prompt_ids)
    answers = [answer_ids(tokenizer, c) for c in candidates]
    scores = []
    if use_cache:
        # logits_to_keep=1: only the prompt's last position predicts anything we score
        out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
        prompt_cache, last_logits = out.past_key_values, out.logits[:, -1:]  # (1, 1, V): predicts token 0
    for start in range(0, len(answers), batch_size):
        ids, mask = _pad(answers[start : start + batch_size], pad_id)  # (n, L)
        ids, mask = ids.to(device), mask.to(device)
        n, length = ids.shape
        if use_cache:
            cache = copy.deepcopy(prompt_cache)  # the forward pass below appends to it
            cache.batch_repeat_interleave(n)
            out = model(
                input_ids=ids,
                attention_mask=torch.cat([torch.ones(n, n_prompt, dtype=torch.long, device=device), mask], dim=1),
                position_ids=torch.arange(n_prompt, n_prompt + length, device=device).expand(n, -1),
                past_key_values=cache,
                use_cache=True,
            )
            # token j of an answer is predicted by answer position j - 1, token 0 by the prompt's end
            logits = torch.cat([last_logits.expand(n, -1, -1), out.logits[:, :-1]], dim=1)  # (n, L, V)
        else:
            full = torch.cat([torch.tensor([prompt_ids], device=device).expand(n, -1), ids], dim=1)
            full_mask = torch.cat([torch.ones(n, n_prompt, dtype=torch.long, device=device), mask], dim=1)
            logits = model(input_ids=full, attention_mask=full_mask, use_cache=False).logits[:, n_prompt - 1 : -1]
        scores.append(_mean_logp(logits, ids, mask).cpu())
    model.train(was_training)
    return torch.cat(scores)


def preference_accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: PairSet | Sequence[Pair]
) -> float:
    """Share of pairs whose chosen answer scores higher than the rejected one (TRL's
    ``rewards/accuracies``, computed on the given pairs)."""
    items = pairs.pairs if isinstance(pairs, PairSet) else list(pairs)
    if not items:
        raise ValueError("no pairs given")
    wins = 0
    for p in items:
        s = score_candidates(model, tokenizer, p.prompt, [p.chosen, p.rejected])
        wins += int(s[0] > s[1])
    return wins / len(items)


@dataclass
class RankingResult:
    """Ranks of the true test item among each user's scored candidates.

    Attributes:
        protocol: "sampled" (true + sampled items) or "rerank" (a model's top-K list).
        users: (U,) row indices into data.sequences.
        targets: (U,) true test items.
        candidates: (U, C) candidate item ids scored per user.
        scores: (U, C) their scores (−inf: untitled, not scored).
        ranks: (U,) 1-based rank of the true item; C + 1 when it is not among the candidates.
        metrics: HR@K, NDCG@K, MRR@K over users (``paperlib.metrics.metrics_from_ranks``).
        seconds: wall time of the scoring.
        stats: counts, e.g. ``true_outside_list`` and ``untitled_candidates`` for "rerank".
    """

    protocol: str
    users: np.ndarray
    targets: np.ndarray
    candidates: np.ndarray
    scores: np.ndarray
    ranks: np.ndarray
    metrics: dict[str, float]
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-friendly summary with the per-user ranks."""
        return {
            "protocol": self.protocol,
            "n_users": int(len(self.users)),
            "n_candidates": int(self.candidates.shape[1]),
            "metrics": self.metrics,
            "seconds": self.seconds,
            "stats": self.stats,
            "users": self.users.tolist(),
            "ranks": self.ranks.tolist(),
        }


def _check_ks(ks: Sequence[int], n_candidates: int) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if any(k < 1 or k > n_candidates for k in ks):
        raise ValueError(f"cutoffs K must lie in 1..{n_candidates} (the candidates per user), got {ks}")
    return ks


def _score_table(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: EvalPrompts,
    candidates: np.ndarray,
    titles: Titles,
    batch_size: int,
) -> np.ndarray:
    """(U, C) scores; candidates without a title get −inf (they cannot be written down)."""
    table = np.full(candidates.shape, -np.inf, dtype=np.float64)
    for row, prompt in enumerate(prompts.prompts):
        cols = [c for c, item in enumerate(candidates[row]) if int(item) in titles]
        if cols:
            texts = [titles[int(candidates[row, c])] for c in cols]
            table[row, cols] = score_candidates(model, tokenizer, prompt.text, texts, batch_size).double().numpy()
    return table


def _ranks(table: np.ndarray, true_col: np.ndarray) -> np.ndarray:
    """1-based rank of column ``true_col[u]`` in each row of ``table``; ``true_col = -1`` = a miss."""
    n_users, n_cand = table.shape
    ranks = np.full(n_users, n_cand + 1, dtype=np.int64)
    hit = true_col >= 0
    if hit.any():
        scores = torch.from_numpy(table[hit])
        targets = torch.from_numpy(true_col[hit])
        others = torch.stack([torch.tensor([c for c in range(n_cand) if c != t]) for t in true_col[hit].tolist()])
        ranks[hit] = sampled_ranks(scores, targets, others).numpy()
    return ranks


@torch.no_grad()
def top_k(
    score: ScoreFn, data: SequentialData, users: Sequence[int], k: int = 20, batch_size: int = 256
) -> np.ndarray:
    """Each user's top-``k`` items by a trained sequential model after the test history (every
    item but the test one), for ``rerank``. Padding is never returned; history items are not
    masked (the project's full-ranking protocol).

    Args:
        score: ``score(items (B, L), lengths (B,)) -> (B, n_items + 1)``, e.g. ``Mamba4Rec.score``.
        users: row indices into ``data.sequences``, e.g. ``EvalPrompts.users``.

    Returns:
        (U, k) item ids, best first.
    """
    rows = []
    users = list(users)
    for start in range(0, len(users), batch_size):
        histories = [data.sequences[u][:-1] for u in users[start : start + batch_size]]
        items, lengths = pad_right(histories, data.max_len)
        scores = score(items, lengths).float().cpu()
        if scores.shape != (len(histories), data.n_items + 1):
            raise ValueError(f"score returned {tuple(scores.shape)}; expected ({len(histories)}, {data.n_items + 1})")
        scores[:, 0] = float("-inf")  # padding is not an item
        rows.append(scores.topk(k, dim=1).indices)
    return torch.cat(rows).numpy() if rows else np.empty((0, k), dtype=np.int64)


def rank_sampled(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: SequentialData,
    prompts: EvalPrompts,
    titles: Titles,
    n_negatives: int = 19,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 20,
) -> RankingResult:
    """Rank the true test item among itself and ``n_negatives`` sampled items per user.

    Negatives are drawn uniformly (``paperlib.metrics.sample_negatives``) from the titled items the
    user never interacted with whose title differs from the true item's.
    """
    ks = _check_ks(ks, n_negatives + 1)
    untitled = [i for i in range(1, data.n_items + 1) if i not in titles]
    same_title: dict[str, list[int]] = {}
    for item, title in titles.titles.items():
        same_title.setdefault(title, []).append(item)
    # items that may not be drawn count as "seen" for the sampler
    seen = [
        np.concatenate([data.sequences[u][:-1], untitled, same_title[titles[int(t)]]]).astype(np.int64)
        for u, t in zip(prompts.users, prompts.targets)
    ]
    negatives = sample_negatives(seen, prompts.targets, data.n_items, n_negatives, seed)
    candidates = np.concatenate([prompts.targets[:, None], negatives], axis=1)  # true item in column 0
    start = time.perf_counter()
    table = _score_table(model, tokenizer, prompts, candidates, titles, batch_size)
    return _ranking_result("sampled", prompts, candidates, table, np.zeros(len(prompts), dtype=np.int64), ks,
                           time.perf_counter() - start, {"n_negatives": n_negatives, "seed": seed})


def rerank(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: EvalPrompts,
    titles: Titles,
    top: np.ndarray | torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 20,
) -> RankingResult:
    """Re-rank each user's top-K list from a sequential model by the LM's scores.

    Args:
        top: (U, K) item ids, one row per user of ``prompts`` in the same order, e.g.
            ``top_k(mamba4rec.score, data, prompts.users, 20)``.

    A true item outside its list is a miss (rank K + 1); untitled items in a list get score −inf.
    """
    top = np.asarray(torch.as_tensor(top).cpu().numpy(), dtype=np.int64)
    if top.ndim != 2 or top.shape[0] != len(prompts):
        raise ValueError(f"top must be (n_users, K) = ({len(prompts)}, K), one row per evaluation prompt; got {top.shape}")
    ks = _check_ks(ks, top.shape[1])
    true_col = np.full(len(prompts), -1, dtype=np.int64)
    for row, (items, target) in enumerate(zip(top, prompts.targets)):
        where = np.flatnonzero(items == target)
        if where.size:
            true_col[row] = where[0]
    start = time.perf_counter()
    table = _score_table(model, tokenizer, prompts, top, titles, batch_size)
    return _ranking_result("rerank", prompts, top, table, true_col, ks, time.perf_counter() - start, {
        "true_outside_list": int((true_col < 0).sum()),
        "untitled_candidates": int(sum(int(i) not in titles for i in top.ravel())),
    })


def _ranking_result(protocol: str, prompts: EvalPrompts, candidates: np.ndarray, table: np.ndarray,
                    true_col: np.ndarray, ks: Sequence[int], seconds: float, stats: dict) -> RankingResult:
    """The result of scoring ``candidates`` (U, C) into ``table`` (U, C); ``true_col`` (U,) is the
    column of each user's true item, -1 where it is not among the candidates."""
    ranks = _ranks(table, true_col)
    return RankingResult(protocol=protocol, users=prompts.users, targets=prompts.targets, candidates=candidates,
                         scores=table, ranks=ranks, metrics=metrics_from_ranks(ranks, ks),
                         seconds=round(seconds, 3), stats=stats)
