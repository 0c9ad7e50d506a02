"""Study 04: an LLM recommender trained with ORPO (Table 4, Figure 5).

A causal language model reads a user's most recent item titles and names the next item
(``paperlib.llm``). It is trained on preference pairs from the training part of the leave-one-out
split with ORPO (Hong et al. 2024), and, as the baseline, with SFT on the same pairs for the same
number of steps and examples. Every model is then scored on the same test users:

* protocol (a), "sampled": the true test item among itself and ``n_negatives`` (19) items the user
  never chose, drawn uniformly;
* protocol (b), "re-rank": Mamba4Rec's top ``rerank_k`` (20) items re-ordered by the LLM; a true
  item outside the list is a miss whatever the order.

The rows of Table 4: popularity, Mamba4Rec alone, the LLM zero-shot, after SFT and after ORPO,
under both protocols (the last row of (b) is "Mamba4Rec + ORPO re-ranking"). HR@1/5/10 and NDCG@5/10
come from ``paperlib.metrics``.

The Mamba4Rec the study needs (hard negatives, the re-ranked lists, its Table 4 rows) is trained
here with :func:`paperlib.train.fit` and checkpointed under
``<checkpoints>/orpo/<preset>/<dataset>/mamba4rec-<key>/`` (``paths.checkpoints_dir``), the key
naming its settings and training code, so a rerun resumes an interrupted training and reuses a
finished one.

Costs that sized the ``quick`` preset, measured on ML-1M with one CPU thread on a busy 2-core
machine (SmolLM2-135M with LoRA, prompts of about 175 tokens): one ORPO step of 8 pairs 21-49 s (the
load varied), one SFT step about 15 s; scoring the 20 candidates of one user 3.4-4.7 s (the prompt
runs once and its key/value cache is shared by the candidates); one Mamba4Rec epoch over ML-1M
(480 steps) about 180 s of training and 34 s of validation. An ORPO step of 8 pairs in one pass
peaks at about 10 GB of memory, in two micro-batches of 4 at about 7 GB. Under protocol (b) only the
users whose true item is in the list are scored: the others are misses whatever the LLM says.

The learning rate of ``quick`` (1e-3 with LoRA) comes from a probe on ML-1M: after 12 ORPO steps of
8 pairs, the share of 40 held-out pairs whose chosen title was the more likely went from 0.675 to
0.75 at 1e-3 and stayed at 0.675 at 2e-4 (the library's LoRA default), with no sign of divergence.

From these, the ``quick`` preset (256 pairs, so 32 steps each of ORPO and SFT; 200 test users; two
Mamba4Rec epochs) takes 70-95 minutes of such single-thread time: loading 2, Mamba4Rec 8, ORPO
11-26, SFT 8, scoring 35-47 under (a) and about 6 under (b). Two threads on a quiet 2-core machine
should about halve it; ``test_users`` sets half of it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from paperlib import paths, results
from paperlib.config import StudyParams
from paperlib.data import DATASETS, DataError, SequentialData, load_dataset, load_titles, pad_right
from paperlib.fields import ConfigError, param
from paperlib.metrics import metrics_from_ranks
from paperlib.runtime import atomic_write, run_key
from paperlib.studies import Study
# Mamba4Rec as the quality study trains it: its dropout on Amazon, the code its run keys cover
from paperlib.studies.quality import AMAZON_MAMBA_DROPOUT, QUALITY_CODE, _log_epochs_to_stdout

#: cut-offs of every ranking; Table 4 shows HR@1/5/10 and NDCG@5/10
KS: tuple[int, ...] = (1, 5, 10)
TABLE_METRICS: tuple[str, ...] = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10")
#: the LLM's three states, in the order they are evaluated
STAGES: tuple[str, ...] = ("zero_shot", "orpo", "sft")
STAGE_NAMES: dict[str, str] = {"zero_shot": "zero-shot", "sft": "after SFT", "orpo": "after ORPO"}
#: row order and labels of Table 4, per protocol
ROWS: dict[str, list[tuple[str, str]]] = {
    "sampled": [("popularity", "Popularity"), ("mamba4rec", "Mamba4Rec alone"), ("zero_shot", "LLM zero-shot"),
                ("sft", "LLM after SFT"), ("orpo", "LLM after ORPO")],
    "rerank": [("mamba4rec", "Mamba4Rec alone"), ("popularity", "Mamba4Rec + popularity re-ranking"),
               ("zero_shot", "Mamba4Rec + zero-shot re-ranking"), ("sft", "Mamba4Rec + SFT re-ranking"),
               ("orpo", "Mamba4Rec + ORPO re-ranking")],
}
#: tokens kept free for the answer when a prompt's budget follows from the context or max_length
ANSWER_TOKENS = 64


def titles_missing(dataset: str) -> str | None:
    """Why ``dataset`` would load without item titles, or None if it has them (or may have them).

    Looks at the file layout it would be loaded from: the one found in ``$PAPERLIB_DATA`` or the
    cache, else the one its automatic download makes (files are only looked at, nothing is read or
    downloaded). A layout with titles whose title file is absent is reported later, by
    :func:`compute`, which names the file.
    """
    from paperlib.data.download import find_layout, search_folders

    spec = DATASETS[dataset]
    for folder in search_folders(dataset):
        found = find_layout(spec, folder)
        if found is not None:
            layout, where = found.layout, f"its files in {folder}/ are"
            break
    else:
        downloads = {d.filename for d in spec.downloads}
        layout = next((lay for lay in spec.layouts if lay.interactions.name in downloads), None)
        where = "the file it downloads is"
        if layout is None:
            return None
    if layout.titles:
        return None
    with_titles = "; ".join(lay.describe() for lay in spec.layouts if lay.titles)
    others = [name for name in DATASETS if name != dataset and any(lay.titles for lay in DATASETS[name].layouts)]
    return (f"dataset {dataset!r} has no item titles, and the LLM recommender reads and writes item titles: {where} "
            f"{layout.interactions.describe()} ({layout.note}), a format without titles. Put files of a layout "
            f"with titles into $PAPERLIB_DATA/{dataset}/ ({with_titles}), or choose another dataset: "
            f"{', '.join(others)}.")


@dataclass
class OrpoParams(StudyParams):
    """Parameters of ``04_orpo`` (defaults: the ``quick`` preset)."""

    dataset: str = param("ml-1m", "a dataset with item titles: ml-1m, amazon-beauty or ml-100k (amazon-video-games "
                         "only from its official files)",
                         choices=tuple(DATASETS))
    model_source: str = param("smollm2", "the causal LM: smollm2 (SmolLM2-135M-Instruct, bundled), tiny (a random "
                              "tiny Llama, smoke runs only), a Hugging Face id or a local folder")
    lora: str = param("auto", "train LoRA adapters instead of all weights: auto (on without a GPU), on or off",
                      choices=("auto", "on", "off"))
    lora_r: int = param(16, "LoRA rank; its alpha is twice the rank", min=1)
    n_recent: int = param(10, "most recent titled items a prompt shows, oldest first", min=1)
    max_title_chars: int = param(120, "longer titles are clipped at a word boundary", min=8)
    max_prompt_tokens: int = param(0, "token budget of a prompt (its oldest items are dropped beyond it); 0 for "
                                   "the model's context or max_length, whichever is smaller, less 64", min=0)
    strategy: str = param("uniform", "how a pair's rejected title is chosen: uniform, popularity, or hard "
                          "(Mamba4Rec's highest-scored wrong item)", choices=("uniform", "popularity", "hard"))
    train_users: int = param(256, "users whose training part gives the preference pairs; 0 for all", min=0)
    targets_per_user: int = param(1, "training targets (pairs) drawn per user", min=1)
    batch_size: int = param(8, "pairs (ORPO) or examples (SFT) per optimiser step", min=1)
    micro_batch_size: int = param(4, "pairs or examples per forward pass, a divisor of batch_size (gradients are "
                                  "accumulated): less memory, the same steps; 0 for batch_size", min=0)
    max_steps: int = param(0, "optimiser steps of ORPO and of SFT alike; 0 for one pass over the pairs", min=0)
    lr: float = param(0.001, "learning rate of ORPO and SFT, large for a short LoRA run; 0 for 2e-4 with LoRA and "
                      "5e-6 without", min=0.0)
    beta: float = param(0.1, "λ, the weight of ORPO's odds-ratio term (0.1 as in the ORPO paper)", min=0.0)
    max_length: int = param(512, "longest prompt + answer in tokens during training", min=96)
    test_users: int = param(200, "users scored on their test item, the same for every row; 0 for all", min=0)
    n_negatives: int = param(19, "protocol (a): the true item and this many items the user never chose", min=9)
    rerank_k: int = param(20, "protocol (b): length of Mamba4Rec's list that the LLM re-orders", min=10)
    n_examples: int = param(3, "test users whose prompt and top choices the notebook shows", min=0)
    mamba_epochs: int = param(2, "Mamba4Rec's maximum epochs", min=1)
    mamba_patience: int = param(10, "Mamba4Rec stops after more than this many epochs without a better validation "
                                "NDCG@10", min=0)
    mamba_batch_size: int = param(2048, "Mamba4Rec's (prefix, target) pairs per step, as RecBole's "
                                  "train_batch_size", min=1)
    mamba_lr: float = param(0.001, "Mamba4Rec's Adam learning rate", min=0.0)
    mamba_max_steps_per_epoch: int = param(0, "cap on Mamba4Rec's steps per epoch, 0 for none (smoke runs)", min=0)
    max_users: int = param(0, "use a random subset of this many users for everything, 0 for all (smoke runs)", min=0)
    seed: int = param(0, "seeds the user draws, pairs, sampled candidates and the LLM runs", min=0)
    device: str = param("auto", "auto (CUDA when present), cpu or cuda", choices=("auto", "cpu", "cuda"))
    resume: bool = param(True, "reuse the Mamba4Rec trained earlier with the same settings and code, or resume it")

    def validate(self) -> None:
        problem = titles_missing(self.dataset)
        if problem:
            raise ConfigError(problem)
        if not self.model_source.strip():
            raise ConfigError("model_source is empty: give smollm2, tiny, a Hugging Face id or a local folder")
        if 0 < self.micro_batch_size < self.batch_size and self.batch_size % self.micro_batch_size:
            raise ConfigError(f"micro_batch_size {self.micro_batch_size} does not divide batch_size {self.batch_size}: "
                              "choose a divisor (or 0 for one pass per batch)")
        if self.max_prompt_tokens and self.max_prompt_tokens + 8 > self.max_length:
            raise ConfigError(f"max_prompt_tokens {self.max_prompt_tokens} leaves no room for the answer within "
                              f"max_length {self.max_length}: lower it or raise max_length")


# --------------------------------------------------------------------------------------------
# compute


def compute(cfg: OrpoParams, progress: bool = True) -> dict:
    """Run the study and write its results JSON; returns the JSON as loaded.

    Order: data and titles, the LLM, the evaluation prompts (so that a bad dataset or model fails
    before anything is trained), Mamba4Rec, the training pairs, then the LLM zero-shot, after ORPO
    and (from a fresh copy) after SFT, and the popularity and Mamba4Rec rows.
    """
    from paperlib import llm

    started, t0 = results.now_iso(), time.perf_counter()
    say = print if progress else (lambda *args, **kwargs: None)

    data = load_dataset(cfg.dataset)
    if cfg.max_users:
        data = data.subset(cfg.max_users, seed=cfg.seed)
    if not data.titles:
        load_titles(cfg.dataset)  # a DataError that names the missing title file and where to put it
    titles = llm.item_titles(data, cfg.max_title_chars)
    say(f"{cfg.dataset}: {data.n_users:,} users, {data.n_items:,} items, {titles.n_missing:,} without a title")
    lm = llm.load_llm(llm_config(cfg))  # LLMLoadError saying how to provide the weights
    lm_summary = lm.summary()
    say(f"LLM {cfg.model_source}: {lm.n_params:,} parameters, {lm.n_trainable:,} trained (LoRA: {lm.lora})")
    builder = prompt_builder(lm, titles, cfg)
    test_users = draw_users(data.n_users, cfg.test_users, [cfg.seed, 1])
    prompts = llm.build_eval_prompts(data, builder, users=test_users)
    if not len(prompts):
        raise DataError("no test user has a titled test item and a titled item before it: nothing to evaluate")

    mamba, mamba_info = train_mamba4rec(cfg, data, progress)
    device = next(mamba.parameters()).device

    def score(items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return mamba.score(items.to(device), lengths.to(device))

    train_users = draw_users(data.n_users, cfg.train_users, [cfg.seed, 2])
    pair_config = llm.PairConfig(strategy=cfg.strategy, targets_per_user=cfg.targets_per_user, seed=cfg.seed)
    pairs = llm.build_pairs(data, builder, pair_config, scores=score if cfg.strategy == "hard" else None,
                            users=train_users)
    if not len(pairs):
        raise DataError(f"no training pair from the {len(train_users)} training users: their training parts hold "
                        "no titled item with a titled item before it")
    steps = cfg.max_steps or math.ceil(len(pairs) / cfg.batch_size)
    micro = min(cfg.micro_batch_size or cfg.batch_size, cfg.batch_size)
    train_config = llm.TrainConfig(max_steps=steps, batch_size=micro,
                                   gradient_accumulation_steps=cfg.batch_size // micro,
                                   learning_rate=cfg.lr or None, beta=cfg.beta, max_length=cfg.max_length,
                                   seed=cfg.seed)
    say(f"{len(pairs)} pairs ({cfg.strategy} rejected items); ORPO and SFT: {steps} steps of {cfg.batch_size}; "
        f"{len(prompts)} test users")

    top = llm.top_k(score, data, prompts.users, k=cfg.rerank_k)
    rows: dict[str, dict] = {}
    score_tables: dict[str, np.ndarray] = {}
    training: dict[str, dict] = {}
    candidates = np.empty(0)
    for stage in STAGES:
        if stage == "sft":  # a fresh copy: SFT starts from the weights ORPO started from
            lm = None  # let the ORPO-trained model go before loading another
            lm = llm.load_llm(llm_config(cfg))
        if stage in ("orpo", "sft"):
            say(f"training with {stage.upper()}...")
            train = llm.train_orpo if stage == "orpo" else llm.train_sft
            training[stage] = train(lm, pairs, train_config).to_dict()  # curves, steps, examples, seconds
            done = training[stage]
            say(f"  {done['steps']} steps in {done['seconds']:.0f} s, last loss {done['curves']['loss'][-1]:.4f}")
        say(f"scoring the test users ({stage})...")
        rows[stage], score_tables[stage], candidates = evaluate_llm(lm, data, prompts, titles, top, cfg)
        say(f"  NDCG@10: (a) {rows[stage]['sampled']['metrics']['ndcg@10']:.4f}, "
            f"(b) {rows[stage]['rerank']['metrics']['ndcg@10']:.4f}")
    del lm

    popularity = np.bincount(np.concatenate(data.train_sequences()), minlength=data.n_items + 1).astype(np.float64)
    rows["popularity"] = baseline_rows(popularity[candidates], popularity[top], prompts.targets, top)
    rows["mamba4rec"] = baseline_rows(candidate_scores(score, data, prompts.users, candidates), None,
                                      prompts.targets, top)

    payload = {
        "dataset": {"name": cfg.dataset, "users": data.n_users, "items": data.n_items,
                    "titled_items": len(titles.titles), "missing_titles": titles.n_missing},
        "llm": {**lm_summary, "learning_rate": training["orpo"]["config"]["learning_rate"]},
        "prompts": {
            "max_prompt_tokens": builder.max_prompt_tokens,
            "train": pairs.stats,
            "test": {**prompts.stats, "requested": len(test_users)},
            "mean_tokens": {"train": float(np.mean([prompt_tokens(builder, p.prompt) for p in pairs.pairs])),
                            "test": float(np.mean([p.n_tokens for p in prompts.prompts]))},
        },
        "pairs": [{"user": p.user, "position": p.position, "length": len(data.sequences[p.user]), "target": p.target,
                   "rejected": p.rejected_item, "n_dropped": p.n_dropped} for p in pairs.pairs],
        "mamba4rec": mamba_info,
        "training": training,
        "evaluation": {
            "users": prompts.users, "targets": prompts.targets, "ks": list(KS),
            "n_negatives": cfg.n_negatives, "rerank_k": cfg.rerank_k,
            "candidates": candidates, "top": top,
            "true_in_list": int(sum(int(t) in row for t, row in zip(prompts.targets, top.tolist()))),
            "rows": rows,
        },
        "examples": examples(cfg.n_examples, prompts, titles, candidates, score_tables),
    }
    results.save_results(STUDY.name, cfg.preset, cfg.to_dict(), payload, output_dir=cfg.output_dir,
                         wall_seconds=time.perf_counter() - t0, started=started)
    return STUDY.load(cfg)


def llm_config(cfg: OrpoParams):
    """The ``paperlib.llm.LLMConfig`` of the parameters."""
    from paperlib import llm

    lora = {"auto": None, "on": True, "off": False}[cfg.lora]
    return llm.LLMConfig(source=cfg.model_source, lora=lora, lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r,
                         device=None if cfg.device == "auto" else cfg.device)


def prompt_builder(lm, titles, cfg: OrpoParams):
    """Prompts of at most ``max_prompt_tokens`` tokens; by default the model's context or the
    training ``max_length``, whichever is smaller, less room for the answer."""
    from paperlib import llm

    budget = cfg.max_prompt_tokens or min(lm.context_length, cfg.max_length) - ANSWER_TOKENS
    config = llm.PromptConfig(n_recent=cfg.n_recent, max_title_chars=cfg.max_title_chars,
                              answer_tokens=ANSWER_TOKENS, max_prompt_tokens=budget)
    return llm.PromptBuilder(lm.tokenizer, titles, config, lm.context_length)


def prompt_tokens(builder, text: str) -> int:
    from paperlib.llm.prompts import encode_prompt

    return len(encode_prompt(builder.tokenizer, text))


def draw_users(n_users: int, n: int, seed: list[int]) -> np.ndarray:
    """``n`` distinct users (row indices) drawn with ``seed``, in ascending order; all if ``n`` is 0
    or at least ``n_users``."""
    if n == 0 or n >= n_users:
        return np.arange(n_users)
    return np.sort(np.random.default_rng(seed).choice(n_users, size=n, replace=False))


def train_mamba4rec(cfg: OrpoParams, data: SequentialData, progress: bool = True):
    """Mamba4Rec trained with the paper's recipe (batch of ``mamba_batch_size`` pairs, Adam at
    ``mamba_lr``, early stopping on validation NDCG@10); returns the model with its best weights,
    in eval mode, and a JSON-friendly record.

    With ``resume``, a run finished earlier with the same settings and code is loaded from its
    checkpoint, and an interrupted one continues from its last epoch.
    """
    import json

    from paperlib.models import build_model
    from paperlib.train import TrainConfig, fit, load_checkpoint, resolve_device

    overrides = {"dropout": AMAZON_MAMBA_DROPOUT} if cfg.dataset.startswith("amazon") else {}
    model = build_model("mamba4rec", n_items=data.n_items, max_len=data.max_len, seed=cfg.seed, **overrides)
    config = TrainConfig(epochs=cfg.mamba_epochs, batch_size=cfg.mamba_batch_size, lr=cfg.mamba_lr,
                         patience=cfg.mamba_patience, seed=cfg.seed, device=cfg.device,
                         max_steps_per_epoch=cfg.mamba_max_steps_per_epoch or None)
    key = run_key(asdict(model.config), config.to_dict(), data.name, data.n_users, code=QUALITY_CODE)
    where = (STUDY.name, cfg.preset, cfg.dataset, f"mamba4rec-{key}")
    folder = paths.checkpoints_dir().joinpath(*where)
    record = folder / "fit.json"
    if cfg.resume and record.is_file() and (folder / "best.pt").is_file():
        info = json.loads(record.read_text(encoding="utf-8"))
        model = load_checkpoint(folder / "best.pt", map_location=resolve_device(cfg.device))
        if progress:
            print(f"Mamba4Rec: trained earlier with the same settings and code, loaded from {'/'.join(where)}")
        return model, {**info, "reused": True}
    if progress:
        _log_epochs_to_stdout()
        print(f"training Mamba4Rec ({cfg.mamba_epochs} epochs at most; checkpoints in {'/'.join(where)})")
    fitted = fit(model, data, config, checkpoint_dir=folder, resume=cfg.resume, progress=progress)
    info = {
        "key": key, "checkpoint": "/".join(where), "model_config": fitted.model_config,
        "train_config": fitted.train_config, "best_epoch": fitted.best_epoch, "test": fitted.test,
        "pairs_per_epoch": fitted.pairs_per_epoch,
        "history": [{k: h[k] for k in ("epoch", "train_loss", "steps", "pairs", "train_seconds", "eval_seconds")}
                    | {"valid_ndcg@10": h["valid"]["ndcg@10"], "valid_hr@10": h["valid"]["hr@10"]}
                    for h in fitted.history],
    }
    with atomic_write(record) as fh:
        json.dump(info, fh, indent=1)
    return model.eval(), {**info, "reused": False}


def _row(ranks: np.ndarray, seconds: float, scored_users: int) -> dict[str, Any]:
    ranks = np.asarray(ranks, dtype=np.int64)
    return {"ranks": ranks.tolist(), "metrics": metrics_from_ranks(ranks, KS), "seconds": round(float(seconds), 3),
            "scored_users": int(scored_users)}


def evaluate_llm(lm, data: SequentialData, prompts, titles, top: np.ndarray, cfg: OrpoParams):
    """The LLM's ranks under both protocols.

    Returns:
        ``{"sampled": row, "rerank": row}`` (``row``: ranks per user, metrics, seconds, users
        scored), the (U, 1 + n_negatives) score table of protocol (a) and its candidates (true
        item in column 0; the same for every model, being seeded).
    """
    from paperlib import llm

    sampled = llm.rank_sampled(lm.model, lm.tokenizer, data, prompts, titles, n_negatives=cfg.n_negatives,
                               seed=cfg.seed, ks=KS)
    # protocol (b): a user whose true item is not in the list is a miss whatever the LLM says, so
    # only the others are scored
    inside = np.flatnonzero([int(t) in row for t, row in zip(prompts.targets, top.tolist())])
    ranks = np.full(len(prompts), top.shape[1] + 1, dtype=np.int64)
    seconds = 0.0
    if inside.size:
        subset = llm.EvalPrompts(users=prompts.users[inside], targets=prompts.targets[inside],
                                 prompts=[prompts.prompts[i] for i in inside])
        reranked = llm.rerank(lm.model, lm.tokenizer, subset, titles, top[inside], ks=KS)
        ranks[inside], seconds = reranked.ranks, reranked.seconds
    rows = {"sampled": _row(sampled.ranks, sampled.seconds, len(prompts)), "rerank": _row(ranks, seconds, inside.size)}
    return rows, sampled.scores, sampled.candidates


@torch.no_grad()
def candidate_scores(score, data: SequentialData, users: np.ndarray, candidates: np.ndarray,
                     batch_size: int = 256) -> np.ndarray:
    """(U, C) scores of each user's candidates by a sequential model after the test history."""
    out = []
    for start in range(0, len(users), batch_size):
        histories = [data.sequences[u][:-1] for u in users[start:start + batch_size]]
        items, lengths = pad_right(histories, data.max_len)
        full = score(items, lengths).float().cpu().numpy()
        out.append(np.take_along_axis(full, candidates[start:start + batch_size], axis=1))
    return np.concatenate(out).astype(np.float64)


