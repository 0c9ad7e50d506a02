"""The LLM recommender of the ORPO study: prompts, preference pairs, models, training, ranking.

A causal LM reads a user's most recent item titles and names the next item. ORPO teaches it to
prefer the true next title (``chosen``) over a wrong one (``rejected``); an SFT run with the same
budget is the baseline. At test time the model scores candidate titles by their mean token
log-probability. This package is the only part of ``paperlib`` that imports TRL and peft.

Typical use::

    from paperlib.data import load_dataset
    from paperlib import llm

    data = load_dataset("ml-1m")
    titles = llm.item_titles(data)                        # DataError if the dataset has none
    lm = llm.load_llm(llm.LLMConfig(source="smollm2"))    # offline, LoRA on CPU
    builder = llm.PromptBuilder(lm.tokenizer, titles, llm.PromptConfig(), lm.context_length)
    pairs = llm.build_pairs(data, builder, llm.PairConfig(strategy="popularity"))
    run = llm.train_orpo(lm, pairs, llm.TrainConfig(max_steps=100))
    prompts = llm.build_eval_prompts(data, builder, users=range(500))
    result = llm.rank_sampled(lm.model, lm.tokenizer, data, prompts, titles)
    result.metrics                                        # hr@1, hr@5, ndcg@5, hr@10, ndcg@10, ...
    top = llm.top_k(mamba4rec.score, data, prompts.users, k=20)  # a trained sequential model's list
    reranked = llm.rerank(lm.model, lm.tokenizer, prompts, titles, top)
"""

from paperlib.llm.models import (
    LLMConfig,
    LLMLoadError,
    LoadedLM,
    TinyLlamaConfig,
    load_llm,
    smollm2_gguf_path,
    smollm2_tokenizer,
)
from paperlib.llm.orpo import (
    ORPOLoss,
    TrainConfig,
    TrainResult,
    orpo_loss,
    orpo_trainer,
    preference_dataset,
    train_orpo,
    train_sft,
)
from paperlib.llm.pairs import (
    STRATEGIES,
    EvalPrompts,
    Pair,
    PairConfig,
    PairSet,
    TrainingTargets,
    build_eval_prompts,
    build_pairs,
    sample_targets,
)
from paperlib.llm.prompts import Prompt, PromptBuilder, PromptConfig, Titles, item_titles
from paperlib.llm.ranking import (
    RankingResult,
    preference_accuracy,
    rank_sampled,
    rerank,
    score_candidates,
    top_k,
)

__all__ = [
    "STRATEGIES",
    "EvalPrompts",
    "LLMConfig",
    "LLMLoadError",
    "LoadedLM",
    "ORPOLoss",
    "Pair",
    "PairConfig",
    "PairSet",
    "Prompt",
    "PromptBuilder",
    "PromptConfig",
    "RankingResult",
    "TinyLlamaConfig",
    "Titles",
    "TrainConfig",
    "TrainResult",
    "TrainingTargets",
    "build_eval_prompts",
    "build_pairs",
    "item_titles",
    "load_llm",
    "orpo_loss",
    "orpo_trainer",
    "preference_accuracy",
    "preference_dataset",
    "rank_sampled",
    "rerank",
    "sample_targets",
    "score_candidates",
    "smollm2_gguf_path",
    "smollm2_tokenizer",
    "top_k",
    "train_orpo",
    "train_sft",
]
