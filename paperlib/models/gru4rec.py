"""GRU4Rec (Hidasi et al. 2016; Tan et al. 2016) as RecBole implements it.

Item embedding → dropout → GRU (no biases, as RecBole) → Linear back to the embedding size → dot
product with the tied item embedding table. A GRU is causal by construction, and with right
padding the outputs at real positions never see the padding that follows them.

Streaming: ``prefill`` encodes a history and returns the GRU state after it; ``step`` consumes one
new item per user from that constant-size state. Both equal ``forward`` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paperlib.fields import param
from paperlib.models.base import ModelConfig, SequentialRecommender


@dataclass
class GRU4RecConfig(ModelConfig):
    """RecBole's GRU4Rec defaults (``GRU4Rec.yaml``).

    ``hidden_size`` is the item-embedding size D (RecBole's ``embedding_size``), the size of the
    model's output; ``gru_hidden_size`` is the GRU state size (RecBole's ``hidden_size``).
    """

    hidden_size: int = param(64, "item-embedding and output size (RecBole's embedding_size)", min=1)
    gru_hidden_size: int = param(128, "GRU state size (RecBole's hidden_size)", min=1)
    num_layers: int = param(1, "GRU layers", min=1)
    dropout_prob: float = param(0.3, "dropout on the item embeddings", min=0.0, below=1.0)


class GRU4Rec(SequentialRecommender):
    """Recurrent recommender; trained on every position at once (base-class loss)."""

    name = "gru4rec"
    causal = True

    def __init__(self, config: GRU4RecConfig):
        super().__init__()
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

    # ---------------------------------------------------------------------------------------
    # streaming inference: constant memory per user, one item at a time

    def allocate_states(self, batch: int) -> torch.Tensor:
        """Zero GRU state (num_layers, batch, gru_hidden_size) before a user's first item."""
        w = self.item_embedding.weight
        return w.new_zeros(self.config.num_layers, batch, self.config.gru_hidden_size)

    def prefill(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full histories items (B, L) (no padding) → hidden (B, L, D), equal to ``forward``, and the
        GRU state after the last item (num_layers, B, gru_hidden_size)."""
        self.check_items(items)
        out, state = self.gru_layers(self.emb_dropout(self.item_embedding(items)))
        return self.dense(out), state

    def step(self, items_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume one item per user: items_t (B,) → hidden (B, D) and the next state (a new
        tensor; the input state is left unchanged). Equals ``forward`` at that position (eval mode)."""
        self.check_items(items_t)
        out, state = self.gru_layers(self.emb_dropout(self.item_embedding(items_t))[:, None], state)
        return self.dense(out[:, 0]), state

    @torch.no_grad()
    def stream_scores(self, items: torch.Tensor) -> torch.Tensor:
        """Scores of the next item after every prefix, one item at a time: items (B, L) →
        (B, L, n_items + 1), column 0 (padding) = -inf."""
        state = self.allocate_states(items.shape[0])
        table = self.output_embedding()
        out = []
        for t in range(items.shape[1]):
            h, state = self.step(items[:, t], state)
            out.append(h @ table.t())
        scores = torch.stack(out, dim=1)
        scores[..., 0] = float("-inf")
        return scores
