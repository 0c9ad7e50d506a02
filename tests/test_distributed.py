"""Training on several processes and studies split into shards (``paperlib.distributed``).

The multi-process checks run once, in two CPU processes on 127.0.0.1 (gloo), started with
``torch.multiprocessing.spawn``: each process runs the same list of scenarios and saves what it
got; the tests compare that with the same work done in one process here. Equality tests turn
dropout off (each rank draws its own dropout masks). Data is synthetic and tiny (unit tests only).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from paperlib import distributed
from paperlib.adaptive import USGM, AdaGradNorm, BatchSizeConfig
from paperlib.adaptive.training import AdaptiveBatchSize
from paperlib.data.sequences import SequentialData, count_pairs
from paperlib.distributed import DistributedError, Shard, share_bounds
from paperlib.models import build_model
from paperlib.train import Callback, Trainer, TrainConfig, evaluate, fit

WORLD = 2
N_ITEMS, MAX_LEN = 20, 10
TINY = {  # dropout off: ranks draw different dropout masks than one process would
    "sasrec": {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "hidden_dropout_prob": 0.0,
               "attn_dropout_prob": 0.0},
    "mamba4rec": {"hidden_size": 16, "dropout": 0.0},
    "gru4rec": {"hidden_size": 8, "gru_hidden_size": 8, "dropout_prob": 0.0},
}
OPTIMIZERS = {"adagrad-norm": lambda p: AdaGradNorm(p, alpha=0.05), "usgm": lambda p: USGM(p, radius=5.0)}


def toy_data(n_users: int = 41, seed: int = 0) -> SequentialData:
    """Random histories of 5..24 items (several windows of MAX_LEN for the long ones): unit tests only."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, N_ITEMS + 1, size=int(rng.integers(5, 25))).astype(np.int64) for _ in range(n_users)]
    return SequentialData(name="toy", sequences=seqs, n_items=N_ITEMS, max_len=MAX_LEN)


def tiny(name: str, seed: int = 0):
    return build_model(name, n_items=N_ITEMS, max_len=MAX_LEN, seed=seed, **TINY[name])


def config(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=40, eval_batch_size=8, lr=5e-3, device="cpu", max_steps_per_epoch=4,
                record_steps=True)
    return TrainConfig(**{**base, **kw})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Killed(Exception):
    """Stands for a process killed mid-epoch (raised on every rank at the same step)."""


class KillAt(Callback):
    """Raise :class:`Killed` after step ``at[1]`` of epoch ``at[0]`` (None: never)."""

    def __init__(self, at: tuple[int, int] | None) -> None:
        self.at = at

    def after_step(self, trainer, record) -> None:
        if self.at == (record["epoch"], record["step"]):
            raise Killed


#: the killed run: checkpoints every 200 pairs (inside the pass of about 490 pairs), killed at the
#: second step of the third period, after the checkpoint of the second (mid-pass)
KILL_CONFIG = dict(epochs=4, eval_every_pairs=200, max_steps_per_epoch=None, record_steps=True)
KILL_AT = (3, 2)


def killed_run(ckpt: Path) -> None:
    try:
        fit(tiny("sasrec"), toy_data(), config(**KILL_CONFIG), checkpoint_dir=ckpt, callbacks=[KillAt(KILL_AT)],
            progress=False)
    except Killed:
        return
    raise AssertionError("the run was not killed")


def resumed_run(ckpt: Path) -> dict[str, Any]:
    model = tiny("sasrec", seed=99)  # other weights: everything must come from the checkpoint
    result = fit(model, toy_data(), config(**KILL_CONFIG), checkpoint_dir=ckpt, callbacks=[KillAt(None)],
                 resume=True, progress=False)
    return {"result": result.to_dict(), "weights": weights(model)}


# --------------------------------------------------------------------------- scenarios (every rank)
def scenario_ddp() -> dict[str, Any]:
    out = {}
    for name in ("sasrec", "mamba4rec"):
        model = tiny(name)
        result = fit(model, toy_data(), config(), progress=False)
        out[name] = {"weights": weights(model), "steps": result.steps, "world_size": result.world_size}
    return out


def scenario_eval() -> dict[str, Any]:
    model, data = tiny("sasrec", seed=3), toy_data()
    return {(split, bs, seen): evaluate(model, data, split, bs, device="cpu", exclude_seen=seen, sharded=True)
            for split in ("valid", "test") for bs in (8, 16) for seen in (False, True)}


def adaptive_run() -> dict[str, Any]:
    data, model = toy_data(), tiny("gru4rec")
    cb = AdaptiveBatchSize(BatchSizeConfig(max_batch=count_pairs(data), initial_batch=24, test="norm", theta=0.5,
                                           window=2))
    opt = AdaGradNorm(model.parameters(), alpha=0.05)
    fit(model, data, config(epochs=2, batch_size=24, gradient_groups=4, max_steps_per_epoch=None), optimizer=opt,
        callbacks=[cb], progress=False)
    return {"records": cb.records(), "weights": weights(model), "optimizer": opt.state_dict()}


