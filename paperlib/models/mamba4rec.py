"""Mamba4Rec (Liu et al. 2024), as the official code (github.com/chengkai-liu/Mamba4Rec).

    items (B, L) → item embedding (no position embedding) → dropout → LayerNorm
      → n_layers × [ y = Mamba(x);  y = LN(dropout(y))           (1 layer, no residual)
                                    y = LN(dropout(y) + x)       (more layers)
                     y = LN(dropout(W2 · dropout(GELU(W1 · y))) + y) ]        (FFN, d → 4d → d)
      → hidden (B, L, d); scores = hidden · item_embeddingᵀ (tied)

Module and parameter names follow the official code (``item_embedding``, ``LayerNorm``,
``mamba_layers.{i}.mamba.*`` with mamba_ssm's names, ``mamba_layers.{i}.ffn.w_1`` ...), so its
checkpoints load here. Initialisation: :func:`init_weights` over the whole model, which also zeroes
``dt_proj.bias`` and redraws ``dt_proj.weight`` (as the official code does); ``A_log``, ``D`` and the
convolution keep Mamba's init.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paperlib.fields import param
from paperlib.models.base import ModelConfig, SequentialRecommender, init_weights
from paperlib.models.mamba_block import MambaBlock, MambaState
from paperlib.models.scan import BACKENDS, dropout as hash_dropout


@dataclass
class Mamba4RecConfig(ModelConfig):
    """Mamba4Rec hyper-parameters (defaults: the official ``config.yaml`` for ML-1M).

    Attributes:
        n_layers: Mamba layers (1 in the paper; 2 reproduces better, see REFERENCES.md).
        d_state, d_conv, expand: Mamba block sizes (N, K, E/d).
        dropout: every dropout of the model (0.4 reported for Amazon).
        inner_size: FFN width; None → 4 · hidden_size, as the official code.
        layer_norm_eps: LayerNorm epsilon.
        initializer_range: std of the normal init of Linear and Embedding weights.
        scan_backend: selective-scan backend: "auto", "reference", "cpu" or "cuda".
    """

    hidden_size: int = param(64, "size of item embeddings and hidden states", min=1)
    n_layers: int = param(1, "Mamba layers", min=1)
    d_state: int = param(32, "SSM state size N", min=1)
    d_conv: int = param(4, "causal convolution width", min=1)
    expand: int = param(2, "inner width / hidden_size", min=1)
    dropout: float = param(0.2, "every dropout of the model (0.4 reported for Amazon)", min=0.0, below=1.0)
    inner_size: int | None = param(None, "FFN width; None for 4 * hidden_size, as the official code", min=1)
    layer_norm_eps: float = param(1e-12, "LayerNorm epsilon", min=0.0)
    initializer_range: float = param(0.02, "std of the normal init of Linear and Embedding weights", min=0.0)
    scan_backend: str = param("auto", "selective-scan backend", choices=BACKENDS)

    @property
    def ffn_size(self) -> int:
        return self.inner_size if self.inner_size is not None else 4 * self.hidden_size


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask on CPU (:func:`paperlib.models.scan.dropout`: the same
    distribution, drawn from a hash instead of one generator call per element); ``F.dropout``
    elsewhere. No parameters, so checkpoints are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hash_dropout(x, self.p, self.training)


class FeedForward(nn.Module):
    """Position-wise FFN with residual and LayerNorm: (…, d) → (…, d)."""

    def __init__(self, d_model: int, inner_size: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.activation = nn.GELU()
        self.dropout = Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.activation(self.w_1(x)))
        h = self.dropout(self.w_2(h))
        return self.LayerNorm(h + x)


class MambaLayer(nn.Module):
    """Mamba block → dropout → (residual when stacked) → LayerNorm → FFN: (B, L, d) → (B, L, d)."""

    def __init__(self, config: Mamba4RecConfig) -> None:
        super().__init__()
        self.num_layers = config.n_layers
        d = config.hidden_size
        self.mamba = MambaBlock(
            d_model=d, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand, scan_backend=config.scan_backend
        )
        self.dropout = Dropout(config.dropout)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn = FeedForward(d, config.ffn_size, config.dropout, config.layer_norm_eps)

    def _mix(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # one layer: no residual around the Mamba block (official code)
        y = self.dropout(y) if self.num_layers == 1 else self.dropout(y) + x
        return self.ffn(self.LayerNorm(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(self.mamba(x), x)

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, MambaState]:
        """``forward`` over full rows x (B, L, d) that also returns the block's state after them."""
        y, state = self.mamba(x, return_state=True)
        return self._mix(y, x), state

    def step(self, x: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """x (B, d) at one position → (B, d) and the block's next state."""
        y, state = self.mamba.step(x, state)
        return self._mix(y, x), state


class Mamba4Rec(SequentialRecommender):
    """Mamba4Rec: ``forward(items (B, L)) → hidden (B, L, hidden_size)``, causal.

    No position embedding, so histories longer than ``max_len`` are accepted (the data pipeline
    truncates them).
    """

    name = "mamba4rec"
    causal = True

    def __init__(self, config: Mamba4RecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.item_embedding = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)
        self.mamba_layers = nn.ModuleList([MambaLayer(config) for _ in range(config.n_layers)])
        self.apply(lambda m: init_weights(m, std=config.initializer_range))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) right-padded ids → hidden states (B, L, hidden_size)."""
        self.check_items(items)
        h = self.LayerNorm(self.dropout(self.item_embedding(items)))
        for layer in self.mamba_layers:
            h = layer(h)
        return h

    def output_embedding(self) -> torch.Tensor:
        """Tied output table (n_items + 1, hidden_size)."""
        return self.item_embedding.weight

    def set_scan_backend(self, backend: str) -> None:
        """Switch the selective-scan backend of every layer (parameters are unchanged)."""
        self.config.scan_backend = backend
        for layer in self.mamba_layers:
            layer.mamba.scan_backend = backend

    # ---------------------------------------------------------------------------------------
    # streaming inference: constant memory per user, one item at a time

    def allocate_states(self, batch: int) -> list[MambaState]:
        """Zero recurrent states, one per layer, before a user's first item."""
        return [layer.mamba.allocate_state(batch) for layer in self.mamba_layers]

    def step(self, items_t: torch.Tensor, states: list[MambaState]) -> tuple[torch.Tensor, list[MambaState]]:
        """Consume one item per user: items_t (B,) → hidden (B, hidden_size) and the next states.

        Equals ``forward`` at that position (dropout off: call in eval mode).
        """
        self.check_items(items_t)
        h = self.LayerNorm(self.dropout(self.item_embedding(items_t)))
        new_states = []
        for layer, state in zip(self.mamba_layers, states):
            h, state = layer.step(h, state)
            new_states.append(state)
        return h, new_states

    def prefill(self, items: torch.Tensor) -> tuple[torch.Tensor, list[MambaState]]:
        """Full histories items (B, L) (no padding) → hidden (B, L, hidden_size), equal to
        ``forward``, and every layer's state after the last item, from which ``step`` continues."""
        self.check_items(items)
        h = self.LayerNorm(self.dropout(self.item_embedding(items)))
        states = []
        for layer in self.mamba_layers:
            h, state = layer.prefill(h)
            states.append(state)
        return h, states

    @torch.no_grad()
    def stream_scores(self, items: torch.Tensor) -> torch.Tensor:
        """Scores of the next item after every prefix, computed one item at a time.

        items (B, L) → (B, L, n_items + 1), column 0 (padding) = -inf. Positions after a row's
        real length are meaningless (padding was fed as input), as in ``forward``.
        """
        states = self.allocate_states(items.shape[0])
        table = self.output_embedding()
        out = []
        for t in range(items.shape[1]):
            h, states = self.step(items[:, t], states)
            out.append(h @ table.t())
        scores = torch.stack(out, dim=1)
        scores[..., 0] = float("-inf")
        return scores