def ranks_in_lists(scores: np.ndarray, true_col: np.ndarray) -> np.ndarray:
    """1-based rank of column ``true_col[u]`` in row ``u`` of ``scores``, ties counted against it
    (as ``paperlib.metrics``); ``true_col = -1`` (not in the list) is a miss, rank C + 1."""
    n_users, n_cand = scores.shape
    ranks = np.full(n_users, n_cand + 1, dtype=np.int64)
    for u in np.flatnonzero(true_col >= 0):
        t = true_col[u]
        ranks[u] = 1 + int((np.delete(scores[u], t) >= scores[u, t]).sum())
    return ranks


def baseline_rows(sampled_scores: np.ndarray, list_scores: np.ndarray | None, targets: np.ndarray,
                  top: np.ndarray) -> dict[str, dict]:
    """Rows of a model that scores items directly (popularity, Mamba4Rec).

    Args:
        sampled_scores: (U, C) its scores of protocol (a)'s candidates (true item in column 0).
        list_scores: (U, K) its scores of Mamba4Rec's lists; ``None`` keeps the lists' own order
            (Mamba4Rec alone).
    """
    sampled = ranks_in_lists(sampled_scores, np.zeros(len(targets), dtype=np.int64))
    true_col = np.array([row.index(int(t)) if int(t) in row else -1 for t, row in zip(targets, top.tolist())])
    if list_scores is None:
        rerank = np.where(true_col >= 0, true_col + 1, top.shape[1] + 1)
    else:
        rerank = ranks_in_lists(list_scores, true_col)
    return {"sampled": _row(sampled, 0.0, len(targets)), "rerank": _row(rerank, 0.0, len(targets))}


