"""SASRec (Kang & McAuley 2018): causal self-attention over the item history.

Follows RecBole 1.2's ``SASRec`` and its ``TransformerEncoder``: item embedding + learned position
embedding → LayerNorm → dropout → post-LN transformer layers (attention → dropout → residual +
LayerNorm, then FFN with GELU → dropout → residual + LayerNorm) → dot product with the tied item
embedding table. Parameter names match RecBole's (``trm_encoder.layer.0.multi_head_attention.query``
and so on). The transformer layers live here and BERT4Rec imports them.

Attention goes through ``F.scaled_dot_product_attention``, which picks a fused kernel (flash /
memory-efficient on GPU, flash on CPU without dropout) instead of materialising (B, H, L, L)
probabilities where it can.

Streaming (an online service updating one user's scores after each new item): ``prefill`` encodes a
history and keeps every layer's keys and values in a :class:`KVCache`; ``step`` then encodes one new
item as one query against them, O(length) work instead of a forward pass over the whole history.
Both equal ``forward`` at the same positions (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from paperlib.fields import ConfigError, param
from paperlib.models.base import ModelConfig, SequentialRecommender, init_weights


@dataclass
class SASRecConfig(ModelConfig):
    """RecBole's SASRec defaults (``SASRec.yaml``)."""

    hidden_size: int = param(64, "size of item embeddings and hidden states", min=1)
    n_layers: int = param(2, "transformer layers", min=1)
    n_heads: int = param(2, "attention heads (hidden_size must be a multiple)", min=1)
    inner_size: int = param(256, "feed-forward width", min=1)
    hidden_dropout_prob: float = param(0.5, "dropout on embeddings and layer outputs", min=0.0, below=1.0)
    attn_dropout_prob: float = param(0.5, "dropout on attention probabilities", min=0.0, below=1.0)
    layer_norm_eps: float = param(1e-12, "LayerNorm epsilon", min=0.0)
    initializer_range: float = param(0.02, "std of the normal init of Linear and Embedding weights", min=0.0)

    def validate(self) -> None:
        check_heads(self)


@dataclass
class KVCache:
    """Keys and values of every layer for the positions a causal transformer has seen, so that the
    next item costs one query against them instead of a forward pass over the whole history.

    Attributes:
        keys, values: one (B, H, capacity, D/H) buffer per layer; positions ``0..length-1`` hold
            the keys and values of the items seen so far (every row of the batch is at the same
            position: users of a batch advance together).
        length: positions filled.

    ``SASRec.step`` writes the new position into the buffers in place and advances ``length``;
    :meth:`truncate` forgets the newest positions (their slots are overwritten by the next step).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def truncate(self, length: int) -> None:
        """Go back to the state after ``length`` positions (0 <= length <= self.length)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def nbytes(self) -> int:
        """Bytes of the keys and values in use (the filled positions), over all layers."""
        per_position = sum(k[:, :, :1].nelement() * k.element_size() for k in self.keys + self.values)
        return per_position * self.length


def check_heads(config: ModelConfig) -> None:
    """hidden_size must split evenly over the attention heads."""
    if config.hidden_size % config.n_heads:
        raise ConfigError(f"hidden_size ({config.hidden_size}) must be a multiple of n_heads ({config.n_heads})")


