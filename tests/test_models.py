"""Unit tests of the recommenders and the model registry: shapes, causality, padding, BERT4Rec's
masking, input errors, registry errors and initialisation."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from paperlib.data.sequences import SequentialData, TrainBatch, TrainLoader, count_pairs, train_batches
from paperlib.models import MODELS, ModelRegistry, build_model, config_from_dict, model_name
from paperlib.models.bert4rec import BERT4Rec
from paperlib.models.gru4rec import GRU4Rec
from paperlib.models.sasrec import SASRec

N_ITEMS = 30
MAX_LEN = 8

#: tiny sizes so every test runs in milliseconds
TINY = {
    "sasrec": {"hidden_size": 16, "inner_size": 32},
    "bert4rec": {"hidden_size": 16, "inner_size": 32},
    "gru4rec": {"hidden_size": 16, "gru_hidden_size": 24},
    "mamba4rec": {"hidden_size": 16},
}


ALL = ["sasrec", "bert4rec", "gru4rec", "mamba4rec"]
CAUSAL = ["sasrec", "gru4rec", "mamba4rec"]


def tiny(name: str, n_items: int = N_ITEMS, max_len: int = MAX_LEN, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, n_items=n_items, max_len=max_len, **{**TINY[name], **extra}).eval()


def batch_of(rows: list[list[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, width) items and their lengths."""
    width = width or max(len(r) for r in rows)
    items = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        items[i, : len(r)] = torch.tensor(r)
    return items, torch.tensor([len(r) for r in rows])


