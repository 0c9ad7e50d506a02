"""Preference pairs for ORPO and evaluation prompts, from the leave-one-out split.

Training pairs use only each user's training part (the items before the validation item): a
target position ``t`` is drawn from that part, the prompt shows the items before ``t``, ``chosen``
is the target's title and ``rejected`` a wrong title. Evaluation prompts end just before the
test item (the validation item is part of the history), as the sequential models see it.

Rejected items, by ``PairConfig.strategy``:

* ``"uniform"``: any titled item, uniformly;
* ``"popularity"``: titled items drawn in proportion to their count in the training parts;
* ``"hard"``: the highest-scored wrong item of a trained sequential model, from a score function
  ``score(items (B, L), lengths (B,)) -> (B, n_items + 1)`` (e.g. ``Mamba4Rec.score``) or from a
  precomputed score matrix with one row per training target.

A wrong item is never the target, never an item with the target's title (two items can share
one), never untitled, and by default (``exclude_history``) never an item shown in the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from paperlib.data.sequences import DataError, SequentialData, pad_right
from paperlib.llm.prompts import Prompt, PromptBuilder, Titles

STRATEGIES = ("uniform", "popularity", "hard")

#: ``score(items, lengths)``: right-padded histories (B, L) and lengths (B,), CPU LongTensors, ->
#: scores (B, n_items + 1). For a model on a GPU: ``lambda i, n: model.score(i.to(dev), n.to(dev))``.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PairConfig:
    """How training pairs are drawn.

    Attributes:
        strategy: how the rejected item is chosen: "uniform", "popularity" or "hard".
        targets_per_user: training targets drawn per user (fewer where the training part is short).
        exclude_history: never reject with an item the prompt shows.
        seed: seed of every random choice.
        score_batch_size: users per call of the score function ("hard").
    """

    strategy: str = "uniform"
    targets_per_user: int = 1
    exclude_history: bool = True
    seed: int = 0
    score_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.targets_per_user < 1:
            raise ValueError(f"targets_per_user must be at least 1, got {self.targets_per_user}")


@dataclass
class TrainingTargets:
    """Sampled training targets: ``data.sequences[users[k]][positions[k]]`` is target k and the items
    before it are its history. Every position lies in the training part (before the validation item).
    """

    users: np.ndarray  # (N,) row indices into data.sequences
    positions: np.ndarray  # (N,) index of the target in that user's sequence

    def __len__(self) -> int:
        return len(self.users)

    def histories(self, data: SequentialData) -> list[np.ndarray]:
        return [data.sequences[u][:p] for u, p in zip(self.users, self.positions)]

    def items(self, data: SequentialData) -> np.ndarray:
        return np.array([data.sequences[u][p] for u, p in zip(self.users, self.positions)], dtype=np.int64)


def sample_targets(
    data: SequentialData,
    titles: Titles,
    targets_per_user: int = 1,
    seed: int = 0,
    users: Sequence[int] | None = None,
) -> tuple[TrainingTargets, int]:
    """Draw up to ``targets_per_user`` training positions per user, without replacement.

    A position qualifies when its item has a title and at least one titled item comes before it,
    both inside the training part ``seq[:-2]``.

    Returns:
        the targets (in user order, positions ascending), and the number of training positions
        passed over because their item has no title.
    """
    rng = np.random.default_rng(seed)
    out_users: list[int] = []
    out_pos: list[int] = []
    untitled = 0
    for u in range(data.n_users) if users is None else users:
        train = data.sequences[u][:-2]  # training part: validation and test items excluded
        has_title = np.array([int(i) in titles for i in train], dtype=bool)
        untitled += int((~has_title[1:]).sum())
        titled_before = np.cumsum(has_title) - has_title  # titled items strictly before each position
        ok = np.flatnonzero(has_title & (titled_before > 0))
        if ok.size == 0:
            continue
        picked = np.sort(rng.choice(ok, size=min(targets_per_user, ok.size), replace=False))
        out_users.extend([u] * len(picked))
        out_pos.extend(picked.tolist())
    return TrainingTargets(np.array(out_users, dtype=np.int64), np.array(out_pos, dtype=np.int64)), untitled


@dataclass
class Pair:
    """One preference pair (TRL's columns ``prompt``, ``chosen``, ``rejected``) and its provenance."""

    prompt: str
    chosen: str
    rejected: str
    user: int  # row index into data.sequences
    position: int  # index of the target in the user's sequence (always in the training part)
    target: int  # item id of chosen
    rejected_item: int  # item id of rejected
    n_dropped: int  # oldest items dropped from the prompt to fit the context


@dataclass
class PairSet:
    """Training pairs and counts of what was skipped or truncated.

    ``stats``: ``n_pairs``; ``untitled_targets`` (training positions skipped for lack of a title);
    ``untitled_in_prompts`` (untitled items left out of prompts); ``truncated_prompts`` and
    ``items_dropped`` (prompts cut to fit the context, and how many items they lost);
    ``missing_titles`` (catalogue items without a title).
    """

    pairs: list[Pair]
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def columns(self) -> dict[str, list[str]]:
        """``{"prompt": [...], "chosen": [...], "rejected": [...]}`` for ``datasets.Dataset.from_dict``."""
        return {
            "prompt": [p.prompt for p in self.pairs],
            "chosen": [p.chosen for p in self.pairs],
            "rejected": [p.rejected for p in self.pairs],
        }


def _prompt_stats(prompts: Sequence[Prompt]) -> dict[str, int]:
    return {
        "untitled_in_prompts": sum(p.n_untitled for p in prompts),
        "truncated_prompts": sum(p.n_dropped > 0 for p in prompts),
        "items_dropped": sum(p.n_dropped for p in prompts),
    }


class _WrongItems:
    """Which items may be a rejected answer for a given target and prompt."""

    def __init__(self, titles: Titles, n_items: int) -> None:
        self.titles = titles
        self.titled = np.zeros(n_items + 1, dtype=bool)
        self.titled[list(titles.titles)] = True
        self.by_title: dict[str, list[int]] = {}
        for item, title in titles.titles.items():
            self.by_title.setdefault(title, []).append(item)

    def excluded(self, target: int, shown: Sequence[int]) -> set[int]:
        return {target, *self.by_title[self.titles[target]], *shown}


def _sample_rejected(
    rng: np.random.Generator, weights: np.ndarray, excluded: set[int], what: str
) -> int:
    """Draw an item with probability proportional to ``weights`` (index = item id), skipping ``excluded``."""
    p = weights / weights.sum()
    for _ in range(100):
        for c in rng.choice(len(weights), size=16, p=p).tolist():
            if c not in excluded:
                return c
    raise DataError(f"could not draw a {what} rejected item outside the excluded ones: too few candidates")


def _hard_scores(
    scores: ScoreFn | np.ndarray | torch.Tensor, histories: list[np.ndarray], data: SequentialData, batch_size: int
) -> torch.Tensor:
    """(N, n_items + 1) scores of every item after each history."""
    n, width = len(histories), data.n_items + 1
    if isinstance(scores, (np.ndarray, torch.Tensor)):
        matrix = torch.as_tensor(scores)
        if tuple(matrix.shape) != (n, width):
            raise ValueError(
                f"score matrix must be (n_targets, n_items + 1) = ({n}, {width}), one row per training target "
                f"in the order of sample_targets, column 0 = padding; got {tuple(matrix.shape)}"
            )
        return matrix.float()
    if not callable(scores):
        raise TypeError(f"scores must be a score function or a matrix, got {type(scores).__name__}")
    rows = []
    for start in range(0, n, batch_size):
        items, lengths = pad_right(histories[start : start + batch_size], data.max_len)
        with torch.no_grad():
            out = scores(items, lengths)
        if tuple(out.shape) != (len(lengths), width):
            raise ValueError(
                f"the score function returned {tuple(out.shape)}; expected (batch, n_items + 1) = "
                f"({len(lengths)}, {width}). Was the model trained on this dataset?"
            )
        rows.append(out.detach().float().cpu())
    return torch.cat(rows) if rows else torch.empty(0, width)


def build_pairs(
    data: SequentialData,
    builder: PromptBuilder,
    config: PairConfig | None = None,
    scores: ScoreFn | np.ndarray | torch.Tensor | None = None,
    users: Sequence[int] | None = None,
    targets: TrainingTargets | None = None,
) -> PairSet:
    """Training preference pairs from the training parts of ``data``.

    Args:
        data: the dataset (leave-one-out: only ``seq[:-2]`` of each user is used).
        builder: writes the prompts (it holds the titles and the tokenizer).
        config: strategy, targets per user, seed.
        scores: for strategy "hard": a score function or an (n_targets, n_items + 1) matrix whose
            rows follow ``targets`` (then pass ``targets`` too, from ``sample_targets``).
        users: restrict to these users (row indices); ``None`` = all.
        targets: reuse targets drawn by ``sample_targets`` (needed with a score matrix).

    Returns:
        a ``PairSet`` with one pair per target.
    """
    config = config or PairConfig()
    titles = builder.titles
    if config.strategy == "hard" and scores is None:
        raise ValueError("strategy 'hard' needs scores: a trained model's score(items, lengths) or a score matrix")
    if isinstance(scores, (np.ndarray, torch.Tensor)) and targets is None:
        raise ValueError("a score matrix must come with the targets its rows follow: pass targets=sample_targets(...)[0]")
    untitled_targets = 0
    if targets is None:
        targets, untitled_targets = sample_targets(data, titles, config.targets_per_user, config.seed, users)
    rng = np.random.default_rng([config.seed, 1])
    wrong = _WrongItems(titles, data.n_items)
    histories = targets.histories(data)
    target_items = targets.items(data)
    prompts = [builder(h) for h in histories]

    if config.strategy == "uniform":
        weights = wrong.titled.astype(np.float64)
    elif config.strategy == "popularity":
        counts = np.bincount(np.concatenate(data.train_sequences()), minlength=data.n_items + 1)
        weights = (counts * wrong.titled).astype(np.float64)
    else:
        score_matrix = _hard_scores(scores, histories, data, config.score_batch_size)

    pairs = []
    for k, (user, position, target, prompt) in enumerate(zip(targets.users, targets.positions, target_items, prompts)):
        excluded = wrong.excluded(int(target), prompt.items if config.exclude_history else ())
        if config.strategy == "hard":
            row = score_matrix[k].clone()
            row[~torch.from_numpy(wrong.titled)] = float("-inf")  # padding (column 0) is untitled too
            row[list(excluded)] = float("-inf")
            rejected = int(row.argmax())
            if not torch.isfinite(row[rejected]):
                raise DataError(f"no wrong item left to reject for user {int(user)}: every item is excluded")
        else:
            rejected = _sample_rejected(rng, weights, excluded, config.strategy)
        pairs.append(
            Pair(
                prompt=prompt.text,
                chosen=titles[int(target)],
                rejected=titles[rejected],
                user=int(user),
                position=int(position),
                target=int(target),
                rejected_item=rejected,
                n_dropped=prompt.n_dropped,
            )
        )
    stats = {"n_pairs": len(pairs), "untitled_targets": untitled_targets, "missing_titles": titles.n_missing}
    stats.update(_prompt_stats(prompts))
    return PairSet(pairs=pairs, stats=stats)


@dataclass
class EvalPrompts:
    """Test-time prompts: one per user, history = everything before the test item.

    ``stats``: ``n_users``, ``untitled_targets`` (users skipped: their test item has no title),
    ``no_titled_history`` (users skipped: no titled item before the test item), and the prompt
    counts of ``PairSet``.
    """

    users: np.ndarray  # (U,) row indices into data.sequences
    targets: np.ndarray  # (U,) test item ids
    prompts: list[Prompt]
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)


def build_eval_prompts(
    data: SequentialData, builder: PromptBuilder, users: Sequence[int] | None = None
) -> EvalPrompts:
    """One prompt per user ending just before the test item (validation item included)."""
    titles = builder.titles
    keep_users, keep_targets, prompts = [], [], []
    untitled_targets = no_history = 0
    for u in range(data.n_users) if users is None else users:
        seq = data.sequences[u]
        history, target = seq[:-1], int(seq[-1])
        if target not in titles:
            untitled_targets += 1
            continue
        if not any(int(i) in titles for i in history):
            no_history += 1
            continue
        keep_users.append(int(u))
        keep_targets.append(target)
        prompts.append(builder(history))
    stats = {"n_users": len(prompts), "untitled_targets": untitled_targets, "no_titled_history": no_history}
    stats.update(_prompt_stats(prompts))
    return EvalPrompts(
        users=np.array(keep_users, dtype=np.int64),
        targets=np.array(keep_targets, dtype=np.int64),
        prompts=prompts,
        stats=stats,
    )