class MultiHeadAttention(nn.Module):
    """Self-attention block, post-LN: ``LayerNorm(x + Dropout(Dense(Attention(x))))``."""

    def __init__(self, n_heads: int, hidden_size: int, hidden_dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_size = hidden_size // n_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = attn_dropout  # applied to the attention probabilities inside SDPA
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.out_dropout = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """x (B, L, D); attn_mask boolean, broadcastable to (B, H, L, L), True = may attend."""
        b, length, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, D) → (B, H, L, D/H)
            return t.view(b, length, self.n_heads, self.head_size).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            heads(self.query(x)),
            heads(self.key(x)),
            heads(self.value(x)),
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # scale 1/sqrt(D/H), as RecBole
        context = context.transpose(1, 2).reshape(b, length, d)
        return self.LayerNorm(self.out_dropout(self.dense(context)) + x)

    def forward_cached(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """Causal attention of the new positions ``x`` (B, T, D), which follow ``start`` cached ones.

        Their keys and values are written into ``keys``/``values`` (B, H, capacity, D/H) at
        ``start..start+T-1``; each new query attends to every cached position and to the new ones up
        to itself. Equals ``forward(…, is_causal=True)`` on the whole sequence at those positions.
        """
        b, length, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, D) → (B, H, T, D/H)
            return t.view(b, length, self.n_heads, self.head_size).transpose(1, 2)

        stop = start + length
        keys[:, :, start:stop] = heads(self.key(x))
        values[:, :, start:stop] = heads(self.value(x))
        q = heads(self.query(x))
        dropout_p = self.attn_dropout if self.training else 0.0
        if start == 0:  # a whole prefix at once: the plain causal mask
            context = F.scaled_dot_product_attention(
                q, keys[:, :, :stop], values[:, :, :stop], dropout_p=dropout_p, is_causal=True
            )
        else:  # new query j (at start + j) sees keys 0..start + j
            mask = None
            if length > 1:
                mask = torch.ones(length, stop, dtype=torch.bool, device=x.device).tril(diagonal=start)
            context = F.scaled_dot_product_attention(
                q, keys[:, :, :stop], values[:, :, :stop], attn_mask=mask, dropout_p=dropout_p
            )
        context = context.transpose(1, 2).reshape(b, length, d)
        return self.LayerNorm(self.out_dropout(self.dense(context)) + x)


