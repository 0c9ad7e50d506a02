"""GRU4Rec (Hidasi et al. 2016; Tan et al. 2016) as RecBole implements it.

Item embedding → dropout → GRU (no biases, as RecBole) → Linear back to the embedding size → dot
product with the tied item embedding table. A GRU is causal by construction, and with right
padding the outputs at real positions never see the padding that follows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paperlib.models.base import ModelConfig, SequentialRecommender


@dataclass
class GRU4RecConfig(ModelConfig):
    """RecBole's GRU4Rec defaults (``GRU4Rec.yaml``).

    ``hidden_size`` is the item-embedding size D (RecBole's ``embedding_size``), the size of the
    model's output; ``gru_hidden_size`` is the GRU state size (RecBole's ``hidden_size``).
    """

    hidden_size: int = 64
    gru_hidden_size: int = 128
    num_layers: int = 1
    dropout_prob: float = 0.3


class GRU4Rec(SequentialRecommender):
    """Recurrent recommender; trained on every position at once (base-class loss)."""

    name = "gru4rec"
    causal = True

    def __init__(self, config: GRU4RecConfig):
        super().__init__()
        if config.n_items < 1:
            raise ValueError(f"n_items must be >= 1 (the catalogue size), got {config.n_items}")
        if min(config.hidden_size, config.gru_hidden_size, config.num_layers, config.max_len) < 1:
            raise ValueError("hidden_size, gru_hidden_size, num_layers and max_len must be >= 1")
        if not 0.0 <= config.dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must lie in [0, 1), got {config.dropout_prob}")
        self.config = config
        self.item_embedding = nn.Embedding(config.n_items + 1, config.hidden_size, padding_idx=0)
        self.emb_dropout = nn.Dropout(config.dropout_prob)
        self.gru_layers = nn.GRU(
            input_size=config.hidden_size,
            hidden_size=config.gru_hidden_size,
            num_layers=config.num_layers,
            bias=False,
            batch_first=True,
        )
        self.dense = nn.Linear(config.gru_hidden_size, config.hidden_size)  # PyTorch default init
        self._init_weights()

    def _init_weights(self) -> None:
        """RecBole's init: embedding xavier-normal (padding row included), GRU weights
        xavier-uniform (RecBole touches layer 0 only; every layer here)."""
        nn.init.xavier_normal_(self.item_embedding.weight)
        for name, param in self.gru_layers.named_parameters():
            if name.startswith(("weight_ih_l", "weight_hh_l")):
                nn.init.xavier_uniform_(param)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) right-padded ids in 0..n_items → hidden states (B, L, D)."""
        self.check_items(items)
        out, _ = self.gru_layers(self.emb_dropout(self.item_embedding(items)))  # (B, L, H_gru)
        return self.dense(out)

    def output_embedding(self) -> torch.Tensor:
        return self.item_embedding.weight