ROWS = [[3, 7, 1, 9], [2, 2, 5, 11, 30, 4, 8, 6], [12]]


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", ALL)
def test_forward_and_score_shapes(name):
    model = tiny(name)
    items, lengths = batch_of(ROWS)
    hidden = model(items)
    assert hidden.shape == (3, items.shape[1], 16)
    scores = model.score(items, lengths)
    assert scores.shape == (3, N_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()
    assert model.output_embedding().shape == (N_ITEMS + 1, 16)


@pytest.mark.parametrize("name", ALL)
def test_loss_is_a_finite_scalar_with_gradients(name):
    model = tiny(name).train()
    items, lengths = batch_of([r[:-1] for r in ROWS if len(r) > 1])
    targets, _ = batch_of([r[1:] for r in ROWS if len(r) > 1], width=items.shape[1])
    loss = model.loss(TrainBatch(items=items, targets=targets, lengths=lengths))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_causal_loss_is_full_softmax_ce_over_all_positions():
    model = tiny("sasrec")
    items, lengths = batch_of([[1, 2, 3], [4, 5]])
    targets, _ = batch_of([[2, 3, 4], [5, 6]], width=3)
    loss = model.loss(TrainBatch(items=items, targets=targets, lengths=lengths))
    logits = model(items) @ model.item_embedding.weight.t()
    mask = targets > 0
    expected = F.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------- causality / padding
@pytest.mark.parametrize("name", CAUSAL)
def test_causal_models_do_not_look_ahead(name):
    model = tiny(name)
    assert model.causal
    base = torch.tensor([[5, 9, 2, 17, 3, 8, 1, 4]])
    out = model(base)
    for t in range(base.shape[1] - 1):
        changed = base.clone()
        changed[0, t + 1 :] = torch.tensor([(int(x) % N_ITEMS) + 1 for x in base[0, t + 1 :]])
        out2 = model(changed)
        torch.testing.assert_close(out2[0, : t + 1], out[0, : t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out2[0, t + 1 :], out[0, t + 1 :])


def test_bert4rec_is_bidirectional():
    model = tiny("bert4rec")
    assert not model.causal
    items = torch.tensor([[5, 9, 2, 17]])
    changed = items.clone()
    changed[0, 3] = 18
    assert not torch.allclose(model(items)[0, 0], model(changed)[0, 0])


@pytest.mark.parametrize("name", ALL)
def test_padding_does_not_change_real_positions(name):
    model = tiny(name)
    items, lengths = batch_of(ROWS)
    hidden = model(items)
    for i, row in enumerate(ROWS):
        alone, alone_len = batch_of([row])
        h_alone = model(alone)
        torch.testing.assert_close(hidden[i, : len(row)], h_alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.score(items, lengths)[i, 1:], model.score(alone, alone_len)[0, 1:], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_bidirectional_and_causal_padding_with_extra_columns(name):
    model = tiny(name)
    items, lengths = batch_of([[4, 5, 6]])
    padded, _ = batch_of([[4, 5, 6]], width=MAX_LEN - 1)
    torch.testing.assert_close(model(padded)[0, :3], model(items)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.score(padded, lengths), model.score(items, lengths), atol=1e-5, rtol=1e-5)


def test_padding_only_rows_stay_finite():
    for name in ("sasrec", "bert4rec", "gru4rec"):
        out = tiny(name)(torch.zeros(2, 4, dtype=torch.long))
        assert torch.isfinite(out).all(), name


# --------------------------------------------------------------------------- BERT4Rec specifics
def test_bert4rec_embedding_rows_and_mask_token():
    model = tiny("bert4rec")
    assert model.mask_token == N_ITEMS + 1
    assert model.item_embedding.num_embeddings == N_ITEMS + 2
    assert model.output_bias.shape == (N_ITEMS + 1,)
    assert model.output_embedding().shape[0] == N_ITEMS + 1  # [MASK] is never scored


def test_bert4rec_append_mask_after_history():
    model = tiny("bert4rec")  # max_len 8
    full = list(range(1, MAX_LEN + 1))
    items, lengths = batch_of([[3, 4], full])
    seqs, pos = model.append_mask(items, lengths)
    m = model.mask_token
    assert seqs.shape == (2, MAX_LEN)
    assert pos.tolist() == [2, MAX_LEN - 1]
    assert seqs[0].tolist() == [3, 4, m, 0, 0, 0, 0, 0]
    assert seqs[1].tolist() == full[1:] + [m]  # a full history drops its oldest item
    short, short_len = batch_of([[3, 4]])
    s2, p2 = model.append_mask(short, short_len)
    assert s2.tolist() == [[3, 4, m]] and p2.tolist() == [2]


def test_bert4rec_score_uses_the_mask_position():
    model = tiny("bert4rec")
    items, lengths = batch_of([[3, 4, 5]])
    hidden = model(torch.tensor([[3, 4, 5, model.mask_token]]))[0, 3]
    expected = hidden @ model.output_embedding().t() + model.output_bias
    scores = model.score(items, lengths)
    torch.testing.assert_close(scores[0, 1:], expected[1:])


def _tiny_data(n_users: int = 12, max_len: int = MAX_LEN) -> SequentialData:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, N_ITEMS + 1, size=rng.integers(4, 16)) for _ in range(n_users)]
    return SequentialData(name="tiny", sequences=seqs, n_items=N_ITEMS, max_len=max_len)


def test_bert4rec_rebuilds_the_training_window():
    data = _tiny_data()
    model = tiny("bert4rec")
    loader = TrainLoader(data, None, shuffle=False)
    (batch,) = list(loader)
    seqs, lengths, predictable = model.full_sequences(batch)
    w = loader.windows
    for row in range(len(w)):
        s = data.sequences[w.user[row]]
        expected = s[w.start[row] : w.stop[row] + 1][-MAX_LEN:].tolist()  # the window, last max_len items
        assert lengths[row] == len(expected)
        assert seqs[row, : len(expected)].tolist() == expected
        assert (seqs[row, len(expected) :] == 0).all()
        # predictable: exactly the window's counted targets, never its first item
        counted = batch.counted[row, : w.stop[row] - w.start[row]].tolist()
        assert predictable[row, : len(expected)].tolist() == ([False] + counted)[-len(expected):]
    # every training item after a user's first is predictable exactly once per epoch
    assert int(predictable.sum()) == count_pairs(data)


def test_bert4rec_masks_predictable_positions_only():
    model = tiny("bert4rec", mask_ratio=0.0, ft_ratio=0.0)  # only the forced position is masked
    seqs, lengths = batch_of([[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]], width=6)
    predictable = seqs > 0
    predictable[:, 0] = False
    predictable[1, 1] = False
    torch.manual_seed(1)
    masked, same = model.mask_positions(seqs, lengths, predictable)
    assert masked.sum(dim=1).tolist() == [1, 1, 1] and torch.equal(same, lengths)
    assert not (masked & ~predictable).any()
    model.config.mask_ratio = 0.5
    for _ in range(20):
        masked, _ = model.mask_positions(seqs, lengths, predictable)
        assert not (masked & ~predictable).any() and masked.any(dim=1).all()
    # RecBole's mask_item_length: at most int(mask_ratio * max_len) predictions, the most recent
    model.config.mask_ratio = 0.99
    long_seq, long_len = batch_of([list(range(1, 9))])
    masked, _ = model.mask_positions(long_seq, long_len, long_seq > 0)
    assert masked.tolist() == [[False] + [True] * 7]  # int(0.99 * 8) = 7
    model.config.ft_ratio = 1.0  # fine-tuning batches: cut at a predictable item, mask only it
    for _ in range(20):
        masked, cut = model.mask_positions(seqs, lengths, predictable)
        assert masked.sum(dim=1).tolist() == [1, 1, 1] and not (masked & ~predictable).any()
        assert masked.nonzero()[:, 1].tolist() == (cut - 1).tolist()


def test_bert4rec_fine_tuning_batch_is_next_item_prediction(monkeypatch):
    model = tiny("bert4rec", ft_ratio=1.0)
    model.eval()  # no dropout: the loss is a deterministic function of the masked input
    items, lengths = batch_of([[1, 2, 3, 4]])
    targets, _ = batch_of([[2, 3, 4, 5]])
    torch.manual_seed(0)
    loss = model.loss(TrainBatch(items=items, targets=targets, lengths=lengths))
    # the cut c was drawn from torch's RNG; one of the four next-item losses must match
    candidates = []
    for c in range(1, 5):
        seq = torch.tensor([[1, 2, 3, 4, 5][: c + 1]])
        seq[0, c] = model.mask_token
        h = model(seq)[0, c]
        logits = h @ model.output_embedding().t() + model.output_bias
        candidates.append(F.cross_entropy(logits[None], torch.tensor([c + 1])).item())
    assert min(abs(loss.item() - v) for v in candidates) < 1e-5


def test_bert4rec_loss_is_ce_on_masked_positions(monkeypatch):
    model = tiny("bert4rec")
    items, lengths = batch_of([[1, 2, 3], [4, 5]])
    targets, _ = batch_of([[2, 3, 10], [5, 6]], width=3)
    fixed = torch.tensor([[False, True, False, True], [False, True, False, False]])
    monkeypatch.setattr(model, "mask_positions", lambda seqs, lengths, predictable: (fixed, lengths))
    loss = model.loss(TrainBatch(items=items, targets=targets, lengths=lengths))
    seqs = torch.tensor([[1, 2, 3, 10], [4, 5, 6, 0]])
    hidden = model(seqs.masked_fill(fixed, model.mask_token))[fixed]
    logits = hidden @ model.output_embedding().t() + model.output_bias
    torch.testing.assert_close(loss, F.cross_entropy(logits, seqs[fixed]))


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ALL)
def test_ids_outside_the_catalogue_are_refused(name):
    model = tiny(name)
    items, lengths = batch_of([[1, 2, N_ITEMS + 1]])
    with pytest.raises(ValueError, match="item ids must lie in"):
        model.score(items, lengths)
    with pytest.raises(ValueError, match="item ids must lie in"):
        model(torch.tensor([[1, -1]]))


