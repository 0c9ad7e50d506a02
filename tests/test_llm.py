"""The LLM recommender library (paperlib.llm): prompts, pairs, loading, the ORPO loss against its
formula and against TRL, training, and candidate scoring with the key/value cache.

Runs on a random tiny Llama (about 1.6 M parameters) with the SmolLM2 tokenizer read from the
bundled GGUF file; the test that loads the full SmolLM2 model is marked slow.
"""

from __future__ import annotations

import math
import os
import re
import tempfile

import numpy as np
import pytest
import torch
from datasets import Dataset

from paperlib.data.sequences import DataError, SequentialData
from paperlib.llm import (
    LLMConfig,
    LLMLoadError,
    PairConfig,
    PromptBuilder,
    PromptConfig,
    TrainConfig,
    build_eval_prompts,
    build_pairs,
    item_titles,
    load_llm,
    orpo_loss,
    orpo_trainer,
    preference_accuracy,
    rank_sampled,
    rerank,
    sample_targets,
    score_candidates,
    smollm2_gguf_path,
    top_k,
    train_orpo,
    train_sft,
)
from paperlib.llm.prompts import encode_prompt
from paperlib.llm.ranking import answer_ids
from paperlib.metrics import metrics_from_ranks

SHORT = PromptConfig(n_recent=3, system="You recommend movies.")  # short prompts keep the tests fast
N_ITEMS = 40


def toy_data(titles: dict[int, str] | None = None, n_users: int = 12, length: int = 12, seed: int = 0) -> SequentialData:
    """Synthetic users with distinct items each (unit tests only)."""
    rng = np.random.default_rng(seed)
    seqs = [rng.choice(np.arange(1, N_ITEMS + 1), size=length, replace=False) for _ in range(n_users)]
    if titles is None:
        titles = {i: f"Movie {i}" for i in range(1, N_ITEMS + 1)}
    return SequentialData(name="toy", sequences=seqs, n_items=N_ITEMS, max_len=50, titles=titles)


@pytest.fixture(scope="module")
def tiny():
    return load_llm(LLMConfig(source="tiny", lora=False))


def fresh_tiny():
    return load_llm(LLMConfig(source="tiny", lora=False))


@pytest.fixture(scope="module")
def sharp():
    """A tiny model with sharp distributions. A random tiny model is nearly uniform (every token
    has p ≈ 1/49152, attention is flat), so a wrong log(1 − p) term or a wrong position would not
    show. Scaled up, it repeats the last token with p ≈ 0.5 and attends to positions sharply."""
    lm = load_llm(LLMConfig(source="tiny", lora=False))
    with torch.no_grad():
        lm.model.model.embed_tokens.weight.mul_(16)  # tied with the output head
        for name, p in lm.model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(20)
    return lm


@pytest.fixture(scope="module")
def toy():
    return toy_data()


@pytest.fixture(scope="module")
def builder(tiny, toy):
    return PromptBuilder(tiny.tokenizer, item_titles(toy), SHORT, tiny.context_length)


# ---------------------------------------------------------------------------------------------
# loading


def test_loader_works_offline(tiny):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert smollm2_gguf_path().is_file()
    assert 2e5 <= tiny.n_params <= 3e6, "the tiny model is a few hundred thousand to a couple of million parameters"
    assert tiny.n_trainable == tiny.n_params and not tiny.lora
    assert tiny.tokenizer.chat_template, "the SmolLM2 tokenizer brings its chat template"
    assert tiny.tokenizer.pad_token_id is not None
    assert tiny.context_length == 512


