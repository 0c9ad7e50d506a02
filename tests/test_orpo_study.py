"""The ORPO study (04): the smoke computation end to end, what its results JSON satisfies, the
tables and figure drawn from that JSON, the reuse of its Mamba4Rec, and bad input (a dataset
without titles, a title file missing, a model that cannot be loaded). Runs on the random tiny
Llama; the smoke run blanks some ML-100K titles so that missing titles are exercised too.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import numpy as np
import pytest

from paperlib import llm, paths
from paperlib.config import ConfigError, merge
from paperlib.data import DataError, SequentialData, load_dataset
from paperlib.metrics import metrics_from_ranks
from paperlib.results import save_figure, save_table
from paperlib.studies import orpo

#: items whose title the smoke run removes (every 10th) or blanks (every 20th: whitespace only)
def _blank(item: int) -> bool:
    return item % 10 == 0


def _with_blank_titles(name: str, **kwargs) -> SequentialData:
    data = load_dataset(name, **kwargs)
    titles = {i: t for i, t in data.titles.items() if not _blank(i)}
    titles.update({i: "   " for i in data.titles if i % 20 == 0})
    data.titles = titles
    return data


@pytest.fixture(scope="module")
def smoke(real_data, tmp_path_factory):
    """The smoke preset computed once into a temporary folder (Mamba4Rec checkpoints kept there)."""
    build, out = tmp_path_factory.mktemp("build"), tmp_path_factory.mktemp("out")
    cfg = merge(orpo.OrpoParams, "04_orpo", "smoke", {"output_dir": str(out), "recompute": True, "resume": True})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAPERLIB_BUILD", str(build))
        mp.setenv("PAPERLIB_CHECKPOINTS", str(build / "checkpoints"))  # module-scoped: before any test's own folder
        mp.setattr(orpo, "load_dataset", _with_blank_titles)
        doc = orpo.compute(cfg, progress=False)
    return {"doc": doc, "cfg": cfg, "build": build, "out": out}


def test_smoke_compute_writes_results_that_check_accepts(smoke):
    doc, cfg = smoke["doc"], smoke["cfg"]
    path = smoke["out"] / "results" / "orpo.smoke.json"
    assert json.loads(path.read_text()) == doc
    orpo.check_results(doc)
    ev = doc["results"]["evaluation"]
    assert doc["params"]["dataset"] == "ml-100k" and doc["results"]["dataset"]["users"] == cfg.max_users
    assert 1 <= len(ev["users"]) <= cfg.test_users
    train = doc["results"]["training"]
    assert train["orpo"]["steps"] == train["sft"]["steps"] == cfg.max_steps
    for run in train.values():  # each step accumulates micro-batches into one batch of batch_size
        assert run["config"]["batch_size"] == cfg.micro_batch_size < cfg.batch_size
        assert run["examples"] == cfg.max_steps * cfg.batch_size
    assert doc["results"]["mamba4rec"]["reused"] is False


def test_table4_has_every_row_on_the_same_users(smoke):
    doc = smoke["doc"]
    table = orpo.table4(doc)
    labels = set(table.index.get_level_values("model"))
    for name in ("Popularity", "Mamba4Rec alone", "LLM zero-shot", "LLM after SFT", "LLM after ORPO",
                 "Mamba4Rec + ORPO re-ranking"):
        assert name in labels
    assert len(table) == 10 and list(table.columns) == ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "users"]
    n = len(doc["results"]["evaluation"]["users"])
    assert (table["users"] == n).all()
    # each cell is the row's metric over the shared users, from its per-user ranks
    entry = doc["results"]["evaluation"]["rows"]["orpo"]["sampled"]
    row = table.loc[(orpo.protocol_label(doc, "sampled"), "LLM after ORPO")]
    assert float(row["NDCG@10"]) == pytest.approx(metrics_from_ranks(entry["ranks"], (10,))["ndcg@10"], abs=5e-5)


def test_missing_titles_are_skipped_counted_and_shown(smoke):
    doc = smoke["doc"]
    r = doc["results"]
    n_blank = sum(_blank(i) for i in range(1, r["dataset"]["items"] + 1))
    assert r["dataset"]["missing_titles"] == n_blank > 0
    assert r["prompts"]["train"]["untitled_in_prompts"] + r["prompts"]["test"]["untitled_in_prompts"] > 0
    assert not any(_blank(p["target"]) or _blank(p["rejected"]) for p in r["pairs"])
    assert not any(_blank(i) for row in r["evaluation"]["candidates"] for i in row)
    text = orpo.setup_text(doc)
    assert f"{n_blank:,} items without a usable title" in text
    assert f"{r['prompts']['train']['untitled_targets']:,} training position" in text


def test_overlong_prompts_drop_their_oldest_items_and_are_shown(smoke):
    doc = smoke["doc"]
    p = doc["results"]["prompts"]
    assert p["max_prompt_tokens"] == smoke["cfg"].max_prompt_tokens
    assert p["test"]["truncated_prompts"] > 0 and p["test"]["items_dropped"] >= p["test"]["truncated_prompts"]
    assert p["mean_tokens"]["test"] <= p["max_prompt_tokens"]
    assert f"{p['test']['truncated_prompts']:,} test prompt" in orpo.setup_text(doc)
    example = doc["results"]["examples"][0]
    assert len(example["history"]) + example["n_dropped"] <= smoke["cfg"].n_recent


def test_outputs_are_drawn_from_the_json_alone(smoke, tmp_path):
    doc = orpo.STUDY.load(smoke["cfg"])  # read back from disk
    table = orpo.table4(doc)
    written = save_table(table, "table4_orpo", tmp_path) + save_figure(orpo.figure5(doc), "fig5_orpo_curves", tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{s}.{e}" for s, es in
                                                    (("table4_orpo", ("md", "tex", "csv")),
                                                     ("fig5_orpo_curves", ("png", "pdf"))) for e in es)
    summary = orpo.summary(doc)
    assert "ORPO" in summary and "SFT" in summary and "Mamba4Rec alone" in summary
    assert any(word in summary for word in (" beat ", " did not beat ", " tied with "))
    assert "```text" in orpo.examples_text(doc) and "True next item" in orpo.examples_text(doc)
    assert "assumed, not from the paper" in " ".join(orpo.assumptions(doc)["source"])
    assert (orpo.costs(doc)["seconds"] >= 0).all()


def test_summary_says_which_row_won(smoke):
    doc = copy.deepcopy(smoke["doc"])
    rows = doc["results"]["evaluation"]["rows"]
    n = len(doc["results"]["evaluation"]["users"])
    rows["orpo"]["sampled"]["ranks"] = [1] * n
    rows["sft"]["sampled"]["ranks"] = [20] * n
    assert "ORPO beat SFT: NDCG@10 1.0000 vs 0.0000" in orpo.summary(doc)
    rows["orpo"]["sampled"]["ranks"], rows["sft"]["sampled"]["ranks"] = [20] * n, [1] * n
    assert "ORPO did not beat SFT" in orpo.summary(doc)


def test_check_rejects_results_that_do_not_hold_together(smoke):
    good = smoke["doc"]
    broken = copy.deepcopy(good)
    ranks = broken["results"]["evaluation"]["rows"]["orpo"]["sampled"]["ranks"]
    ranks[0] = 1 if ranks[0] > 1 else 2  # metrics no longer follow from the ranks
    with pytest.raises(AssertionError):
        orpo.check_results(broken)
    broken = copy.deepcopy(good)
    broken["results"]["training"]["sft"]["steps"] += 1  # not the same budget
    with pytest.raises(AssertionError):
        orpo.check_results(broken)
    broken = copy.deepcopy(good)
    pair = broken["results"]["pairs"][0]
    pair["position"] = pair["length"] - 1  # the test item: not in the training part
    with pytest.raises(AssertionError):
        orpo.check_results(broken)
    broken = copy.deepcopy(good)
    broken["results"]["evaluation"]["rows"]["sft"]["rerank"]["ranks"].pop()  # fewer users than the others
    with pytest.raises(AssertionError):
        orpo.check_results(broken)


def test_rerun_reuses_the_trained_mamba4rec(smoke, monkeypatch):
    monkeypatch.setenv("PAPERLIB_BUILD", str(smoke["build"]))
    monkeypatch.setenv("PAPERLIB_CHECKPOINTS", str(smoke["build"] / "checkpoints"))  # the smoke run's folder
    cfg = smoke["cfg"]
    data = load_dataset(cfg.dataset).subset(cfg.max_users, seed=cfg.seed)
    model, info = orpo.train_mamba4rec(cfg, data, progress=False)
    first = smoke["doc"]["results"]["mamba4rec"]
    assert info["reused"] is True and info["key"] == first["key"] and info["history"] == first["history"]
    ev = smoke["doc"]["results"]["evaluation"]
    top = llm.top_k(model.score, data, ev["users"], k=cfg.rerank_k)
    assert top.tolist() == ev["top"], "the same weights give the same lists"
    assert (paths.checkpoints_dir() / first["checkpoint"] / "best.pt").is_file()


# ---------------------------------------------------------------------------------------------
# pieces


def test_rerank_scores_only_users_with_the_true_item_in_the_list():
    """Skipping users whose true item is outside the list changes no rank: compare with the
    library's re-ranking of every user."""
    rng = np.random.default_rng(0)
    n_items = 40
    seqs = [rng.choice(np.arange(1, n_items + 1), size=12, replace=False) for _ in range(4)]
    data = SequentialData(name="toy", sequences=seqs, n_items=n_items, max_len=50,
                          titles={i: f"Movie {i}" for i in range(1, n_items + 1)})
    lm = llm.load_llm(llm.LLMConfig(source="tiny", lora=False))
    cfg = orpo.OrpoParams(dataset="ml-100k", n_recent=3, n_negatives=9, rerank_k=10)
    titles = llm.item_titles(data)
    prompts = llm.build_eval_prompts(data, orpo.prompt_builder(lm, titles, cfg))
    top = np.array([[i for i in range(1, n_items + 1) if i != t][:10] for t in prompts.targets])
    top[0, 3], top[2, 0] = prompts.targets[0], prompts.targets[2]
    rows, table, candidates = orpo.evaluate_llm(lm, data, prompts, titles, top, cfg)
    full = llm.rerank(lm.model, lm.tokenizer, prompts, titles, top, ks=orpo.KS)
    assert rows["rerank"]["ranks"] == full.ranks.tolist()
    assert rows["rerank"]["ranks"][1] == rows["rerank"]["ranks"][3] == 11
    assert rows["rerank"]["scored_users"] == 2
    assert table.shape == candidates.shape == (4, 10) and (candidates[:, 0] == prompts.targets).all()
    assert rows["sampled"]["metrics"] == metrics_from_ranks(rows["sampled"]["ranks"], orpo.KS)