def examples(n: int, prompts, titles, candidates: np.ndarray, tables: dict[str, np.ndarray],
             n_top: int = 3) -> list[dict[str, Any]]:
    """The first ``n`` test users: their prompt, the true next item, and each stage's top choices
    among protocol (a)'s candidates with the true item's rank."""
    out = []
    for i in range(min(n, len(prompts))):
        prompt = prompts.prompts[i]
        choices = {}
        for stage, table in tables.items():
            order = np.argsort(-table[i], kind="stable")[:n_top]
            choices[stage] = {"top": [titles[int(candidates[i, c])] for c in order],
                              "rank": int(ranks_in_lists(table[i:i + 1], np.zeros(1, dtype=np.int64))[0])}
        out.append({"user": int(prompts.users[i]), "prompt": prompt.text, "history": [titles[j] for j in prompt.items],
                    "n_dropped": prompt.n_dropped, "target": titles[int(prompts.targets[i])], "choices": choices})
    return out


# --------------------------------------------------------------------------------------------
# tables, text and figures, from the results JSON alone


def protocol_label(doc: dict, protocol: str) -> str:
    """How Table 4 names a protocol, with its sizes from the results."""
    ev = doc["results"]["evaluation"]
    if protocol == "sampled":
        return f"(a) true item + {ev['n_negatives']} sampled"
    return f"(b) re-rank Mamba4Rec's top-{ev['rerank_k']}"


