"""Mamba block and Mamba4Rec: names and shapes, init, causality, padding, streaming, oracles."""

from __future__ import annotations

import math

import pytest
import torch

from paperlib.data.sequences import TrainBatch
from paperlib.models.mamba4rec import Mamba4Rec, Mamba4RecConfig
from paperlib.models.mamba_block import MambaBlock

# mamba_ssm.Mamba(d_model=64, d_state=32, d_conv=4, expand=2): d_inner 128, dt_rank 4 (REFERENCES.md)
MAMBA_SSM_SHAPES = {
    "A_log": (128, 32),
    "D": (128,),
    "in_proj.weight": (256, 64),
    "conv1d.weight": (128, 1, 4),
    "conv1d.bias": (128,),
    "x_proj.weight": (4 + 64, 128),
    "dt_proj.weight": (128, 4),
    "dt_proj.bias": (128,),
    "out_proj.weight": (64, 128),
}


def _model(n_items=40, n_layers=1, seed=0, **kw) -> Mamba4Rec:
    torch.manual_seed(seed)
    return Mamba4Rec(Mamba4RecConfig(n_items=n_items, n_layers=n_layers, **kw))


def test_block_parameters_match_mamba_ssm():
    block = MambaBlock(d_model=64, d_state=32, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == MAMBA_SSM_SHAPES
    # mamba_ssm's own init, before Mamba4Rec's init_weights: softplus(dt bias) in [dt_min, dt_max]
    dt = torch.nn.functional.softplus(block.dt_proj.bias.detach())
    assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    assert float(block.dt_proj.weight.detach().abs().max()) <= 4**-0.5


def test_model_parameters_and_init():
    model = _model(n_items=500, n_layers=2)
    sd = model.state_dict()
    for i in range(2):
        for k, shape in MAMBA_SSM_SHAPES.items():
            assert tuple(sd[f"mamba_layers.{i}.mamba.{k}"].shape) == shape
        assert tuple(sd[f"mamba_layers.{i}.ffn.w_1.weight"].shape) == (256, 64)
        assert tuple(sd[f"mamba_layers.{i}.ffn.w_2.weight"].shape) == (64, 256)
    assert tuple(sd["item_embedding.weight"].shape) == (501, 64)
    assert not any("position" in k for k in sd)  # no position embedding
    block = model.mamba_layers[0].mamba.requires_grad_(False)
    model.item_embedding.requires_grad_(False)
    # init_weights reaches the Mamba block: dt_proj.bias zeroed (initial Δ = softplus(0)), as official
    assert torch.equal(block.dt_proj.bias, torch.zeros(128))
    torch.testing.assert_close(block.A_log, torch.log(torch.arange(1, 33.0)).repeat(128, 1))
    assert torch.equal(block.D, torch.ones(128))
    for w in (block.in_proj.weight, block.x_proj.weight, block.out_proj.weight, model.item_embedding.weight):
        assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    assert torch.equal(model.mamba_layers[0].ffn.w_1.bias, torch.zeros(256))
    # the depthwise conv keeps PyTorch's default init (uniform in ±1/sqrt(fan_in = 4))
    assert float(block.conv1d.weight.abs().max()) <= 0.5
    assert model.output_embedding() is model.item_embedding.weight  # tied


def test_config_defaults():
    cfg = Mamba4RecConfig(n_items=10)
    assert (cfg.hidden_size, cfg.n_layers, cfg.d_state, cfg.d_conv, cfg.expand) == (64, 1, 32, 4, 2)
    assert cfg.dropout == 0.2 and cfg.layer_norm_eps == 1e-12 and cfg.ffn_size == 256
    assert cfg.to_dict()["scan_backend"] == "auto"
    assert Mamba4RecConfig(n_items=10, hidden_size=32).ffn_size == 128


@pytest.mark.parametrize("n_layers", [1, 2])
def test_causal(n_layers):
    model = _model(n_layers=n_layers).eval()
    items = torch.randint(1, 41, (3, 12), generator=torch.Generator().manual_seed(0))
    changed = items.clone()
    changed[:, 7] = (changed[:, 7] % 40) + 1
    with torch.no_grad():
        a, b = model(items), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


def test_right_padding_does_not_change_real_positions():
    model = _model(n_layers=2).eval()
    items = torch.randint(1, 41, (2, 6), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([items, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded)[:, :6], model(items), rtol=1e-6, atol=1e-6)
        lengths = torch.tensor([6, 4])
        s = model.score(padded, lengths)
        assert torch.isinf(s[:, 0]).all()
        torch.testing.assert_close(s[1, 1:], model.score(items[1:, :4], lengths[1:])[0, 1:], rtol=1e-5, atol=1e-5)


def test_block_step_equals_forward():
    torch.manual_seed(0)
    block = MambaBlock(d_model=16, d_state=8, d_conv=4, expand=2)
    x = torch.randn(3, 10, 16)
    with torch.no_grad():
        full = block(x)
        state = block.allocate_state(3)
        assert state.conv.shape == (3, 32, 4) and state.ssm.shape == (3, 32, 8)
        steps = []
        for t in range(10):
            y, state = block.step(x[:, t], state)
            steps.append(y)
        torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-6)
        # the state after a forward pass continues the stream exactly
        head, st = block(x[:, :6], return_state=True)
        for t in range(6, 10):
            y, st = block.step(x[:, t], st)
        torch.testing.assert_close(y, full[:, -1], rtol=1e-5, atol=1e-6)


def test_model_stream_scores_equal_forward():
    model = _model(n_layers=2).eval()
    items = torch.randint(1, 41, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(items) @ model.output_embedding().t()
    streamed = model.stream_scores(items)
    torch.testing.assert_close(streamed[..., 1:], full[..., 1:], rtol=1e-5, atol=1e-5)


def test_block_matches_mambapy():
    """Independent oracle: mambapy's MambaBlock (same parameter names) with our weights."""
    from mambapy.mamba import MambaBlock as PyBlock, MambaConfig

    torch.manual_seed(0)
    ours = MambaBlock(d_model=32, d_state=16, d_conv=4, expand=2)
    theirs = PyBlock(MambaConfig(d_model=32, n_layers=1, d_state=16, d_conv=4, expand_factor=2))
    theirs.load_state_dict(ours.state_dict())  # strict: same names and shapes
    x = torch.randn(2, 11, 32, requires_grad=True)
    y_ours = ours(x)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-4, atol=1e-6)
    names = [name for name, _ in ours.named_parameters()]
    p_theirs = dict(theirs.named_parameters())
    g_ours = torch.autograd.grad(y_ours.square().sum(), [x, *ours.parameters()])
    g_theirs = torch.autograd.grad(y_theirs.square().sum(), [x, *(p_theirs[n] for n in names)])
    for name, a, b in zip(["x", *names], g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()), msg=name)