def test_baseline_ranks_count_ties_against_the_true_item():
    scores = np.array([[0.5, 0.9, 0.5, 0.1], [0.7, 0.1, 0.2, 0.3]])
    assert orpo.ranks_in_lists(scores, np.array([0, 0])).tolist() == [3, 1]
    assert orpo.ranks_in_lists(scores, np.array([-1, 3])).tolist() == [5, 2]
    targets, top = np.array([7, 9]), np.array([[3, 5, 7], [1, 2, 4]])
    rows = orpo.baseline_rows(scores, None, targets, top)
    assert rows["rerank"]["ranks"] == [3, 4], "Mamba4Rec alone: its own order; a target outside the list misses"
    rows = orpo.baseline_rows(scores, np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), targets, top)
    assert rows["rerank"]["ranks"] == [3, 4], "re-ordered by tied scores: the target comes last"
    assert rows["sampled"]["ranks"] == [3, 1]


def test_draw_users_is_seeded_and_capped():
    a, b = orpo.draw_users(100, 10, [0, 1]), orpo.draw_users(100, 10, [0, 1])
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10 and a.tolist() == sorted(a.tolist())
    assert orpo.draw_users(100, 10, [0, 2]).tolist() != a.tolist()
    assert orpo.draw_users(5, 0, [0]).tolist() == orpo.draw_users(5, 50, [0]).tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# bad input