class FeedForward(nn.Module):
    """Position-wise FFN, post-LN: ``LayerNorm(x + Dropout(W2 GELU(W1 x)))``."""

    def __init__(self, hidden_size: int, inner_size: int, hidden_dropout: float, eps: float):
        super().__init__()
        self.dense_1 = nn.Linear(hidden_size, inner_size)
        self.intermediate_act_fn = nn.GELU()  # exact (erf) GELU, RecBole's "gelu"
        self.dense_2 = nn.Linear(inner_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense_2(self.intermediate_act_fn(self.dense_1(x)))
        return self.LayerNorm(self.dropout(h) + x)


class TransformerLayer(nn.Module):
    def __init__(self, n_heads: int, hidden_size: int, inner_size: int, hidden_dropout: float,
                 attn_dropout: float, eps: float):
        super().__init__()
        self.multi_head_attention = MultiHeadAttention(n_heads, hidden_size, hidden_dropout, attn_dropout, eps)
        self.feed_forward = FeedForward(hidden_size, inner_size, hidden_dropout, eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        return self.feed_forward(self.multi_head_attention(x, attn_mask, is_causal))

    def forward_cached(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """Causal layer over new positions after ``start`` cached ones (see ``forward_cached``)."""
        return self.feed_forward(self.multi_head_attention.forward_cached(x, keys, values, start))


class TransformerEncoder(nn.Module):
    """A stack of post-LN transformer layers (RecBole's ``TransformerEncoder``)."""

    def __init__(self, n_layers: int, n_heads: int, hidden_size: int, inner_size: int,
                 hidden_dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(
            TransformerLayer(n_heads, hidden_size, inner_size, hidden_dropout, attn_dropout, eps)
            for _ in range(n_layers)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x (B, L, D) → (B, L, D)."""
        for layer in self.layer:
            x = layer(x, attn_mask, is_causal)
        return x

    def forward_cached(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Causal pass over new positions x (B, T, D) that follow ``cache.length`` cached ones;
        writes their keys and values into ``cache`` and advances it. Returns (B, T, D)."""
        start = cache.length
        if start + x.shape[1] > cache.capacity:
            raise ValueError(f"the key/value cache holds {cache.capacity} positions; {start} are used and "
                             f"{x.shape[1]} more were given")
        for layer, keys, values in zip(self.layer, cache.keys, cache.values):
            x = layer.forward_cached(x, keys, values, start)
        cache.length = start + x.shape[1]
        return x


class SASRec(SequentialRecommender):
    """Causal transformer recommender; trained on every position at once (base-class loss)."""

    name = "sasrec"
    causal = True

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.item_embedding = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.trm_encoder = TransformerEncoder(
            config.n_layers, config.n_heads, d, config.inner_size,
            config.hidden_dropout_prob, config.attn_dropout_prob, config.layer_norm_eps,
        )
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # RecBole's _init_weights, including the padding row of the embedding (its gradient is 0)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) right-padded ids in 0..n_items, L <= max_len → hidden states (B, L, D).

        The output at position t depends on items[:, :t+1] only. With right padding every key a real
        query may see (positions <= t < length) is a real item, so the causal mask alone already
        hides the padding from every real position; RecBole's extra padding-key mask would only
        change the (unused) outputs at padded positions. ``is_causal`` keeps the fused kernels.
        """
        length = items.shape[1]
        if length > self.config.max_len:
            raise ValueError(
                f"sequence length {length} exceeds max_len={self.config.max_len} (the number of position "
                "embeddings); truncate histories to their most recent max_len items"
            )
        return self.trm_encoder(self._embed(items, 0), attn_mask=None, is_causal=True)

    def output_embedding(self) -> torch.Tensor:
        return self.item_embedding.weight

    # ---------------------------------------------------------------------------------------
    # streaming inference: a key/value cache that grows by one position per item

    def allocate_states(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty key/value cache for ``batch`` users and up to ``capacity`` (default max_len)
        positions: per layer two (batch, H, capacity, D/H) buffers."""
        capacity = self.config.max_len if capacity is None else capacity
        if not 1 <= capacity <= self.config.max_len:
            raise ValueError(f"cache capacity must lie in 1..max_len={self.config.max_len}, got {capacity}")
        w = self.item_embedding.weight
        shape = (batch, self.config.n_heads, capacity, self.config.hidden_size // self.config.n_heads)
        n = len(self.trm_encoder.layer)
        return KVCache(keys=[w.new_zeros(shape) for _ in range(n)], values=[w.new_zeros(shape) for _ in range(n)])

    def _embed(self, items: torch.Tensor, start: int) -> torch.Tensor:
        """Embeddings of items (B, T) at positions start..start+T-1 → (B, T, D)."""
        self.check_items(items)
        stop = start + items.shape[1]
        if stop > self.config.max_len:
            raise ValueError(f"position {stop - 1} is beyond max_len={self.config.max_len} (the number of position "
                             "embeddings): SASRec cannot stream past max_len items")
        positions = torch.arange(start, stop, device=items.device)
        x = self.item_embedding(items) + self.position_embedding(positions)[None]
        return self.dropout(self.LayerNorm(x))

    def prefill(self, items: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, KVCache]:
        """Encode full histories items (B, L) (no padding: rows advance together) and keep their
        keys and values: → hidden (B, L, D), equal to ``forward``, and the cache to ``step`` from."""
        cache = self.allocate_states(items.shape[0], capacity)
        return self.trm_encoder.forward_cached(self._embed(items, 0), cache), cache

    def step(self, items_t: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Consume one item per user: items_t (B,) → hidden (B, D) at the next position, equal to
        ``forward`` there (call in eval mode). The cache is updated in place (and returned); one step
        costs O(length) instead of the O(length²) of a forward pass."""
        x = self._embed(items_t[:, None], cache.length)
        return self.trm_encoder.forward_cached(x, cache)[:, 0], cache

    @torch.no_grad()
    def stream_scores(self, items: torch.Tensor) -> torch.Tensor:
        """Scores of the next item after every prefix, one item at a time through the cache:
        items (B, L) → (B, L, n_items + 1), column 0 (padding) = -inf."""
        cache = self.allocate_states(items.shape[0], items.shape[1])
        table = self.output_embedding()
        out = []
        for t in range(items.shape[1]):
            h, cache = self.step(items[:, t], cache)
            out.append(h @ table.t())
        scores = torch.stack(out, dim=1)
        scores[..., 0] = float("-inf")
        return scores