@pytest.mark.parametrize("name", ALL)
def test_empty_history_is_refused(name):
    model = tiny(name)
    items, _ = batch_of([[1, 2], [3]])
    with pytest.raises(ValueError, match="empty history"):
        model.score(items, torch.tensor([2, 0]))


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_sequences_longer_than_max_len_are_refused(name):
    with pytest.raises(ValueError, match="max_len"):
        tiny(name)(torch.ones(1, MAX_LEN + 1, dtype=torch.long))


# --------------------------------------------------------------------------- registry
def test_registry_names_and_lazy_mamba4rec():
    assert list(MODELS) == ["gru4rec", "sasrec", "bert4rec", "mamba4rec"]
    assert "mamba4rec" in MODELS and "transformer" not in MODELS
    assert MODELS["sasrec"] == (type(tiny("sasrec").config), SASRec)
    assert MODELS["gru4rec"][1] is GRU4Rec and MODELS["bert4rec"][1] is BERT4Rec
    for name in ("sasrec", "bert4rec", "gru4rec"):
        assert model_name(tiny(name)) == name


def test_a_lazy_entry_that_cannot_be_imported_says_so():
    registry = ModelRegistry(eager={}, lazy={"ghost": ("paperlib.models.no_such_module", "C", "M")})
    assert "ghost" in registry and list(registry) == ["ghost"]
    with pytest.raises(ImportError, match="model 'ghost' is registered but paperlib.models.no_such_module"):
        registry["ghost"]
    with pytest.raises(KeyError):
        registry["other"]


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'transformer'.*gru4rec, sasrec, bert4rec, mamba4rec"):
        build_model("transformer", n_items=5, max_len=4)
    with pytest.raises(ValueError, match="unknown model"):
        config_from_dict("nope", {})


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['hiden_size'\].*'hidden_size'"):
        build_model("sasrec", n_items=5, max_len=4, hiden_size=32)


