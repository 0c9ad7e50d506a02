"""The cost study's parts: streaming paths against the full forward."""

from __future__ import annotations

import pytest
import torch

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
