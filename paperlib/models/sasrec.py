"""SASRec (Kang & McAuley 2018): causal self-attention over the item history.

Follows RecBole 1.2's ``SASRec`` and its ``TransformerEncoder``: item embedding + learned position
embedding → LayerNorm → dropout → post-LN transformer layers (attention → dropout → residual +
LayerNorm, then FFN with GELU → dropout → residual + LayerNorm) → dot product with the tied item
embedding table. Parameter names match RecBole's (``trm_encoder.layer.0.multi_head_attention.query``
and so on). The transformer layers live here and BERT4Rec imports them.

Attention goes through ``F.scaled_dot_product_attention``, which picks a fused kernel (flash /
memory-efficient on GPU, flash on CPU without dropout) instead of materialising (B, H, L, L)
probabilities where it can.
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
        self.check_items(items)
        length = items.shape[1]
        if length > self.config.max_len:
            raise ValueError(
                f"sequence length {length} exceeds max_len={self.config.max_len} (the number of position "
                "embeddings); truncate histories to their most recent max_len items"
            )
        positions = torch.arange(length, device=items.device)
        x = self.item_embedding(items) + self.position_embedding(positions)[None]
        x = self.dropout(self.LayerNorm(x))
        return self.trm_encoder(x, attn_mask=None, is_causal=True)

    def output_embedding(self) -> torch.Tensor:
        return self.item_embedding.weight
