"""The interface every sequential recommender shares.

A model maps a right-padded item sequence (B, L) to hidden states (B, L, D); scores over the
catalogue are dot products with the (tied) item embedding table; training is full-softmax
cross-entropy over all items.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from paperlib.data.sequences import TrainBatch
from paperlib.fields import Checked, param
from paperlib.models.losses import chunked_cross_entropy


@dataclass
class ModelConfig(Checked):
    """Fields every model config has. Subclasses add their own hyper-parameters, each a
    documented, bound-checked :func:`paperlib.fields.param`; a config with a wrongly typed or
    out-of-range value cannot be built (ConfigError)."""

    n_items: int = param(0, "real items in the catalogue (ids 1..n_items; 0 is padding)", min=1)
    max_len: int = param(200, "longest history the model sees", min=1)
    hidden_size: int = param(64, "size of item embeddings and hidden states", min=1)

    def to_dict(self) -> dict:
        return asdict(self)


class SequentialRecommender(nn.Module):
    """Base class: subclasses implement ``forward`` and ``item_embedding``.

    Attributes:
        causal: True if the output at position t only depends on items up to t (trained on every
            position at once); BERT4Rec sets False and overrides ``loss`` and ``score``.
    """

    causal: bool = True
    config: ModelConfig

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) right-padded item ids → hidden states (B, L, D)."""
        raise NotImplementedError

    def output_embedding(self) -> torch.Tensor:
        """(n_items + 1, D) table whose rows are dotted with hidden states to score items."""
        raise NotImplementedError

    def check_items(self, items: torch.Tensor, mask_token: int | None = None) -> None:
        """Raise a clear error for ids outside ``0..n_items`` (or equal to ``mask_token``, the one
        extra id a masked-item model such as BERT4Rec feeds itself)."""
        n = self.config.n_items
        top = n if mask_token is None else mask_token
        if items.numel() and (int(items.min()) < 0 or int(items.max()) > top):
            also = "" if mask_token is None else f" (or {mask_token} = [MASK])"
            raise ValueError(
                f"item ids must lie in 0..{n}{also} (0 = padding) for this model's catalogue of {n} items; "
                f"got range {int(items.min())}..{int(items.max())}. Was the model built for another dataset?"
            )

    def loss(self, batch: TrainBatch) -> torch.Tensor:
        """All-position full-softmax CE: every counted position predicts the next item (the mean
        over the batch's pairs, as RecBole's mean over its batch of prefixes)."""
        hidden = self(batch.items)  # (B, L, D)
        mask = batch.counted
        return chunked_cross_entropy(hidden[mask], self.output_embedding(), batch.targets[mask])

    def last_hidden(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Hidden state at the last real position of each history: (B, D)."""
        hidden = self(items)
        return hidden[torch.arange(items.shape[0], device=items.device), lengths - 1]

    @torch.no_grad()
    def score(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores of every item as the next one: (B, n_items + 1), column 0 (padding) = -inf."""
        if (lengths < 1).any():
            raise ValueError("empty history: every user needs at least one item to be scored")
        scores = self.last_hidden(items, lengths) @ self.output_embedding().t()
        scores[:, 0] = float("-inf")
        return scores


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """RecBole/Mamba4Rec init: Linear and Embedding weights ~ N(0, std), Linear biases zero,
    LayerNorm weight 1 and bias 0. Applied with ``model.apply``; it also reaches the Mamba block's
    ``dt_proj`` (bias zeroed), exactly as the official Mamba4Rec code does."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    if isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
