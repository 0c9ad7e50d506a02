"""BERT4Rec (Sun et al. 2019): bidirectional self-attention trained by masked-item prediction.

Follows RecBole's ``BERT4Rec``: item embedding (n_items + 2 rows: padding 0, items 1..n_items,
[MASK] = n_items + 1) + learned position embedding → LayerNorm → dropout → post-LN transformer
layers with a padding mask and no causal mask (SASRec's encoder) → output head Dense → GELU →
LayerNorm → dot product with the item embeddings of rows 0..n_items plus a per-item output bias.

Training masks about ``mask_ratio`` of the positions of each training window with [MASK] and
predicts the original items there (full-softmax CE, padding row in the softmax as in RecBole); with
probability ``ft_ratio`` a batch instead cuts each window at a random target and masks only that
last item. At test time a [MASK] is appended after the history and its output scores the next item.

How this compares with RecBole 1.2's BERT4Rec (read from its code):

* RecBole feeds BERT4Rec its one-example-per-prefix augmentation: every prefix of every user is a
  sequence of its own, masked afresh, so an ML-1M epoch pushes 981,491 sequences (about 480 batches
  of 2,048) through the encoder and each item is masked and predicted in many of them. Here an epoch
  is the training windows (about 8,500 on ML-1M, each item a target once), cut into batches of
  2,048 target pairs, so the update count per epoch is RecBole's but each update holds about 18
  windows instead of 2,048 prefixes: far fewer masked predictions per epoch, at a fraction of the
  cost (RecBole's BERT4Rec epoch is the slowest of the four models on a GPU).
* ``ft_ratio`` is in effect 0.5 in RecBole (see :class:`BERT4RecConfig`): half of the batches are
  next-item prediction. Leaving it at 0 trains only on random interior masks, a task unlike the
  test one (a [MASK] after the last item, with nothing to its right).
* RecBole predicts at most ``int(mask_ratio * max_len)`` masked positions per sequence (the most
  recent) and never the one at index 0 (its ``masked_index > 0`` test); windows here never
  predict their first item either, since it is the previous window's target or a user's first item.
* At test time RecBole drops the first column of every padded history before appending [MASK],
  which loses the oldest item of short histories too; here a short history keeps all its items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paperlib.data.sequences import TrainBatch
from paperlib.models.base import SequentialRecommender, init_weights
from paperlib.models.losses import chunked_cross_entropy
from paperlib.fields import param
from paperlib.models.sasrec import SASRecConfig, TransformerEncoder


@dataclass
class BERT4RecConfig(SASRecConfig):
    """RecBole's BERT4Rec defaults (``BERT4Rec.yaml``): SASRec's transformer sizes, lower dropout,
    and the masking settings.

    ``ft_ratio``: probability that a training batch is a "fine-tuning" batch that masks only the
    last item of every sequence (RecBole's ``MaskItemSequence``). RecBole 1.2's ``BERT4Rec.yaml``
    sets 0.5 and its transform reads it with ``hasattr(config, "ft_ratio")``, which is True for
    RecBole's ``Config`` (its ``__getattr__`` serves every key of the final config), so RecBole
    trains with 0.5: half of its batches are the next-item task of test time. 0.5 here too.
    """

    hidden_dropout_prob: float = param(0.2, "dropout on embeddings and layer outputs", min=0.0, below=1.0)
    attn_dropout_prob: float = param(0.2, "dropout on attention probabilities", min=0.0, below=1.0)
    mask_ratio: float = param(0.2, "probability that a training item is masked and predicted", min=0.0, max=1.0)
    ft_ratio: float = param(0.5, "probability that a batch masks only the last item of each prefix", min=0.0, max=1.0)


class BERT4Rec(SequentialRecommender):
    """Bidirectional transformer recommender with its own masked-item ``loss`` and ``score``."""

    name = "bert4rec"
    causal = False

    def __init__(self, config: BERT4RecConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.mask_token = config.n_items + 1
        self.item_embedding = nn.Embedding(config.n_items + 2, d, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.trm_encoder = TransformerEncoder(
            config.n_layers, config.n_heads, d, config.inner_size,
            config.hidden_dropout_prob, config.attn_dropout_prob, config.layer_norm_eps,
        )
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.output_ffn = nn.Linear(d, d)
        self.output_gelu = nn.GELU()
        self.output_ln = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.output_bias = nn.Parameter(torch.zeros(config.n_items + 1))
        self.apply(lambda m: init_weights(m, config.initializer_range))

    # ------------------------------------------------------------------ encoder
    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) right-padded ids in 0..n_items + 1 (the last is [MASK]), L <= max_len
        → output-head states (B, L, D); every real position sees every real position."""
        self.check_items(items, mask_token=self.mask_token)
        length = items.shape[1]
        if length > self.config.max_len:
            raise ValueError(
                f"sequence length {length} exceeds max_len={self.config.max_len}; truncate histories "
                "to their most recent max_len items (max_len - 1 when a [MASK] is appended)"
            )
        positions = torch.arange(length, device=items.device)
        x = self.item_embedding(items) + self.position_embedding(positions)[None]
        x = self.dropout(self.LayerNorm(x))
        keys = items > 0  # (B, L) padded keys are never attended to
        # a row of padding only would leave its queries nothing to attend to (NaN); let them see
        # position 0 — a real row always has a real item there, so nothing else changes
        keys[:, 0] = True
        hidden = self.trm_encoder(x, attn_mask=keys[:, None, None, :], is_causal=False)
        return self.output_ln(self.output_gelu(self.output_ffn(hidden)))

    def output_embedding(self) -> torch.Tensor:
        """Rows 0..n_items of the item table ([MASK] is never a prediction)."""
        return self.item_embedding.weight[: self.config.n_items + 1]

    def _logits_weight(self) -> torch.Tensor:
        """(n_items + 1, D + 1): item rows with the output bias as an extra column, so that
        ``[h, 1] @ Wᵀ = h @ Eᵀ + bias`` goes through the chunked CE unchanged."""
        return torch.cat([self.output_embedding(), self.output_bias[:, None]], dim=1)

    # ------------------------------------------------------------------ training
    def full_sequences(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rebuild each training window from an all-position batch.

        ``items[b, 0]`` followed by ``targets[b, :lengths[b]]`` is the window of the training
        sequence the batch was cut from; keep its last ``max_len`` items.

        Returns:
            seqs (B, L') right-padded, L' <= max_len; lengths (B,); predictable (B, L') bool: the
            positions holding a target the batch counts (``batch.counted``), the only ones this
            batch may mask and predict, so that every training item is a target once per epoch.
        """
        items, targets, lengths = batch.items, batch.targets, batch.lengths
        seqs = torch.cat([items[:, :1], targets], dim=1)  # (B, L + 1)
        counted = batch.counted
        predictable = torch.cat([torch.zeros_like(counted[:, :1]), counted], dim=1)
        full_len = lengths + 1
        long = full_len > self.config.max_len  # drop the oldest item of windows one too long
        if bool(long.any()):
            seqs[long, :-1] = targets[long]
            seqs[long, -1] = 0
            predictable[long, :-1] = counted[long]
            predictable[long, -1] = False
            full_len = full_len.clamp(max=self.config.max_len)
        width = int(full_len.max())
        return seqs[:, :width], full_len, predictable[:, :width]

    def mask_positions(self, seqs: torch.Tensor, lengths: torch.Tensor,
                       predictable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the positions to mask, as RecBole's ``MaskItemSequence`` does.

        With probability ``ft_ratio`` per batch (a "fine-tuning" batch), each sequence is cut after
        a random predictable position, which alone is masked: the next-item task of test time.
        Otherwise each predictable position is masked with probability ``mask_ratio`` (at least one
        per sequence), and at most ``int(mask_ratio * max_len)`` of them, the most recent, are
        predicted (RecBole's ``mask_item_length``). Draws from torch's global RNG.

        Returns:
            masked (B, L) bool and ``lengths`` (B,), shortened in a fine-tuning batch (the
            positions after the cut must then be set to padding by the caller).
        """
        b, length = seqs.shape
        rows = torch.arange(b, device=seqs.device)
        if predictable is None:
            predictable = seqs > 0
        if self.config.ft_ratio > 0 and float(torch.rand(())) < self.config.ft_ratio:
            # a uniformly drawn predictable position per row: the cut
            weights = predictable.float() + 1e-12 * (seqs > 0).float()  # rows without one: any real item
            cut = torch.multinomial(weights, 1, generator=None).squeeze(1)
            masked = torch.zeros_like(seqs, dtype=torch.bool)
            masked[rows, cut] = True
            return masked, cut + 1
        masked = (torch.rand(seqs.shape, device=seqs.device) < self.config.mask_ratio) & predictable
        # a sequence without a masked position would teach nothing: mask one of its predictable items
        none = ~masked.any(dim=1) & predictable.any(dim=1)
        if bool(none.any()):
            pick = torch.multinomial(predictable[none].float(), 1).squeeze(1)
            masked[rows[none], pick] = True
        cap = max(1, int(self.config.mask_ratio * self.config.max_len))
        from_end = masked.flip(1).cumsum(1).flip(1)  # masked positions at or after each position
        return masked & (from_end <= cap), lengths

    def loss(self, batch: TrainBatch) -> torch.Tensor:
        """Masked-item CE over the masked positions of each training window (mean over them).

        ``batch`` must be an all-position batch from ``train_batches`` (targets[b, t] is the item
        after items[b, t]); the whole window, the last training item included, is the input.
        """
        self.check_items(batch.items)
        self.check_items(batch.targets)
        seqs, lengths, predictable = self.full_sequences(batch)
        masked, lengths = self.mask_positions(seqs, lengths, predictable)
        beyond = torch.arange(seqs.shape[1], device=seqs.device)[None] >= lengths[:, None]
        seqs = seqs.masked_fill(beyond, 0)[:, : int(lengths.max())]
        masked = masked[:, : seqs.shape[1]]
        hidden = self(seqs.masked_fill(masked, self.mask_token))  # (B, L', D)
        h = hidden[masked]  # (M, D)
        h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
        return chunked_cross_entropy(h, self._logits_weight(), seqs[masked])

    # ------------------------------------------------------------------ inference
    def append_mask(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put [MASK] right after each history; a history of max_len items first loses its oldest.

        Returns:
            seqs (B, L') with L' = min(L + 1, max_len) and the [MASK] position of each row (B,).
        """
        b, length = items.shape
        rows = torch.arange(b, device=items.device)
        seqs = torch.cat([items, items.new_zeros(b, 1)], dim=1)  # (B, L + 1)
        full = lengths >= self.config.max_len
        if bool(full.any()):
            seqs[full, :-1] = torch.cat([items[full, 1:], items.new_zeros(int(full.sum()), 1)], dim=1)
        pos = torch.where(full, lengths - 1, lengths)
        seqs[rows, pos] = self.mask_token
        # RecBole drops the first column of every row instead (also of short histories); here a
        # short history keeps all its items and its positions.
        return seqs[:, : min(length + 1, self.config.max_len)], pos

    @torch.no_grad()
    def score(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores of every item as the next one: (B, n_items + 1), column 0 (padding) = -inf."""
        if (lengths < 1).any():
            raise ValueError("empty history: every user needs at least one item to be scored")
        self.check_items(items)
        seqs, pos = self.append_mask(items, lengths)
        hidden = self(seqs)[torch.arange(items.shape[0], device=items.device), pos]  # (B, D)
        scores = hidden @ self.output_embedding().t() + self.output_bias
        scores[:, 0] = float("-inf")
        return scores