def optimizer_runs() -> dict[str, Any]:
    out = {}
    for name, make in OPTIMIZERS.items():
        model = tiny("sasrec")
        opt = make(model.parameters())
        fit(model, toy_data(), config(), optimizer=opt, progress=False)
        out[name] = {"weights": weights(model), "optimizer": opt.state_dict()}
    return out


def scenario_bad_input() -> dict[str, str]:
    out = {}
    data = toy_data()
    if distributed.rank() == 1:
        data.sequences[0] = data.sequences[0].copy()
        data.sequences[0][0] = data.sequences[0][0] % N_ITEMS + 1  # one item differs on rank 1
    try:
        Trainer(tiny("gru4rec"), data, config(), progress=False)
    except DistributedError as exc:
        out["checksum"] = str(exc)
    try:
        Trainer(tiny("gru4rec"), toy_data(n_users=1), config(batch_size=15), progress=False)
    except ValueError as exc:
        out["too_many_ranks"] = str(exc)
    return out


SCENARIOS = {"ddp": scenario_ddp, "eval": scenario_eval, "adaptive": adaptive_run, "optimizers": optimizer_runs,
             "bad_input": scenario_bad_input}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, kill_dir: str, resume_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), TQDM_DISABLE="1")
    torch.set_num_threads(1)
    distributed.init_from_env(timeout_s=120)
    try:
        got = {name: run() for name, run in SCENARIOS.items()}
        killed_run(Path(kill_dir))
        got["resumed"] = resumed_run(Path(resume_dir))
        torch.save(got, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.destroy()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, Any]:
    """Every scenario on two processes; ``resume_dir`` holds a run killed in one process before,
    which the two processes resume. Returns what rank 0 and rank 1 got, and the folders."""
    root = tmp_path_factory.mktemp("ddp")
    kill_dir, resume_dir = root / "killed-on-2", root / "killed-on-1"
    killed_run(resume_dir)
    started = time.perf_counter()
    mp.spawn(_worker, args=(free_port(), str(root), str(kill_dir), str(resume_dir)), nprocs=WORLD, join=True)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "kill_dir": kill_dir, "seconds": time.perf_counter() - started}


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **(tol or {"rtol": 1e-5, "atol": 1e-6}), msg=lambda m: f"{k}: {m}")


# --------------------------------------------------------------------------- one run, several processes
@pytest.mark.parametrize("name", ["sasrec", "mamba4rec"])
def test_two_processes_train_like_one_at_the_same_global_batch(two_ranks, name):
    model = tiny(name)
    single = fit(model, toy_data(), config(), progress=False)
    for got in two_ranks["ranks"]:
        ddp = got["ddp"][name]
        assert ddp["world_size"] == WORLD and single.world_size == 1
        assert [s["batch_size"] for s in ddp["steps"]] == [s["batch_size"] for s in single.steps]
        assert [s["loss"] for s in ddp["steps"]] == pytest.approx([s["loss"] for s in single.steps], rel=1e-5)
        # Adam divides by the root of the squared gradients: near-zero gradient entries turn float
        # rounding into differences of about 1e-6 in the weights
        assert_close_weights(ddp["weights"], weights(model), rtol=1e-4, atol=1e-5)
    rank0, rank1 = (r["ddp"][name]["weights"] for r in two_ranks["ranks"])
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "every rank holds the same weights"


def test_sharded_evaluation_equals_one_process_exactly(two_ranks):
    model, data = tiny("sasrec", seed=3), toy_data()
    for got in two_ranks["ranks"]:
        for (split, bs, seen), metrics in got["eval"].items():
            assert metrics == evaluate(model, data, split, bs, device="cpu", exclude_seen=seen), (split, bs, seen)


