"""The cost study's parts: streaming paths against the full forward, the measurement module
(statistics, FLOPs, memory, points in their own processes, out of memory and timeouts), the study's
summaries on hand-made records, and its bad-input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from paperlib import cost
from paperlib.fields import ConfigError
from paperlib.models import build_model

N_ITEMS = 40
STREAMING = {
    "sasrec": {"hidden_size": 16, "inner_size": 32, "n_layers": 2},
    "gru4rec": {"hidden_size": 16, "gru_hidden_size": 24, "num_layers": 2},
    "mamba4rec": {"hidden_size": 16, "n_layers": 2},
}


def _model(name: str, max_len: int = 12) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, n_items=N_ITEMS, max_len=max_len, **STREAMING[name]).eval()


def _items(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, N_ITEMS + 1, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- streaming = full forward
@pytest.mark.parametrize("name", list(STREAMING))
def test_recurrent_path_scores_equal_the_full_forward_at_every_length(name):
    model = _model(name)
    items = _items()
    with torch.no_grad():
        full = model(items) @ model.output_embedding().t()  # (B, L, V): scores after every prefix
    streamed = model.stream_scores(items)
    assert streamed.shape == full.shape and torch.isneginf(streamed[..., 0]).all()
    torch.testing.assert_close(streamed[..., 1:], full[..., 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(STREAMING))
def test_prefill_then_steps_equal_the_full_forward(name):
    """A service encodes a user's history once, then steps: every later position equals forward."""
    model = _model(name)
    items = _items(length=10, seed=1)
    with torch.no_grad():
        full = model(items)
        for k in (1, 4, 9):
            hidden, state = model.prefill(items[:, :k])
            torch.testing.assert_close(hidden, full[:, :k], rtol=1e-5, atol=1e-5)
            for t in range(k, items.shape[1]):
                h, state = model.step(items[:, t], state)
                torch.testing.assert_close(h, full[:, t], rtol=1e-5, atol=1e-5, msg=f"prefill {k}, position {t}")