def test_dataset_without_titles_is_refused_before_training(real_data):
    """Video Games as SASRec's Video.txt (the only copy here, and what its download fetches) has no
    item -> ASIN map, hence no titles: the parameters are refused, naming what is missing."""
    expected = "(?s)'amazon-video-games' has no item titles.*Video.txt.*meta_Video_Games.json.gz.*ml-1m"
    with pytest.raises(ConfigError, match=expected):
        orpo.OrpoParams(dataset="amazon-video-games")
    with pytest.raises(ConfigError, match="has no item titles"):
        merge(orpo.OrpoParams, "04_orpo", "smoke", {"dataset": "amazon-video-games"})
    assert orpo.titles_missing("ml-1m") is None and orpo.titles_missing("amazon-beauty") is None


def test_dataset_without_local_files_is_judged_by_its_download(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLIB_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("PAPERLIB_CACHE", str(tmp_path / "cache"))
    assert "the file it downloads is Video.txt" in orpo.titles_missing("amazon-video-games")
    assert orpo.titles_missing("ml-100k") is None  # its download (the GroupLens zip) has u.item


@pytest.mark.parametrize("values, message", [
    ({"dataset": "netflix"}, "'dataset' must be one of"),
    ({"lora": "maybe"}, "'lora' must be one of"),
    ({"strategy": "random"}, "'strategy' must be one of"),
    ({"max_prompt_tokens": 600, "max_length": 512}, "leaves no room for the answer"),
    ({"model_source": "  "}, "model_source is empty"),
    ({"batch_size": 8, "micro_batch_size": 3}, "micro_batch_size 3 does not divide batch_size 8"),
    ({"test_users": -1}, "'test_users' must be >= 0"),
])
def test_bad_parameters_give_clear_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        orpo.OrpoParams(**values)


def test_missing_title_file_is_a_clear_error_before_training(real_data, tmp_path, monkeypatch):
    folder = tmp_path / "data" / "ml-100k"
    folder.mkdir(parents=True)
    shutil.copy(real_data / "ml-100k" / "u.data", folder / "u.data")  # interactions without u.item
    monkeypatch.setenv("PAPERLIB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("PAPERLIB_BUILD", str(tmp_path / "build"))
    cfg = merge(orpo.OrpoParams, "04_orpo", "smoke", {"output_dir": str(tmp_path / "out"), "recompute": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_dataset warns before the study's error
        with pytest.raises(DataError, match="no title file next to .*u.data.*u.item"):
            orpo.compute(cfg, progress=False)
    assert not (tmp_path / "build").exists(), "nothing was trained"


def test_model_that_cannot_be_loaded_offline_fails_before_training(real_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERLIB_BUILD", str(tmp_path / "build"))
    cfg = merge(orpo.OrpoParams, "04_orpo", "smoke", {"output_dir": str(tmp_path / "out"), "recompute": True,
                                                      "model_source": "no-such-org/no-such-model-xyz"})
    with pytest.raises(llm.LLMLoadError, match="(?s)no-such-org/no-such-model-xyz.*local folder"):
        orpo.compute(cfg, progress=False)
    assert not (tmp_path / "build").exists() and not (tmp_path / "out").exists()