def test_lora_trains_only_adapters():
    lm = load_llm(LLMConfig(source="tiny", lora=True, lora_r=4))
    assert lm.lora and 0 < lm.n_trainable < lm.n_params
    assert all("lora_" in name for name, p in lm.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("source", ["no-such-org/no-such-model-xyz", "/nonexistent/model/folder"])
def test_bad_model_id_gives_clear_error(source):
    with pytest.raises(LLMLoadError, match="local folder") as err:
        load_llm(LLMConfig(source=source))
    assert source in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


@pytest.mark.slow
def test_smollm2_gguf_loads_offline_and_scores():
    lm = load_llm(LLMConfig(source="smollm2"))
    assert lm.lora and lm.context_length == 8192
    assert 1.3e8 < lm.n_params < 1.5e8
    assert not getattr(lm.model, "is_quantized", False), "dense weights, trainable"
    titles = {i: t for i, t in enumerate(["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Jumanji (1995)"], 1)}
    data = SequentialData(name="toy", sequences=[np.array([1, 2, 3, 4])], n_items=4, max_len=50, titles=titles)
    builder = PromptBuilder(lm.tokenizer, item_titles(data), PromptConfig(), lm.context_length)
    prompt = builder([1, 2, 3])
    scores = score_candidates(lm.model, lm.tokenizer, prompt.text, list(titles.values()))
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    assert (scores < 0).all()


# ---------------------------------------------------------------------------------------------
# prompts and pairs


def test_dataset_without_titles_gives_clear_error(tiny):
    untitled = SequentialData(name="video", sequences=toy_data().sequences, n_items=N_ITEMS, max_len=50, titles=None)
    with pytest.raises(DataError, match="'video' has no item titles"):
        item_titles(untitled)


def test_prompt_lists_recent_titles_in_order(builder):
    prompt = builder([5, 6, 7, 8])
    assert prompt.items == [6, 7, 8] and prompt.n_dropped == 0 and prompt.n_untitled == 0
    text = prompt.text
    assert text.index("1. Movie 6") < text.index("2. Movie 7") < text.index("3. Movie 8")
    assert "Movie 5\n" not in text
    assert text.startswith("<|im_start|>system\nYou recommend movies.") and text.endswith("<|im_start|>assistant\n")


def test_missing_titles_are_skipped_and_counted(tiny):
    titles = {i: f"Movie {i}" for i in range(1, N_ITEMS + 1)}
    for item in (3, 17, 29):
        titles.pop(item)
    titles[11] = "   "  # empty title counts as missing
    data = toy_data(titles=titles, n_users=30, length=15)
    usable = item_titles(data)
    assert usable.n_missing == 4 and 11 not in usable
    builder = PromptBuilder(tiny.tokenizer, usable, SHORT, tiny.context_length)
    pairs = build_pairs(data, builder, PairConfig(targets_per_user=20))
    missing = {3, 11, 17, 29}
    n_untitled_positions = sum(int(i) in missing for s in data.sequences for i in s[1:-2])
    assert pairs.stats["untitled_targets"] == n_untitled_positions > 0
    assert pairs.stats["missing_titles"] == 4
    assert pairs.stats["untitled_in_prompts"] > 0
    assert all(p.target not in missing and p.rejected_item not in missing for p in pairs.pairs)
    evals = build_eval_prompts(data, builder)
    assert evals.stats["untitled_targets"] == sum(int(s[-1]) in missing for s in data.sequences)
    assert len(evals) + evals.stats["untitled_targets"] == data.n_users
    assert not any(set(p.items) & missing for p in evals.prompts)


def test_overlong_prompt_drops_oldest_items(tiny, toy):
    titles = item_titles(toy)
    full = PromptBuilder(tiny.tokenizer, titles, PromptConfig(n_recent=10), tiny.context_length)([*range(1, 11)])
    budget = full.n_tokens - 12  # a little too short for all ten titles
    prompt = PromptBuilder(tiny.tokenizer, titles, PromptConfig(n_recent=10, max_prompt_tokens=budget))([*range(1, 11)])
    assert prompt.n_dropped > 0 and prompt.n_tokens <= budget
    assert prompt.items == list(range(1 + prompt.n_dropped, 11)), "the oldest items go first"
    assert prompt.n_tokens == len(encode_prompt(tiny.tokenizer, prompt.text))
    # recorded in the statistics of a whole set, and measured against the model's context
    small_context = PromptBuilder(tiny.tokenizer, titles, PromptConfig(n_recent=10, answer_tokens=16), budget + 16)
    evals = build_eval_prompts(toy, small_context)
    assert evals.stats["truncated_prompts"] == len(evals) and evals.stats["items_dropped"] >= len(evals)


def test_pairs_use_training_part_and_valid_negatives(builder, toy):
    for strategy in ("uniform", "popularity"):
        pairs = build_pairs(toy, builder, PairConfig(strategy=strategy, targets_per_user=4, seed=1))
        assert len(pairs) == 4 * toy.n_users
        for p in pairs.pairs:
            seq = toy.sequences[p.user]
            assert 1 <= p.position < len(seq) - 2 and seq[p.position] == p.target
            assert p.chosen == f"Movie {p.target}" and p.rejected == f"Movie {p.rejected_item}"
            assert p.rejected_item != p.target
            shown = [int(i) for i in seq[: p.position][-3:]]
            assert p.rejected_item not in shown, "rejected never an item shown in the prompt"
    # popularity follows training counts: never-trained items are never drawn
    counts = np.bincount(np.concatenate(toy.train_sequences()), minlength=N_ITEMS + 1)
    pop = build_pairs(toy, builder, PairConfig(strategy="popularity", targets_per_user=4))
    assert all(counts[p.rejected_item] > 0 for p in pop.pairs)


def test_hard_negatives_from_score_function_and_matrix(builder, toy):
    favourite = torch.zeros(N_ITEMS + 1)
    favourite[1:] = torch.arange(N_ITEMS, 0, -1, dtype=torch.float)  # item 1 best, then 2, ...

    def score(items, lengths):
        assert items.ndim == 2 and lengths.shape == (items.shape[0],)
        return favourite.expand(items.shape[0], -1).clone()

    pairs = build_pairs(toy, builder, PairConfig(strategy="hard", targets_per_user=2), scores=score)
    for p in pairs.pairs:
        shown = {int(i) for i in toy.sequences[p.user][: p.position][-3:]}
        allowed = [i for i in range(1, N_ITEMS + 1) if i != p.target and i not in shown]
        assert p.rejected_item == min(allowed), "the highest-scored wrong item"
    targets, _ = sample_targets(toy, builder.titles, targets_per_user=2)
    matrix = favourite.expand(len(targets), -1).numpy()
    same = build_pairs(toy, builder, PairConfig(strategy="hard"), scores=matrix, targets=targets)
    assert [p.rejected_item for p in same.pairs] == [p.rejected_item for p in pairs.pairs]
    with pytest.raises(ValueError, match="n_items \\+ 1"):
        build_pairs(toy, builder, PairConfig(strategy="hard"), scores=matrix[:, :-1], targets=targets)
    with pytest.raises(ValueError, match="needs scores"):
        build_pairs(toy, builder, PairConfig(strategy="hard"))
    with pytest.raises(ValueError, match="unknown strategy"):
        PairConfig(strategy="random")


def shows(prompt: str, title: str) -> bool:
    """Whether a prompt lists ``title`` as one of its numbered lines."""
    return re.search(rf"^\d+\. {re.escape(title)}$", prompt, flags=re.MULTILINE) is not None


def test_no_leakage_on_ml1m(real_data, tiny):
    from paperlib.data import load_dataset

    data = load_dataset("ml-1m")
    users = np.random.default_rng(0).choice(data.n_users, size=200, replace=False)
    builder = PromptBuilder(tiny.tokenizer, item_titles(data), PromptConfig(), tiny.context_length)
    pairs = build_pairs(data, builder, PairConfig(strategy="popularity", targets_per_user=5), users=users)
    assert len(pairs) == 5 * len(users)
    for p in pairs.pairs:
        seq = data.sequences[p.user]
        valid, test = int(seq[-2]), int(seq[-1])
        assert p.target not in (valid, test) and p.position <= len(seq) - 3
        assert not shows(p.prompt, data.titles[valid]) and not shows(p.prompt, data.titles[test])
    evals = build_eval_prompts(data, builder, users=users)
    for u, target, prompt in zip(evals.users, evals.targets, evals.prompts):
        seq = data.sequences[u]
        assert target == seq[-1] and prompt.items[-1] == seq[-2], "evaluation history ends with the validation item"
        assert not shows(prompt.text, data.titles[int(target)])


# ---------------------------------------------------------------------------------------------
# the ORPO loss


def _toy_batch(pad: int) -> dict[str, torch.Tensor]:
    """Two pairs written out token by token: (prompt, chosen, rejected) ids."""
    # chosen answers repeat the prompt's last token: likely under the ``sharp`` model
    pairs = [([1, 50, 51, 52], [52, 52], [70, 2]), ([1, 53, 54], [54, 54, 2], [71, 72, 73, 2])]
    batch = {}
    for k, side in ((1, "chosen"), (2, "rejected")):
        rows = [p[0] + p[k] for p in pairs]
        width = max(map(len, rows))
        ids = torch.full((2, width), pad)
        mask = torch.zeros(2, width, dtype=torch.long)
        labels = torch.full((2, width), -100)
        for r, (p, row) in enumerate(zip(pairs, rows)):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
            labels[r, len(p[0]) : len(row)] = torch.tensor(p[k])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    batch["_pairs"] = pairs
    return batch


def test_orpo_loss_equals_formula_by_hand(sharp):
    model = sharp.model.eval()
    batch = _toy_batch(sharp.tokenizer.pad_token_id)
    pairs = batch.pop("_pairs")
    beta = 0.25

    def token_logps(seq):  # log p(seq[t] | seq[:t]) for t >= 1, one unpadded sequence at a time
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
        return [logp[t - 1, seq[t]].item() for t in range(1, len(seq))]

    nll_terms, nll_answer_terms, ratio_terms, means = [], [], [], []
    for prompt, chosen, rejected in pairs:
        lp_w = token_logps(prompt + chosen)
        lp_l = token_logps(prompt + rejected)
        nll_terms += [-x for x in lp_w]  # prompt + chosen, as TRL
        nll_answer_terms += [-x for x in lp_w[-len(chosen):]]
        mean_w = sum(lp_w[-len(chosen):]) / len(chosen)
        mean_l = sum(lp_l[-len(rejected):]) / len(rejected)
        means.append(mean_w)
        odds_w = math.exp(mean_w) / (1 - math.exp(mean_w))
        odds_l = math.exp(mean_l) / (1 - math.exp(mean_l))
        ratio_terms.append(-math.log(1 / (1 + math.exp(-math.log(odds_w / odds_l)))))
    assert max(means) > -2, "the toy answers are likely enough for log(1 - p) to matter"
    expected = sum(nll_terms) / len(nll_terms) + beta * sum(ratio_terms) / len(ratio_terms)
    expected_answer_only = sum(nll_answer_terms) / len(nll_answer_terms) + beta * sum(ratio_terms) / len(ratio_terms)

    with torch.no_grad():
        got = orpo_loss(model, batch, beta=beta)
        got_answer = orpo_loss(model, batch, beta=beta, nll_tokens="chosen")
    assert got.loss.item() == pytest.approx(expected, rel=1e-5)
    assert got.odds_ratio_term.item() == pytest.approx(sum(ratio_terms) / 2, rel=1e-5)
    assert got_answer.loss.item() == pytest.approx(expected_answer_only, rel=1e-5)
    assert got.loss.item() != pytest.approx(got_answer.loss.item(), rel=1e-4)


def test_orpo_loss_equals_trl(sharp, builder, toy):
    pairs = build_pairs(toy, builder, PairConfig(), users=range(2))
    columns = pairs.columns()
    # two answers that repeat the prompt's last word: likely under the sharp model, so that
    # log(1 - p) matters
    for word in (" ab", " cd"):
        columns["prompt"].append("Repeat:" + word * 4)
        columns["chosen"].append(word * 8)
        columns["rejected"].append(" Movie 3")
    data = Dataset.from_dict(columns)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = orpo_trainer(sharp, data, TrainConfig(max_steps=1, batch_size=4, beta=0.1, max_length=256), tmp)
        rows = [trainer.train_dataset[i] for i in range(4)]
        batch = trainer.data_collator(rows)
        model = trainer.model.eval()
        with torch.no_grad():
            trl_loss, metrics = trainer.get_batch_loss_metrics(model, batch)
            ours = orpo_loss(model, batch, beta=0.1)
    assert ours.chosen_logps.max() > -3, "some answers are likely enough for log(1 - p) to matter"
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert ours.nll.item() == pytest.approx(metrics["nll_loss"], rel=1e-5)
    assert -ours.odds_ratio_term.item() == pytest.approx(metrics["log_odds_ratio"], rel=1e-4)
    assert ours.log_odds_ratio.mean().item() == pytest.approx(metrics["log_odds_chosen"], rel=1e-4)
    assert 0.1 * ours.chosen_logps.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-5)
    # TRL's tokens are ours: the prompt as encode_prompt makes it, the answer + end token as the ranker scores it
    for row, pair in zip(rows, pairs.pairs):
        assert row["prompt_input_ids"] == encode_prompt(sharp.tokenizer, pair.prompt)
        assert [t for t in row["chosen_labels"] if t != -100] == answer_ids(sharp.tokenizer, pair.chosen)
    # so a candidate's score is TRL's length-averaged completion log-probability
    scores = torch.stack(
        [score_candidates(model, sharp.tokenizer, p, [c, r]) for p, c, r in zip(*columns.values())]
    )
    torch.testing.assert_close(scores[:, 0], ours.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[:, 1], ours.rejected_logps, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# training


def test_orpo_steps_change_weights_and_raise_preference_accuracy(builder, toy):
    lm = fresh_tiny()
    pairs = build_pairs(toy, builder, PairConfig(seed=3), users=range(8))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    acc_before = preference_accuracy(lm.model, lm.tokenizer, pairs)
    config = TrainConfig(max_steps=6, batch_size=8, learning_rate=1e-2, max_length=256)
    result = train_orpo(lm, pairs, config)
    acc_after = preference_accuracy(lm.model, lm.tokenizer, pairs)
    changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2, "most weight tensors moved"
    assert acc_after > acc_before, f"preference accuracy {acc_before} -> {acc_after}"
    assert result.steps == 6 and result.examples == 48
    for key in ("loss", "nll_loss", "log_odds_ratio", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
        assert len(result.curves[key]) == 6 and all(math.isfinite(x) for x in result.curves[key])
    assert result.curves["step"] == [1, 2, 3, 4, 5, 6]
    assert result.curves["loss"][-1] < result.curves["loss"][0]
    assert "model" not in result.to_dict() and result.to_dict()["config"]["learning_rate"] == 1e-2


def test_prompt_too_long_for_max_length_is_refused(tiny, builder, toy):
    pairs = build_pairs(toy, builder, PairConfig(), users=range(2))
    with pytest.raises(ValueError, match="raise TrainConfig.max_length"):
        train_orpo(tiny, pairs, TrainConfig(max_steps=1, batch_size=2, max_length=40))
    with pytest.raises(ValueError, match="raise TrainConfig.max_length"):
        train_sft(tiny, pairs, TrainConfig(max_steps=1, batch_size=2, max_length=40))


def test_sft_baseline_same_budget(builder, toy):
    pairs = build_pairs(toy, builder, PairConfig(), users=range(8))
    config = TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-2, max_length=256)
    lm = fresh_tiny()
    before = lm.model.model.embed_tokens.weight.clone()
    sft = train_sft(lm, pairs, config)
    assert sft.method == "sft" and sft.steps == 2 and sft.examples == 8
    assert len(sft.curves["loss"]) == 2
    assert not torch.equal(before, lm.model.model.embed_tokens.weight)
    # same first batch and same tokens as ORPO's NLL term: the runs differ only by the odds-ratio term
    orpo = train_orpo(fresh_tiny(), pairs, config)
    assert sft.curves["loss"][0] == pytest.approx(orpo.curves["nll_loss"][0], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# ranking


@pytest.mark.parametrize("lora", [False, True])
def test_scores_identical_with_and_without_cache(lora, sharp, builder):
    lm = sharp
    if lora:  # LoRA's B starts at zero; move it so the adapters take part
        lm = load_llm(LLMConfig(source="tiny", lora=True, lora_r=4))
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    prompt = builder([4, 9, 12]).text
    candidates = ["Movie 1", "Movie 22", "A much longer candidate title (1999)", "X", "Movie 7", "Heat", "Z Z Z Z"]
    cached = score_candidates(lm.model, lm.tokenizer, prompt, candidates, batch_size=3)
    plain = score_candidates(lm.model, lm.tokenizer, prompt, candidates, batch_size=3, use_cache=False)
    one_by_one = torch.cat([score_candidates(lm.model, lm.tokenizer, prompt, [c], use_cache=False) for c in candidates])
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, one_by_one, rtol=1e-5, atol=1e-5)
    assert cached.std() > 0


def test_rank_sampled_and_rerank(tiny, builder, toy):
    prompts = build_eval_prompts(toy, builder, users=range(6))
    result = rank_sampled(tiny.model, tiny.tokenizer, toy, prompts, builder.titles, n_negatives=19, seed=0)
    assert result.candidates.shape == (6, 20) and (result.candidates[:, 0] == prompts.targets).all()
    for u, row in zip(prompts.users, result.candidates):
        assert len(set(row.tolist())) == 20 and not set(row[1:].tolist()) & set(toy.sequences[u].tolist())
    expected = 1 + (result.scores[:, 1:] >= result.scores[:, :1]).sum(1)
    assert (result.ranks == expected).all()
    assert result.metrics == metrics_from_ranks(result.ranks, (1, 5, 10))
    again = rank_sampled(tiny.model, tiny.tokenizer, toy, prompts, builder.titles, seed=0)
    assert (again.candidates == result.candidates).all(), "seeded"

    # re-rank: user 0's true item sits in its list, user 1's does not (a miss)
    top = np.array([[i for i in range(1, N_ITEMS + 1) if i != t][:20] for t in prompts.targets])
    top[0, 7] = prompts.targets[0]
    reranked = rerank(tiny.model, tiny.tokenizer, prompts, builder.titles, top)
    assert reranked.ranks[1] == 21 and reranked.stats["true_outside_list"] == 5
    assert reranked.ranks[0] == 1 + (np.delete(reranked.scores[0], 7) >= reranked.scores[0, 7]).sum()
    assert reranked.metrics["hr@10"] == pytest.approx(float(reranked.ranks[0] <= 10) / 6)
    with pytest.raises(ValueError, match="one row per evaluation prompt"):
        rerank(tiny.model, tiny.tokenizer, prompts, builder.titles, top[:3])


def test_top_k_of_a_sequential_model(toy):
    seen = []

    def score(items, lengths):  # prefers high item ids; padding column would win if not excluded
        seen.append((items, lengths))
        out = torch.arange(N_ITEMS + 1, dtype=torch.float).expand(items.shape[0], -1).clone()
        out[:, 0] = 1e9
        return out

    top = top_k(score, toy, users=[0, 3, 5], k=20, batch_size=2)
    assert top.shape == (3, 20) and (top == np.arange(N_ITEMS, N_ITEMS - 20, -1)).all()
    items, lengths = seen[0]
    assert lengths.tolist() == [len(toy.sequences[0]) - 1, len(toy.sequences[3]) - 1], "test history: all but the test item"
    assert (items[0, : lengths[0]].numpy() == toy.sequences[0][:-1]).all()