@pytest.mark.parametrize(
    "option",
    [{"hidden_size": "64"}, {"n_layers": 2.5}, {"hidden_dropout_prob": "0.2"}, {"n_heads": True}, {"n_layers": None}],
)
def test_ill_typed_option_is_refused(option):
    with pytest.raises(ValueError, match="must be (int|float)|must be >= 1"):
        build_model("sasrec", n_items=5, max_len=4, **option)


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        build_model("sasrec", n_items=5, max_len=4, hidden_size=15, n_heads=2)
    with pytest.raises(ValueError, match="n_items"):
        build_model("gru4rec", n_items=0, max_len=4)
    with pytest.raises(ValueError, match="dropout"):
        build_model("bert4rec", n_items=5, max_len=4, hidden_dropout_prob=1.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        build_model("bert4rec", n_items=5, max_len=4, mask_ratio=-0.1)


@pytest.mark.parametrize("name", ["sasrec", "bert4rec", "gru4rec"])
def test_config_round_trips_through_a_weights_only_checkpoint(name):
    model = tiny(name)
    stored = dataclasses.asdict(model.config)
    buf = io.BytesIO()
    torch.save({"model_config": stored}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["model_config"]
    assert config_from_dict(name, loaded) == model.config
    # ints are accepted for float fields (YAML/JSON write 1 for 1.0)
    key = "dropout_prob" if name == "gru4rec" else "hidden_dropout_prob"
    assert isinstance(getattr(config_from_dict(name, {"n_items": 5, key: 0}), key), float)


def test_defaults_are_recboles():
    sas = build_model("sasrec", n_items=10, max_len=200).config
    assert (sas.n_layers, sas.n_heads, sas.hidden_size, sas.inner_size) == (2, 2, 64, 256)
    assert (sas.hidden_dropout_prob, sas.attn_dropout_prob, sas.layer_norm_eps) == (0.5, 0.5, 1e-12)
    bert = build_model("bert4rec", n_items=10, max_len=200).config
    assert (bert.hidden_dropout_prob, bert.attn_dropout_prob, bert.mask_ratio) == (0.2, 0.2, 0.2)
    gru = build_model("gru4rec", n_items=10, max_len=200).config
    assert (gru.hidden_size, gru.gru_hidden_size, gru.num_layers, gru.dropout_prob) == (64, 128, 1, 0.3)


# --------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_transformer_init_statistics(name):
    torch.manual_seed(0)
    model = build_model(name, n_items=2000, max_len=50)
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            w = mod.weight.detach()
            assert abs(w.mean().item()) < 0.003, mod_name
            assert abs(w.std().item() - 0.02) < 0.003, mod_name
        if isinstance(mod, torch.nn.Linear):
            assert torch.count_nonzero(mod.bias) == 0, mod_name
        if isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.count_nonzero(mod.bias) == 0, mod_name
            assert mod.eps == 1e-12
    if name == "bert4rec":
        assert torch.count_nonzero(model.output_bias) == 0


def test_gru4rec_init_statistics():
    torch.manual_seed(0)
    model = build_model("gru4rec", n_items=2000, max_len=50)
    emb = model.item_embedding.weight.detach()
    assert abs(emb.std().item() - math.sqrt(2.0 / (2001 + 64))) < 0.002  # xavier normal
    for name in ("weight_ih_l0", "weight_hh_l0"):
        w = getattr(model.gru_layers, name).detach()
        fan_out, fan_in = w.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier uniform
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert model.gru_layers.bias is False
    assert model.dense.in_features == 128 and model.dense.out_features == 64


def test_a_seeded_build_is_the_same_in_every_process():
    """torch seeds its RNG differently in each process: only a seeded build is reproducible."""
    import subprocess
    import sys

    code = ("from paperlib.models import build_model; "
            "m = build_model('gru4rec', n_items=30, max_len=8, seed=7); "
            "print(repr(sum(float(p.double().sum()) for p in m.parameters())))")
    sums = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(sums) == 1
    a = build_model("sasrec", n_items=30, max_len=8, seed=3)
    b = build_model("sasrec", n_items=30, max_len=8, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