def test_the_distributed_batch_size_controller_proposes_what_one_process_does(two_ranks):
    single = adaptive_run()
    budgets = [r["budget"] for r in single["records"]]
    assert len(set(budgets)) > 1, "the schedule grows in this run, so the comparison means something"
    for got in two_ranks["ranks"]:
        records = got["adaptive"]["records"]
        assert [(r["proposal"], r["budget"], r["batch_size"]) for r in records] == \
            [(r["proposal"], r["budget"], r["batch_size"]) for r in single["records"]]
        # each group's gradient is computed as one process computes it: the statistic is the same
        assert [r["statistic"] for r in records] == [r["statistic"] for r in single["records"]]
        assert_close_weights(got["adaptive"]["weights"], single["weights"])
    a, b = (r["adaptive"]["optimizer"]["global"] for r in two_ranks["ranks"])
    assert a == b


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_size_methods_keep_identical_state_on_every_rank(two_ranks, name):
    rank0, rank1 = (r["optimizers"][name] for r in two_ranks["ranks"])
    assert rank0["optimizer"]["global"] == rank1["optimizer"]["global"]
    for p, state in rank0["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, rank1["optimizer"]["state"][p][key]), (name, key)
    single = optimizer_runs()[name]
    assert_close_weights(rank0["weights"], single["weights"])
    for key, value in single["optimizer"]["global"].items():
        if isinstance(value, float):
            assert rank0["optimizer"]["global"][key] == pytest.approx(value, rel=1e-5), key


def test_a_run_killed_mid_epoch_resumes_at_another_world_size(two_ranks):
    """Killed on 2 processes, resumed on 1; and killed on 1, resumed on 2: both finish as the
    uninterrupted run does (float tolerance: the shares sum in another order)."""
    straight_model = tiny("sasrec")
    straight = fit(straight_model, toy_data(), config(**KILL_CONFIG), callbacks=[KillAt(None)], progress=False)
    ckpt = torch.load(two_ranks["kill_dir"] / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and 0 < ckpt["loader"]["pos"] < len(ckpt["loader"]["order"]), "checkpoint mid-pass"
    on_one = resumed_run(two_ranks["kill_dir"])
    on_two = two_ranks["ranks"][0]["resumed"]
    for resumed in (on_one, on_two):
        history = resumed["result"]["history"]
        assert [h["epoch"] for h in history] == [1, 2, 3, 4]
        assert [h["steps"] for h in history] == [h["steps"] for h in straight.history]
        assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in straight.history],
                                                                    rel=1e-4)
        assert_close_weights(resumed["weights"], weights(straight_model), rtol=1e-4, atol=1e-5)
        assert resumed["result"]["test"] == pytest.approx(straight.test, abs=1e-6)
    assert on_one["result"]["world_size"] == 1 and on_two["result"]["world_size"] == WORLD


# --------------------------------------------------------------------------- bad input
def test_ranks_with_different_data_fail_on_every_rank(two_ranks):
    for r, got in enumerate(two_ranks["ranks"]):
        assert f"rank {r}: ranks disagree on the checksum of dataset 'toy'" in got["bad_input"]["checksum"]
        assert "rank(s) [1] differ from rank 0" in got["bad_input"]["checksum"]


def test_more_processes_than_users_is_a_clear_error(two_ranks):
    for got in two_ranks["ranks"]:
        assert "2 processes for the 1 users of 'toy'" in got["bad_input"]["too_many_ranks"]


def test_a_missing_rendezvous_fails_within_the_timeout(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # the second process never comes
    started = time.perf_counter()
    with pytest.raises(DistributedError, match=r"rank 0 of 2: the rendezvous at 127\.0\.0\.1:\d+ did not complete "
                                               r"within 2 s"):
        distributed.init_from_env(timeout_s=2)
    assert time.perf_counter() - started < 2 + 10
    assert not torch.distributed.is_initialized()


def test_no_torchrun_environment_is_a_clear_error(monkeypatch):
    for key in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DistributedError, match="RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        distributed.init_from_env(timeout_s=1)


def test_rank_shares_cover_the_batch_in_balanced_parts():
    counts = np.array([10, 3, 10, 7, 1, 10, 2, 9])
    for world in (1, 2, 3, 4):
        bounds = share_bounds(counts, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(counts)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), "consecutive, no window twice"
        pairs = [int(counts[a:b].sum()) for a, b in bounds]
        assert max(pairs) - min(pairs) <= 2 * counts.max()
    assert share_bounds([5], 2) in ([(0, 1), (1, 1)], [(0, 0), (0, 1)]), "one window: one rank idles"


def test_shard_specifications():
    assert Shard.parse("2/8") == Shard(2, 8) and Shard(2, 8).select(20) == [1, 9, 17]
    assert sorted(i for k in range(1, 4) for i in Shard(k, 3).select(10)) == list(range(10))
    for bad in ("3/2", "0/2", "a/b", "2", "2/0"):
        with pytest.raises(ValueError, match="shard"):
            Shard.parse(bad)
    with pytest.raises(ValueError, match="9 shards for 4 runs"):
        Shard(1, 9).select(4)


# --------------------------------------------------------------------------- many runs, shards
STRIP = {"wall_seconds", "train_seconds", "eval_seconds", "seconds"}  # timings differ between runs


def without_timings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in STRIP}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


SMALL = ["-p", "models", "[gru4rec, sasrec]", "-p", "seeds", "[1, 2]"]