@pytest.mark.parametrize("name", ["gru4rec", "mamba4rec"])
def test_a_state_step_leaves_its_input_state_unchanged(name):
    model = _model(name)
    items = _items(length=5, seed=2)
    with torch.no_grad():
        _, state = model.prefill(items[:, :4])
        first, _ = model.step(items[:, 4], state)
        again, _ = model.step(items[:, 4], state)  # the same state again: the same answer
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_kv_cache_grows_one_position_per_item_and_truncates():
    model = _model("sasrec")
    items = _items(length=8, seed=3)
    with torch.no_grad():
        full = model(items)
        _, cache = model.prefill(items[:, :5])
        assert cache.length == 5 and cache.capacity == model.config.max_len
        per_position = 2 * 2 * 2 * 16 * 4  # layers × (keys, values) × batch × hidden × float32 bytes
        assert cache.nbytes() == 5 * per_position
        h, cache = model.step(items[:, 5], cache)
        assert cache.length == 6 and cache.nbytes() == 6 * per_position
        torch.testing.assert_close(h, full[:, 5], rtol=1e-5, atol=1e-5)
        cache.truncate(5)  # forget the newest item and take another path
        other = items[:, 5] % N_ITEMS + 1
        h_other, _ = model.step(other, cache)
        changed = items.clone()
        changed[:, 5] = other
        torch.testing.assert_close(h_other, model(changed)[:, 5], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(9)


def test_kv_cache_refuses_positions_beyond_max_len():
    model = _model("sasrec", max_len=4)
    with torch.no_grad():
        _, cache = model.prefill(_items(length=4))
        with pytest.raises(ValueError, match="max_len"):
            model.step(_items(length=1)[:, 0], cache)
        with pytest.raises(ValueError, match="max_len"):
            model.prefill(_items(length=5))
    with pytest.raises(ValueError, match="capacity"):
        model.allocate_states(1, capacity=5)


def test_streaming_refuses_unknown_items():
    for name in STREAMING:
        model = _model(name)
        _, state = model.prefill(_items(length=3))
        with pytest.raises(ValueError, match="item ids must lie in"):
            model.step(torch.tensor([N_ITEMS + 1, 1]), state)


# --------------------------------------------------------------------------- statistics and fits
def test_summary_is_median_and_quartiles():
    s = cost.summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["q25"], s["q75"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert cost.summary([2.0])["q25"] == 2.0 and cost.summary([])["n"] == 0


def test_fit_exponent_recovers_a_power_law():
    sizes = [50, 100, 200, 400, 800]
    assert cost.fit_exponent(sizes, [3.0 * x**1.5 for x in sizes]) == pytest.approx(1.5)
    assert cost.fit_exponent(sizes, [7.0] * 5) == pytest.approx(0.0, abs=1e-12)
    assert cost.fit_exponent([100], [1.0]) is None


def test_crossover_from_the_data():
    sizes = [100, 200, 400, 800]
    # ours ∝ L, theirs ∝ L²/400: equal at L = 400 exactly, ours cheaper beyond
    ours = [float(x) for x in sizes]
    theirs = [x * x / 400 for x in sizes]
    c = cost.crossover(sizes, ours, theirs)
    assert c["from"] == 800 and not c["always"] and not c["never"]
    assert c["estimate"] == pytest.approx(400.0)
    assert cost.crossover(sizes, [1, 1, 1, 1], [2, 2, 2, 2])["always"]
    assert cost.crossover(sizes, [3, 3, 3, 3], [2, 2, 2, 2])["never"]
    # theirs out of memory (None) at the longest length: ours is cheaper there
    c = cost.crossover(sizes, [3, 3, 3, 3], [2, 2, 2, None])
    assert c["from"] == 800 and c["estimate"] is None
    # cheaper, then dearer again at a longer length: not a crossover
    assert cost.crossover(sizes, [1, 1, 3, 3], [2, 2, 2, 2])["never"]


def test_seconds_are_printed_with_a_unit():
    assert cost.fmt_seconds(2.5e-4) == "250 µs" and cost.fmt_seconds(0.0123) == "12.3 ms"
    assert cost.fmt_seconds(12.345) == "12.3 s" and cost.fmt_seconds(float("nan")) == "n/a"


# --------------------------------------------------------------------------- FLOPs
def test_gru4rec_flops_per_item_match_the_formula():
    model = build_model("gru4rec", n_items=100, max_len=20)
    d, h = model.config.hidden_size, model.config.gru_hidden_size
    expected = 2 * (d * 3 * h + h * 3 * h) + 2 * h * d  # input and hidden gates, then the dense layer
    assert cost.forward_flops_per_item(model, 20, 100) == expected


def test_attention_flops_grow_with_the_length_and_the_scan_does_not():
    sas = build_model("sasrec", n_items=100, max_len=64)
    d, layers = sas.config.hidden_size, sas.config.n_layers
    grow = cost.forward_flops_per_item(sas, 64, 100) - cost.forward_flops_per_item(sas, 16, 100)
    assert grow == pytest.approx(layers * 4 * d * (64 - 16))  # QKᵀ and PV: 4·L·D per item and layer
    mamba = build_model("mamba4rec", n_items=100, max_len=64)
    f16, f64 = (cost.forward_flops_per_item(mamba, n, 100) for n in (16, 64))
    assert f64 == pytest.approx(f16, rel=1e-2)  # constant per item (the conv's padding aside)
    block = mamba.mamba_layers[0].mamba
    assert cost.scan_flops_per_item(mamba) == 6 * block.d_inner * block.d_state


# --------------------------------------------------------------------------- memory and timing
def test_memory_meter_sees_an_allocation():
    meter = cost.MemoryMeter("cpu")
    meter.set_baseline()
    meter.reset()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written
    peak = meter.peak()
    del x
    assert peak >= 60 * 2**20


def test_time_runs_counts_warmup_and_repeats():
    calls = []
    times, peaks = cost.time_runs(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3 and peaks == [] and all(t >= 0 for t in times)


# --------------------------------------------------------------------------- points in their own process
def test_a_training_step_point_runs_in_its_own_process():
    point = cost.TrainStepPoint(model="sasrec", options={"n_layers": 1}, batch=2, length=8, n_items=50,
                                threads=1, repeats=3)
    r = cost.run_point(point, timeout_s=120)
    assert r["status"] == "ok", r["message"]
    assert r["kind"] == "train_step" and r["options"] == {"n_layers": 1}
    assert len(r["seconds"]) == 3 and all(s > 0 for s in r["seconds"])
    assert len(r["peak_bytes"]) == 3 and min(r["peak_bytes"]) >= 4 * r["params"]
    assert r["pairs"] == 16 and r["flops_per_item"] > 0
    assert r["load_before"] is not None and r["load_after"] is not None


@pytest.mark.parametrize("mode,name", [("step", "mamba4rec"), ("step", "gru4rec"), ("kv_cache", "sasrec"),
                                       ("recompute", "bert4rec")])
def test_stream_points_record_latency_and_state(mode, name):
    r = cost.run_point(cost.StreamPoint(model=name, mode=mode, history=6, n_items=50, threads=1, repeats=3,
                                        warmup=1), timeout_s=120)
    assert r["status"] == "ok", r["message"]
    assert len(r["seconds"]) == 3 and r["state_bytes"] > 0


def test_out_of_memory_is_recorded_and_the_sweep_goes_on():
    big = cost.TrainStepPoint(model="sasrec", batch=64, length=512, n_items=50, threads=1, repeats=1)
    bigger = cost.TrainStepPoint(model="sasrec", batch=64, length=1024, n_items=50, threads=1, repeats=1)
    small = cost.InferencePoint(model="gru4rec", batch=2, length=8, n_items=50, threads=1, repeats=1)
    records = cost.run_points([big, bigger, small], memory_limit=64 * 2**20, progress=False)
    assert [r["status"] for r in records] == ["oom", "skipped", "ok"]
    assert "allocate" in records[0]["message"] and "out of memory" in records[1]["message"]
    assert records[0]["memory_limit"] == 64 * 2**20


def test_a_point_past_its_time_is_stopped():
    point = cost.EpochPoint(model="sasrec", dataset="ml-100k", threads=1)  # needs far more than 0.05 s
    r = cost.run_point(point, timeout_s=0.05)
    assert r["status"] == "timeout" and "stopped after" in r["message"]


def test_an_error_inside_a_point_is_reported():
    point = cost.EpochPoint(model="sasrec", dataset="ml-100k", batch_size=1, threads=1)
    r = cost.run_point(point, timeout_s=120)  # a batch smaller than one training window
    assert r["status"] == "error" and "batch_size" in r["message"]


# --------------------------------------------------------------------------- bad input
def test_unknown_model_device_or_mode_is_refused_before_running():
    with pytest.raises(ConfigError, match="'model' must be one of"):
        cost.TrainStepPoint(model="transformer")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        cost.TrainStepPoint(model="sasrec", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            cost.InferencePoint(model="sasrec", device="cuda")
    with pytest.raises(ConfigError, match="'recompute' works for every model"):
        cost.StreamPoint(model="sasrec", mode="step")
    with pytest.raises(ConfigError, match="mode"):
        cost.StreamPoint(model="sasrec", mode="teleport")
    with pytest.raises(ConfigError, match="n_items or max_len"):
        cost.TrainStepPoint(model="sasrec", options={"max_len": 5})


# --------------------------------------------------------------------------- the study
def _record(section, label, kind, **kw):
    base = {"section": section, "label": label, "kind": kind, "status": "ok", "message": "", "params": 1000,
            "flops_per_item": 1.0, "load_before": [1.0, 1.0, 1.0], "load_after": [1.0, 1.0, 1.0], "repeats": 5}
    return {**base, **kw}


def _doc(status_800="ok"):
    """A hand-made results doc: Mamba4Rec ∝ L, SASRec ∝ L² (cheaper below L = 400)."""
    from paperlib.studies import cost as study

    points = []
    for model, label, f, mem in (("sasrec", "SASRec", lambda x: x * x / 400, lambda x: x * x * 1e3),
                                 ("mamba4rec", "Mamba4Rec", lambda x: float(x), lambda x: x * 4e5)):
        for length in (100, 200, 400, 800):
            ok = not (label == "SASRec" and length == 800 and status_800 != "ok")
            for kind in ("train_step", "inference"):
                extra = {"seconds": [f(length) * s for s in (0.9, 1.0, 1.0, 1.0, 1.1)],
                         "peak_bytes": [mem(length)] * 5} if ok else {}
                points.append(_record("scaling", label, kind, model=model, length=length, batch=16, pairs=16 * length,
                                      status="ok" if ok else status_800,
                                      message="" if ok else "RuntimeError: can't allocate memory", **extra))
        for kind, extra in (("epoch", {"epoch_seconds": [f(200) * 10] * 5, "seconds": [f(200)] * 5,
                                       "peak_bytes": [mem(200)] * 5, "steps_timed": 2, "steps_per_epoch": 20,
                                       "pairs_per_epoch": 1000, "memory_method": "cpu"}),
                            ("inference", {"seconds": [f(200) / 10] * 5, "peak_bytes": [mem(200)] * 5,
                                           "users": 64, "length": 200})):
            points.append(_record("table3", label, kind, model=model, **extra))
        for mode in (("kv_cache", "recompute") if model == "sasrec" else ("step",)):
            for h in (1, 50, 3200):
                lat = 1e-3 if model == "mamba4rec" else 1e-3 * (1 + h / 100)
                points.append(_record("streaming", label, "stream", model=model, mode=mode, history=h,
                                      seconds=[lat] * 5, state_bytes=100 if model == "mamba4rec" else 10 * h))
    params = {"models": ["sasrec", "mamba4rec"], "lengths": [100, 200, 400, 800], "histories": [1, 50, 3200],
              "scaling_batch": 16, "repeats": 5, "warmup": 1, "dataset": "ml-1m", "train_batch_size": 2048}
    results = {"points": points, "device": "cpu", "device_description": "cpu: test (2 threads)", "threads": 2,
               "machine": {"usable_cores": 2, "memory_total_gb": 8.0},
               "load_average": {"before": [0.1, 0.1, 0.1], "after": [2.0, 1.0, 0.5]},
               "published": study.PUBLISHED, "targets": study.TARGETS}
    return {"params": params, "results": results}


def test_study_reads_exponents_crossovers_and_targets_from_the_records():
    from paperlib.studies import cost as study

    doc = _doc()
    fits = study.exponents(doc)
    assert fits.loc["Mamba4Rec", "train step time"] == pytest.approx(1.0, abs=0.01)
    assert fits.loc["SASRec", "train step time"] == pytest.approx(2.0, abs=0.01)
    cross = study.crossovers(doc).loc[("Mamba4Rec", "training step time")]
    assert cross["cheaper than SASRec"] == "from L = 800" and cross["crossing (log-log estimate)"] == 400
    t = study.targets(doc)
    ratio_200 = t.loc[[i for i in t.index if "L = 200" in i][0]]
    assert ratio_200["measured"] == "2.00×" and ratio_200["met"] == "no"  # 200 / (200²/400)
    ratio_800 = t.loc[[i for i in t.index if "L = 800" in i][0]]
    assert ratio_800["measured"] == "0.50×" and ratio_800["met"] == "yes"
    growth = t.loc[[i for i in t.index if "within" in i][0]]
    assert growth["measured"] == "1.00×" and growth["met"] == "yes"
    table = study.table3(doc)
    assert table.loc[("training epoch (s)", "published / SASRec"), "Mamba4Rec"] == f"{75.52 / 131.24:.2f}"
    assert table.loc[("training epoch (s)", "ours / SASRec"), "Mamba4Rec"] == "2.00"
    assert "quiet" in study.load_text(doc)
    study.check_results(doc)


def test_an_out_of_memory_point_is_shown_and_counts_as_dearer():
    from paperlib.studies import cost as study

    doc = _doc(status_800="oom")
    frame = study.points_frame(doc)
    assert (frame["status"] == "oom").sum() == 2  # train step and inference of SASRec at L = 800
    cross = study.crossovers(doc).loc[("Mamba4Rec", "training step time")]
    assert cross["cheaper than SASRec"] == "from L = 800"
    fig = study.figure3(doc)  # draws the failed points as crosses
    assert any(line.get_marker() == "X" for ax in fig.axes for line in ax.lines)
    study.check_results(doc)


def test_a_loaded_machine_is_said_to_be_one():
    from paperlib.studies import cost as study

    doc = _doc()
    for r in doc["results"]["points"]:
        r["load_before"] = [6.0, 5.0, 4.0]
    assert "loaded" in study.load_text(doc)


def test_study_parameters_are_checked():
    from paperlib.studies.cost import CostParams

    with pytest.raises(ConfigError, match="unknown model"):
        CostParams(models=["sasrec", "transformer"])
    with pytest.raises(ConfigError, match="must include sasrec"):
        CostParams(models=["mamba4rec"])
    with pytest.raises(ConfigError, match="unknown device"):
        CostParams(device="tpu")
    with pytest.raises(ConfigError, match="'lengths' must be >= 1, got 0"):
        CostParams(lengths=[0, 100])


def test_smoke_study_end_to_end(real_data, tmp_path):
    """The smoke preset's compute run, its check, and every table and figure drawn from its JSON."""
    from paperlib.config import merge
    from paperlib.studies import cost as study

    cfg = merge(study.CostParams, "03_cost", "smoke", {"output_dir": str(tmp_path), "recompute": True})
    doc = study.compute(cfg, progress=False)
    study.check_results(doc)
    assert all(r["status"] == "ok" for r in doc["results"]["points"])
    table = study.table3(doc)
    assert list(table.columns) == ["GRU4Rec", "SASRec", "BERT4Rec", "Mamba4Rec"]
    study.figure3(doc)
    study.figure4(doc)
    assert not study.targets(doc).empty and not study.stream_table(doc).empty
    assert math.isfinite(float(np.nanmax(study.points_frame(doc)["median_s"])))


# --------------------------------------------------------------------------- Mamba4Rec's CPU fast path
def test_hash_dropout_drops_p_and_scales_the_rest():
    from paperlib.models.scan import dropout

    x = torch.rand(1_000_000) + 0.5  # no zeros of its own
    torch.manual_seed(0)
    y = dropout(x, 0.2)
    dropped = float((y == 0).double().mean())
    assert abs(dropped - 0.2) < 4 * math.sqrt(0.2 * 0.8 / x.numel())
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    # neighbouring elements are not correlated (a counter-based mask must look independent)
    k = kept.double()
    corr = float(((k[1:] - 0.8) * (k[:-1] - 0.8)).mean() / (0.8 * 0.2))
    assert abs(corr) < 0.01
    assert torch.equal(dropout(x, 0.2, training=False), x) and torch.equal(dropout(x, 0.0), x)
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.0)


def test_hash_dropout_gradient_uses_the_forward_mask_and_seeds_follow_torch():
    from paperlib.models.scan import dropout

    x = (torch.rand(3, 50, 7, dtype=torch.float64) + 0.5).requires_grad_()
    torch.manual_seed(1)
    y = dropout(x, 0.3)
    (grad,) = torch.autograd.grad((y * 2).sum(), x)
    torch.testing.assert_close(grad, torch.where(y != 0, 2 / 0.7, 0.0).to(grad.dtype))
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.3), y)  # torch.manual_seed reproduces the mask
    assert not torch.equal(dropout(x, 0.3), y)  # the next call draws another


def test_mamba4rec_trains_with_the_cheaper_dropout_and_evaluates_without():
    from paperlib.models.mamba4rec import Dropout

    model = _model("mamba4rec").train()
    assert sum(isinstance(m, Dropout) for m in model.modules()) == 1 + 2 * 2  # embedding; per layer 2
    items = _items(length=6)
    assert not torch.equal(model(items), model(items))  # a new mask each call
    model.eval()
    torch.testing.assert_close(model(items), model(items), rtol=0, atol=0)


def _block_pair(d_model: int, dtype: torch.dtype, seed: int = 0):
    """A Mamba block with non-trivial Δ, conv bias, D and A (the init leaves some of them flat)."""
    from paperlib.models.mamba_block import MambaBlock

    torch.manual_seed(seed)
    block = MambaBlock(d_model=d_model, d_state=8, d_conv=4, expand=2).to(dtype)
    with torch.no_grad():
        block.dt_proj.weight.normal_(0, 0.5)
        block.conv1d.bias.normal_()
        block.D.normal_()
        block.A_log.add_(torch.randn_like(block.A_log) * 0.3)
    return block


# batch 1 splits channels over several jobs; L 130 spans three of the backward's chunks; E 48 is not
# a multiple of the kernels' lanes; L 3 is shorter than the convolution
@pytest.mark.parametrize("batch,length,d_model", [(3, 10, 16), (1, 130, 32), (5, 70, 24), (2, 3, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_cpu_block_equals_the_step_by_step_path_and_the_reference(batch, length, d_model, dtype):
    """The fused path computes what the unfused one does (numba scan) and what the plain loop does."""
    block = _block_pair(d_model, dtype)
    x = torch.randn(batch, length, d_model, dtype=dtype, requires_grad=True)
    weights = torch.randn(batch, length, d_model, dtype=dtype)
    params = [x, *block.parameters()]
    names = ["x", *(n for n, _ in block.named_parameters())]
    results = {}
    for label, fused, backend in (("fused", True, "cpu"), ("unfused", False, "cpu"), ("reference", True, "reference")):
        block.fuse_cpu, block.scan_backend = fused, backend
        assert block._use_fused(x) == (label == "fused")
        y = block(x)
        results[label] = (y.detach(), torch.autograd.grad((y * weights).sum(), params))
    tol = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}[dtype]
    y_f, g_f = results["fused"]
    for other in ("unfused", "reference"):
        y_o, g_o = results[other]
        torch.testing.assert_close(y_f, y_o, **tol)
        for name, a, b in zip(names, g_f, g_o):
            torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * float(b.abs().max()),
                                       msg=f"{name} vs {other}")


def test_fused_cpu_block_state_continues_the_stream():
    block = _block_pair(16, torch.float32).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        full = block(x)
        head, state = block(x[:, :6], return_state=True)
        block.fuse_cpu = False
        _, unfused_state = block(x[:, :6], return_state=True)
        torch.testing.assert_close(state.ssm, unfused_state.ssm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.conv, unfused_state.conv, rtol=0, atol=0)
        for t in range(6, 9):
            y, state = block.step(x[:, t], state)
            torch.testing.assert_close(y, full[:, t], rtol=1e-5, atol=1e-6)


def test_fused_cpu_path_passes_gradcheck():
    from paperlib.models.scan import mamba_inner_cpu

    g = torch.Generator().manual_seed(0)
    E, N, K, R = 5, 3, 4, 2
    args = [
        torch.randn(2, 7, 2 * E, dtype=torch.float64, generator=g),  # xz
        torch.randn(E, K, dtype=torch.float64, generator=g) * 0.5,  # conv weight
        torch.randn(E, dtype=torch.float64, generator=g),  # conv bias
        torch.randn(R + 2 * N, E, dtype=torch.float64, generator=g) * 0.5,  # x_proj
        torch.randn(E, R, dtype=torch.float64, generator=g) * 0.5,  # dt_proj weight
        torch.randn(E, dtype=torch.float64, generator=g) * 0.5,  # dt_proj bias
        -torch.rand(E, N, dtype=torch.float64, generator=g) - 0.5,  # A
        torch.randn(E, dtype=torch.float64, generator=g),  # D
    ]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: mamba_inner_cpu(*a)[0], tuple(args), eps=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="xz must be"):
        mamba_inner_cpu(args[0][..., :-1], *args[1:])


# --------------------------------------------------------------------------- paperlib bench
def test_bench_prints_figures_targets_and_the_load(capsys):
    from paperlib import bench

    bench.bench_train_step(shapes=((2, 16, 0.8),), rounds=2, repeats=2, threads=1, n_items=50)
    bench.bench_scaling(lengths=(8, 16), batch=2, repeats=2, threads=1, n_items=50)
    bench.bench_streaming(histories=(1, 50), repeats=3, threads=1, n_items=50)
    out = capsys.readouterr().out
    assert out.count("load average before") == 3 and out.count("load average after") == 3
    assert "cpu: " in out and "(1 threads)" in out  # the device is named
    assert "Mamba4Rec / SASRec at L 16" in out and "target ≤ 0.8" in out and "4 runs" in out
    assert "exponent of time in L" in out and "target ≤ 1.1" in out
    assert "SASRec: key/value cache" in out and "target < 5 ms" in out
    assert set(bench.BENCHMARKS) == {"metrics", "scan", "train-step", "scaling", "streaming", "ddp"}


def test_sizes_table_reads_parameters_and_flops():
    from paperlib.studies import cost as study

    table = study.sizes(_doc())
    assert list(table.index) == ["SASRec", "Mamba4Rec"]
    assert table.loc["SASRec", "parameters"] == "1,000" and table.loc["Mamba4Rec", "kFLOPs/item at L 800"] == 0.0