def table4(doc: dict) -> pd.DataFrame:
    """Table 4: HR@1/5/10 and NDCG@5/10 of every row under both protocols, on the same test users."""
    rows = doc["results"]["evaluation"]["rows"]
    out = {}
    for protocol, names in ROWS.items():
        for name, label in names:
            entry = rows[name][protocol]
            cells = {m.upper(): f"{entry['metrics'][m]:.4f}" for m in TABLE_METRICS}
            cells["users"] = len(entry["ranks"])
            out[(protocol_label(doc, protocol), label)] = cells
    table = pd.DataFrame.from_dict(out, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["protocol", "model"])
    return table


def per_user_ndcg(ranks: list[int], k: int = 10) -> np.ndarray:
    """NDCG@k of each user from the true item's rank (one relevant item: 1/log2(rank + 1))."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)


def compare(doc: dict, protocol: str, first: str, second: str, k: int = 10) -> dict[str, float]:
    """Mean NDCG@k of two rows on the same users, their difference and its standard error (over
    users, paired)."""
    rows = doc["results"]["evaluation"]["rows"]
    a, b = (per_user_ndcg(rows[name][protocol]["ranks"], k) for name in (first, second))
    diff = a - b
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"first": float(a.mean()), "second": float(b.mean()), "diff": float(diff.mean()), "se": se,
            "users": len(diff)}


def _verdict(c: dict[str, float], first: str, second: str) -> str:
    beat = "beat" if c["diff"] > 0 else ("tied with" if c["diff"] == 0 else "did not beat")
    if np.isfinite(c["se"]) and c["se"] > 0:
        z = abs(c["diff"]) / c["se"]
        sure = ("more than two standard errors" if z > 2 else
                f"within two standard errors, so not distinguishable on {c['users']} users")
        detail = f"difference {c['diff']:+.4f} ± {c['se']:.4f}, {sure}"
    else:
        detail = f"difference {c['diff']:+.4f}"
    return f"{first} {beat} {second}: NDCG@10 {c['first']:.4f} vs {c['second']:.4f} ({detail})"


def summary(doc: dict) -> str:
    """The text under Table 4, generated from the results: whether ORPO beat SFT and zero-shot
    (protocol a) and whether ORPO re-ranking beat Mamba4Rec alone (protocol b)."""
    ev = doc["results"]["evaluation"]
    n = len(ev["users"])
    lines = [
        f"On the same {n} test users of {doc['results']['dataset']['name']}:",
        "- " + _verdict(compare(doc, "sampled", "orpo", "sft"), "ORPO", "SFT") + ", protocol (a).",
        "- " + _verdict(compare(doc, "sampled", "orpo", "zero_shot"), "ORPO", "the zero-shot LLM") + ", protocol (a).",
        "- " + _verdict(compare(doc, "rerank", "orpo", "mamba4rec"), "Re-ranking with the ORPO model",
                        "Mamba4Rec alone") + ", protocol (b).",
        f"- Under protocol (b) no re-ranking can score more than HR@{ev['rerank_k']} = "
        f"{ev['true_in_list'] / n:.4f}: the true item is in Mamba4Rec's top-{ev['rerank_k']} for "
        f"{ev['true_in_list']} of {n} users.",
    ]
    return "\n".join(lines)


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def setup_text(doc: dict) -> str:
    """What the run used, from the results: dataset and titles, the LLM, the pairs and prompts
    (items without a title and prompts cut to fit their token budget, counted), Mamba4Rec."""
    r, p = doc["results"], doc["params"]
    d, m, tr, te = r["dataset"], r["llm"], r["prompts"]["train"], r["prompts"]["test"]
    orpo, sft = r["training"]["orpo"], r["training"]["sft"]
    mamba = r["mamba4rec"]
    lines = [
        f"- **Dataset** {d['name']}: {d['users']:,} users, {d['items']:,} items; "
        f"{_count(d['missing_titles'], 'item')} without a usable title (missing or empty) are never shown in a "
        "prompt nor used as an answer or a candidate.",
        f"- **LLM** `{m['source']}`: {m['n_params']:,} parameters, {m['n_trainable']:,} trained "
        f"({'LoRA adapters' if m['lora'] else 'all weights'}), context {m['context_length']:,} tokens, "
        f"learning rate {m['learning_rate']:g}.",
        f"- **Training pairs** ({p['strategy']} rejected items): {_count(tr['n_pairs'], 'pair')} from the training "
        f"parts of {p['train_users'] or d['users']:,} users; {_count(tr['untitled_targets'], 'training position')} "
        f"skipped for an untitled item, {_count(tr['untitled_in_prompts'], 'untitled item')} left out of prompts.",
        f"- **Budget**: ORPO {orpo['steps']} steps, {orpo['examples']:,} examples; SFT {sft['steps']} steps, "
        f"{sft['examples']:,} examples (batch {p['batch_size']}, λ {p['beta']:g}).",
        f"- **Test users**: {te['n_users']:,} scored of {te['requested']:,} drawn; "
        f"{_count(te['untitled_targets'], 'user')} skipped for an untitled test item, "
        f"{_count(te['no_titled_history'], 'user')} for a history without titles.",
        f"- **Prompts**: at most {r['prompts']['max_prompt_tokens']} tokens; "
        f"mean {r['prompts']['mean_tokens']['train']:.0f} "
        f"(training) and {r['prompts']['mean_tokens']['test']:.0f} (test) tokens. Too long for the budget, and cut by "
        f"dropping their oldest items: {_count(tr['truncated_prompts'], 'training prompt')} "
        f"({_count(tr['items_dropped'], 'item')} dropped) and {_count(te['truncated_prompts'], 'test prompt')} "
        f"({_count(te['items_dropped'], 'item')} dropped).",
        f"- **Mamba4Rec** ({'loaded from an earlier run' if mamba['reused'] else 'trained in this run'}): "
        f"{len(mamba['history'])} epochs of {mamba['pairs_per_epoch']:,} pairs, best epoch {mamba['best_epoch']}; "
        f"test over all items (full ranking): HR@10 {mamba['test']['hr@10']:.4f}, "
        f"NDCG@10 {mamba['test']['ndcg@10']:.4f}.",
    ]
    return "\n".join(lines)


def assumptions(doc: dict) -> pd.DataFrame:
    """Every setting of the run the paper does not give, with its value and where it comes from."""
    p, r = doc["params"], doc["results"]
    assumed = "assumed, not from the paper"
    rows = [
        ("language model", p["model_source"], f"{assumed} (the paper does not name its LLM)"),
        ("LoRA", f"{'on' if r['llm']['lora'] else 'off'}, rank {p['lora_r']}, alpha {2 * p['lora_r']}",
         f"{assumed}; on by default without a GPU"),
        ("prompt", f"the {p['n_recent']} most recent titled items, oldest first, and an instruction to name the next "
                   "one", assumed),
        ("rejected item", p["strategy"], assumed),
        ("training pairs", f"{p['targets_per_user']} per user, {r['prompts']['train']['n_pairs']} in all", assumed),
        ("steps × batch", f"{r['training']['orpo']['steps']} × {p['batch_size']}", f"{assumed}; SFT gets the same"),
        ("learning rate", f"{r['llm']['learning_rate']:g}",
         f"{assumed}; a large step for a short LoRA run (Mistral-ORPO fine-tuned all weights at 5e-6)"),
        ("λ (beta)", f"{p['beta']:g}", "the ORPO paper's value (Hong et al. 2024)"),
        ("candidate score", "mean log-probability of the title's tokens after the prompt",
         f"{assumed}; the quantity ORPO's odds are built from"),
        ("protocol (a)", f"true item + {p['n_negatives']} items the user never chose, drawn uniformly", assumed),
        ("protocol (b)", f"Mamba4Rec's top-{p['rerank_k']} re-ordered; a true item outside it is a miss", assumed),
        ("Mamba4Rec", f"at most {p['mamba_epochs']} epochs, batch {p['mamba_batch_size']} pairs, lr {p['mamba_lr']:g}",
         "batch and lr as Mamba4Rec/RecBole; the number of epochs assumed, not from the paper"),
        ("test users", f"{len(r['evaluation']['users'])}", assumed),
    ]
    return pd.DataFrame(rows, columns=["setting", "value", "source"]).set_index("setting")


def examples_text(doc: dict) -> str:
    """Example prompts and the top choices before (zero-shot) and after training (SFT, ORPO)
    among protocol (a)'s candidates."""
    ex = doc["results"]["examples"]
    if not ex:
        return "No examples were kept (n_examples is 0)."
    n_cand = 1 + doc["results"]["evaluation"]["n_negatives"]
    parts = ["The first example's prompt as the model reads it:\n\n```text\n" + ex[0]["prompt"].rstrip() + "\n```\n"]
    for k, e in enumerate(ex, start=1):
        dropped = f" ({e['n_dropped']} older items dropped to fit the token budget)" if e["n_dropped"] else ""
        parts.append(f"**Example {k}** (user {e['user']}): the last {len(e['history'])} items{dropped}: "
                     + "; ".join(e["history"]) + f". **True next item: {e['target']}.**\n")
        parts.append(f"| model | top 3 of the {n_cand} candidates | rank of the true item |\n|---|---|---|")
        for stage in ("zero_shot", "sft", "orpo"):
            c = e["choices"][stage]
            parts.append(f"| {STAGE_NAMES[stage]} | {'; '.join(c['top'])} | {c['rank']} |")
        parts.append("")
    return "\n".join(parts)