@pytest.fixture(scope="module")
def shards(real_data, tmp_path_factory) -> dict[str, Any]:
    """The smoke quality study (two models, two seeds) in one go and in two shards, merged."""
    from paperlib.cli import main
    from paperlib.config import merge
    from paperlib.results import find_partial_results, load_results
    from paperlib.studies import quality

    root = tmp_path_factory.mktemp("shards")
    os.environ["PAPERLIB_BUILD"] = str(root / "build")
    try:
        cfg = merge(quality.QualityParams, "02_quality", "smoke",
                    {"models": ["gru4rec", "sasrec"], "seeds": [1, 2], "recompute": True,
                     "output_dir": str(root / "whole")})
        whole = quality.compute(cfg, progress=False)
        for i in (1, 2):
            assert main(["run", "02_quality", "--preset", "smoke", "--shard", f"{i}/2", *SMALL,
                         "--output-dir", str(root / "sharded")]) == 0
    finally:
        os.environ.pop("PAPERLIB_BUILD", None)
    partials = find_partial_results("quality", "smoke", root / "sharded")
    assert main(["merge", "02_quality", "--preset", "smoke", "--output-dir", str(root / "sharded")]) == 0
    return {"whole": whole, "merged": load_results("quality", "smoke", root / "sharded"), "partials": partials,
            "root": root}


def test_shards_merged_equal_an_unsharded_run(shards):
    whole, merged = shards["whole"], shards["merged"]
    assert [p.name for p in shards["partials"]] == ["quality.smoke.1-of-2.json", "quality.smoke.2-of-2.json"]
    assert len(merged["results"]["runs"]) == 4
    assert without_timings(merged["results"]) == without_timings(whole["results"])
    differ = {k for k in whole["params"] if whole["params"][k] != merged["params"][k]}
    assert differ == {"output_dir"}
    assert [s["shard"] for s in merged["provenance"]["merged_from"]] == [1, 2]


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    doc = json.loads(src.read_text())
    edit(doc)
    dst.write_text(json.dumps(doc))
    return dst


def test_merge_refuses_overlapping_incomplete_or_incompatible_shards(shards, tmp_path, capsys):
    from paperlib.cli import main

    one, two = shards["partials"]
    again = tmp_path / "again.json"
    shutil.copy(one, again)
    lr = _edited_copy(two, tmp_path / "lr.json", lambda d: d["params"].update(lr=0.5))
    code = _edited_copy(two, tmp_path / "code.json", lambda d: d.update(code="0" * 40))
    split = _edited_copy(two, tmp_path / "split.json", lambda d: d["shard"].update(count=3))
    cases = {
        (one, again, two): "shard 1/2 appears twice",
        (one,): "shard(s) 2/2 missing",
        (one, lr): "different settings: lr=0.5 vs 0.001",
        (one, code): "different code",
        (one, split): "the study was split differently",
    }
    for files, message in cases.items():
        args = ["merge", "02_quality", "--preset", "smoke", "--output-dir", str(tmp_path / "out"), "--files", *map(str, files)]
        assert main(args) == 2
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "out" / "results" / "quality.smoke.json").exists()


def test_cli_refuses_bad_spreading(capsys):
    from paperlib.cli import main

    for args, message in (
        (["run", "02_quality", "--shard", "3/2"], "shard 3/2"),
        (["run", "02_quality", "--nproc", "0"], "--nproc must be at least 1"),
        (["run", "01_datasets", "--nproc", "2"], "01_datasets cannot be spread"),
        (["run", "02_quality", "--shard", "1/2", "--render"], "--render draws from existing results"),
        (["merge", "02_quality", "--preset", "smoke", "--output-dir", "/nonexistent/x"], "no partial results"),
    ):
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, message


def test_run_nproc_trains_with_torchrun(real_data, tmp_path, monkeypatch):
    """``paperlib run … --nproc 2`` as a user types it: torchrun starts two processes that train
    the smoke study together; rank 0 alone writes the (here: single-shard) results."""
    from paperlib.cli import main
    from paperlib.results import load_partial_results, partial_results_path

    monkeypatch.setenv("PAPERLIB_BUILD", str(tmp_path / "build"))
    monkeypatch.setenv("PAPERLIB_DIST_TIMEOUT", "120")
    assert main(["run", "02_quality", "--preset", "smoke", "--nproc", "2", "--shard", "1/1", "-p", "models",
                 "[gru4rec]", "--output-dir", str(tmp_path)]) == 0
    doc = load_partial_results(partial_results_path("quality", "smoke", "1-of-1", tmp_path))
    (run,) = doc["results"]["runs"]
    assert run["world_size"] == 2 and run["model"] == "gru4rec" and len(run["history"]) >= 1
    assert sorted(p.name for p in (tmp_path / "results" / "shards").iterdir()) == ["quality.smoke.1-of-1.json"]