def test_checkpoint_moves_between_backends(tmp_path):
    model = _model(n_layers=2, scan_backend="cpu").eval()
    path = tmp_path / "m.pt"
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["scan_backend"] = "reference"
    other = Mamba4Rec(Mamba4RecConfig(**ckpt["config"]))
    other.load_state_dict(ckpt["state_dict"])
    other.eval()
    items = torch.randint(1, 41, (4, 15), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([15, 9, 3, 1])
    torch.testing.assert_close(model.score(items, lengths), other.score(items, lengths), rtol=1e-5, atol=1e-6)


def test_loss_and_backward_reach_every_parameter():
    model = _model(n_layers=2).train()
    items = torch.randint(1, 41, (4, 10), generator=torch.Generator().manual_seed(4))
    targets = torch.roll(items, -1, dims=1)
    targets[:, -1] = 0
    loss = model.loss(TrainBatch(items=items, targets=targets, lengths=torch.full((4,), 10)))
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(41)) < 1.0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert float(model.mamba_layers[0].mamba.A_log.grad.abs().sum()) > 0


def test_rejects_unknown_items():
    model = _model(n_items=40)
    with pytest.raises(ValueError, match="item ids must lie in 0..40"):
        model(torch.tensor([[1, 41]]))


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="dropout"):
        Mamba4Rec(Mamba4RecConfig(n_items=5, dropout=1.5))
    with pytest.raises(ValueError, match="scan_backend"):
        Mamba4Rec(Mamba4RecConfig(n_items=5, scan_backend="triton"))
    with pytest.raises(ValueError, match="n_items"):
        Mamba4Rec(Mamba4RecConfig(n_items=0))


def test_registry_builds_mamba4rec():
    from paperlib.models import build_model, config_from_dict, model_name

    model = build_model("mamba4rec", n_items=20, max_len=10, hidden_size=16, scan_backend="reference")
    assert isinstance(model, Mamba4Rec) and model_name(model) == "mamba4rec"
    assert config_from_dict("mamba4rec", model.config.to_dict()) == model.config