def costs(doc: dict) -> pd.DataFrame:
    """Measured costs of the run: seconds per training step and per scored user."""
    r = doc["results"]
    rows = r["evaluation"]["rows"]
    out = []
    for stage in ("orpo", "sft"):
        t = r["training"][stage]
        batch = t["config"]["batch_size"] * t["config"]["gradient_accumulation_steps"]
        out.append((f"{stage.upper()} step ({batch} examples)", t["seconds"] / max(t["steps"], 1)))
    for stage in STAGES:
        a, b = rows[stage]["sampled"], rows[stage]["rerank"]
        out.append((f"scoring one user, (a), {STAGE_NAMES[stage]}", a["seconds"] / max(a["scored_users"], 1)))
        if b["scored_users"]:
            out.append((f"scoring one user, (b), {STAGE_NAMES[stage]}", b["seconds"] / b["scored_users"]))
    history = r["mamba4rec"]["history"]
    if history:
        out.append(("Mamba4Rec epoch (training)", float(np.mean([h["train_seconds"] for h in history]))))
        out.append(("Mamba4Rec validation", float(np.mean([h["eval_seconds"] for h in history]))))
    return pd.DataFrame(out, columns=["what", "seconds"]).set_index("what").round(2)


def _smooth(y: np.ndarray) -> np.ndarray:
    """Running mean over about a tenth of the curve (at least one point)."""
    w = max(1, len(y) // 10)
    return np.convolve(y, np.ones(w) / w, mode="valid") if len(y) >= w else y


def figure5(doc: dict):
    """Figure 5: ORPO's training curves (loss, NLL, log odds ratio, rewards of the chosen and
    rejected answers, preference accuracy, reward margin), with SFT's loss beside ORPO's NLL.
    Thin lines: each logged step; thick: a running mean."""
    import matplotlib.pyplot as plt

    results.set_style()
    orpo, sft = doc["results"]["training"]["orpo"]["curves"], doc["results"]["training"]["sft"]["curves"]
    # (title, [(label, curves, key)], reference line: chance or no preference)
    panels = [
        ("loss", [("ORPO: NLL + λ·L_OR", orpo, "loss"), ("SFT", sft, "loss")], None),
        ("NLL of prompt + chosen", [("ORPO", orpo, "nll_loss"), ("SFT", sft, "loss")], None),
        ("log odds ratio (chosen vs rejected)", [("ORPO", orpo, "log_odds_chosen")], 0.0),
        ("reward: λ · mean log p", [("chosen", orpo, "rewards/chosen"), ("rejected", orpo, "rewards/rejected")],
         None),
        ("preference accuracy", [("ORPO", orpo, "rewards/accuracies")], 0.5),
        ("reward margin (chosen − rejected)", [("ORPO", orpo, "rewards/margins")], 0.0),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, lines, reference) in zip(axes.flat, panels):
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle=":", linewidth=1)
        ax.xaxis.get_major_locator().set_params(integer=True)
        for i, (name, curves, key) in enumerate(lines):
            if key not in curves:
                continue
            x, y = np.asarray(curves["step"]), np.asarray(curves[key], dtype=float)
            ax.plot(x, y, color=f"C{i}", alpha=0.3, linewidth=0.8)
            s = _smooth(y)
            ax.plot(x[len(x) - len(s):], s, color=f"C{i}", linewidth=2, label=name)
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# what every results JSON of this study satisfies


def check_results(doc: dict) -> None:
    """Assertions on a results JSON of this study (run on every smoke run)."""
    p, r = doc["params"], doc["results"]
    ev = r["evaluation"]
    users, n = ev["users"], len(ev["users"])
    assert n >= 1 and len(ev["targets"]) == n and len(set(users)) == n
    if p["test_users"]:
        assert n <= p["test_users"]
    assert n + r["prompts"]["test"]["untitled_targets"] + r["prompts"]["test"]["no_titled_history"] == \
        r["prompts"]["test"]["requested"]
    # every row of Table 4 has both protocols, on the same users, with metrics from its ranks
    assert set(ev["rows"]) == {name for names in ROWS.values() for name, _ in names}
    n_cand, k = 1 + p["n_negatives"], p["rerank_k"]
    candidates, top = np.asarray(ev["candidates"]), np.asarray(ev["top"])
    assert candidates.shape == (n, n_cand) and (candidates[:, 0] == ev["targets"]).all()
    assert all(len(set(row)) == n_cand for row in candidates.tolist()), "candidates of a user are distinct"
    assert top.shape == (n, k) and (top >= 1).all()
    in_list = np.array([t in row for t, row in zip(ev["targets"], top.tolist())])
    assert int(in_list.sum()) == ev["true_in_list"]
    for name, entry in ev["rows"].items():
        for protocol, bound in (("sampled", n_cand), ("rerank", k + 1)):
            row = entry[protocol]
            ranks = np.asarray(row["ranks"])
            assert ranks.shape == (n,) and (ranks >= 1).all() and (ranks <= bound).all(), (name, protocol)
            expected = metrics_from_ranks(ranks, KS)
            assert all(abs(row["metrics"][m] - expected[m]) < 1e-12 for m in expected), (name, protocol)
            m = row["metrics"]
            assert m["hr@1"] <= m["hr@5"] <= m["hr@10"] and m["ndcg@5"] <= m["ndcg@10"] <= m["hr@10"]
        # protocol (b): a miss exactly where the true item is not in Mamba4Rec's list
        assert ((np.asarray(entry["rerank"]["ranks"]) == k + 1) == ~in_list).all(), name
    mamba_rerank = np.asarray(ev["rows"]["mamba4rec"]["rerank"]["ranks"])
    assert all(top[u, mamba_rerank[u] - 1] == ev["targets"][u] for u in np.flatnonzero(in_list))
    for stage in STAGES:
        assert ev["rows"][stage]["rerank"]["scored_users"] == ev["true_in_list"]
    # pairs come from the training part only, and never reject the target
    assert len(r["pairs"]) == r["prompts"]["train"]["n_pairs"] >= 1
    for pair in r["pairs"]:
        assert 1 <= pair["position"] <= pair["length"] - 3 and pair["rejected"] != pair["target"]
    # ORPO and SFT got the same budget; the curves are finite
    orpo, sft = r["training"]["orpo"], r["training"]["sft"]
    assert orpo["steps"] == sft["steps"] >= 1 and orpo["examples"] == sft["examples"] == orpo["steps"] * p["batch_size"]
    if p["max_steps"]:
        assert orpo["steps"] == p["max_steps"]
    for key in ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies"):
        assert len(orpo["curves"][key]) == len(orpo["curves"]["step"]) >= 1, key
        assert all(math.isfinite(v) for v in orpo["curves"][key]), key
    assert all(0.0 <= v <= 1.0 for v in orpo["curves"]["rewards/accuracies"])
    assert all(math.isfinite(v) for v in sft["curves"]["loss"]) and len(sft["curves"]["loss"]) >= 1
    # prompts: the budget holds, truncations are counted
    for part in ("train", "test"):
        s = r["prompts"][part]
        assert s["truncated_prompts"] <= s["items_dropped"]
    assert r["prompts"]["mean_tokens"]["test"] <= r["prompts"]["max_prompt_tokens"]
    mamba = r["mamba4rec"]
    assert 1 <= len(mamba["history"]) <= p["mamba_epochs"] and 1 <= mamba["best_epoch"] <= len(mamba["history"])
    assert len(r["examples"]) == min(p["n_examples"], n)
    for e in r["examples"]:
        assert set(e["choices"]) == set(STAGES) and all(1 <= c["rank"] <= n_cand for c in e["choices"].values())


STUDY = Study(
    name="orpo", notebook="04_orpo",
    title="LLM recommender trained with ORPO vs SFT, zero-shot and Mamba4Rec (Table 4, Figure 5)",
    params=OrpoParams, compute=compute,
    produces=("table4_orpo", "fig5_orpo_curves"),
    check=check_results,
)
