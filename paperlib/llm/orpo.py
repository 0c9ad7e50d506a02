"""ORPO training with TRL, an SFT baseline with the same budget, and the ORPO loss written out.

ORPO (Hong, Lee, Thorne 2024, arXiv:2403.07691) adds an odds-ratio term to the NLL of the chosen
answer, so one model learns the task and the preference at once, without a reference model::

    loss = NLL(chosen) + λ · mean(−log σ(log odds(y_w|x) − log odds(y_l|x)))
    log odds(y|x) = ℓ − log(1 − exp(ℓ)),  ℓ = mean log-probability of the completion's tokens

λ is TRL's ``beta`` (0.1 by default, as in the paper). As in TRL, the NLL term of a decoder-only
model covers the prompt and the chosen answer. ``orpo_loss`` computes this from a model and a
batch so that tests can check TRL against the formula.

The trainers come from TRL: ORPO moved to ``trl.experimental.orpo`` in TRL 0.26; the import below
falls back to the old location for other versions.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PrinterCallback, TrainingArguments

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental: silence its notice
try:  # TRL >= 0.26
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
except ImportError:  # older TRL
    from trl import ORPOConfig, ORPOTrainer  # type: ignore[no-redef,attr-defined]
from trl import SFTConfig, SFTTrainer

from paperlib.llm.models import LoadedLM
from paperlib.llm.pairs import Pair, PairSet
from paperlib.llm.prompts import encode_prompt

#: Training-log keys kept as curves (ORPO logs all of them; SFT logs loss and learning rate).
CURVE_KEYS = (
    "loss",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "learning_rate",
    "grad_norm",
)


@dataclass
class TrainConfig:
    """Budget and optimisation of one ORPO or SFT run (both get the same steps and examples).

    Attributes:
        max_steps: optimiser steps.
        batch_size: pairs (ORPO) or examples (SFT) per device per step.
        gradient_accumulation_steps: micro-batches per step.
        learning_rate: ``None`` means 5e-6 for full fine-tuning (the Mistral-ORPO recipe) and 2e-4
            with LoRA (assumed, not from the paper: LoRA needs a larger step).
        beta: λ, the weight of the odds-ratio term (ORPO only).
        max_length: longest prompt + answer in tokens; longer answers are cut by TRL.
        lr_scheduler_type, warmup_steps: the learning-rate schedule (transformers' names).
        logging_steps: a curve point every this many steps.
        seed: seed of the data order and of any initialisation.
        sft_completion_only: the SFT baseline's loss covers only the answer; ``False`` (default)
            makes it cover prompt + answer like ORPO's NLL term, so that the two runs differ only by
            the odds-ratio term.
    """

    max_steps: int = 100
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None
    beta: float = 0.1
    max_length: int = 512
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    logging_steps: int = 1
    seed: int = 0
    sft_completion_only: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.beta < 0:
            raise ValueError(f"beta (λ) must be >= 0, got {self.beta}")

    def lr_for(self, lora: bool) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if lora else 5e-6


@dataclass
class TrainResult:
    """What a run leaves behind. ``to_dict`` is the JSON-friendly part (no model).

    Attributes:
        method: "orpo" or "sft".
        curves: per logging step, ``{"step": [...], "loss": [...], ...}`` (keys of ``CURVE_KEYS``
            that the trainer logged).
        steps, examples: optimiser steps taken and training examples (pairs) consumed.
        seconds: wall time of ``trainer.train()``.
        config: the ``TrainConfig`` as a dict, with the learning rate actually used.
        model: the trained model (LoRA-wrapped if it was), in eval mode.
    """

    method: str
    curves: dict[str, list[float]]
    steps: int
    examples: int
    seconds: float
    config: dict[str, Any]
    model: Any = field(repr=False, default=None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("model")
        return out


def _tqdm_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false", "no")


def _device_args() -> dict[str, Any]:
    """Trainer arguments that depend on the hardware: on CPU no bf16 (TRL's default) and no
    gradient checkpointing (TRL's default too), which only costs time for models this small."""
    args: dict[str, Any] = {"gradient_checkpointing": False}
    if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}:
        args["activation_checkpointing"] = False  # its new name (transformers 5): no deprecation warning
    if torch.cuda.is_available():
        return {**args, "use_cpu": False, "bf16": torch.cuda.is_bf16_supported()}
    return {**args, "use_cpu": True, "bf16": False}


def _common_args(lm: LoadedLM, config: TrainConfig, output_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.lr_for(lm.lora),
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        logging_steps=config.logging_steps,
        max_length=config.max_length,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="no",
        report_to=[],
        disable_tqdm=_tqdm_disabled(),
        dataloader_num_workers=0,
        **_device_args(),
    )


def preference_dataset(pairs: PairSet | Sequence[Pair] | Dataset) -> Dataset:
    """A ``datasets.Dataset`` with TRL's preference columns ``prompt``, ``chosen``, ``rejected``."""
    if isinstance(pairs, Dataset):
        missing = {"prompt", "chosen", "rejected"} - set(pairs.column_names)
        if missing:
            raise ValueError(f"preference dataset lacks the columns {sorted(missing)}")
        return pairs
    items = pairs.pairs if isinstance(pairs, PairSet) else list(pairs)
    if not items:
        raise ValueError("no preference pairs to train on: build_pairs returned none (check the users and titles)")
    return Dataset.from_dict(PairSet(list(items)).columns())


def orpo_trainer(lm: LoadedLM, pairs: PairSet | Sequence[Pair] | Dataset, config: TrainConfig, output_dir: str) -> ORPOTrainer:
    """TRL's ORPO trainer for ``lm`` on ``pairs`` (the tokenizer is passed, so nothing is fetched)."""
    args = ORPOConfig(beta=config.beta, remove_unused_columns=False, **_common_args(lm, config, output_dir))
    trainer = ORPOTrainer(model=lm.model, args=args, train_dataset=preference_dataset(pairs), processing_class=lm.tokenizer)
    _check_fits(trainer.train_dataset["prompt_input_ids"], config.max_length)
    return trainer


def _check_fits(prompts: list[list[int]], max_length: int, room: int = 8) -> None:
    """TRL cuts answers that do not fit ``max_length`` after their prompt, down to nothing: refuse
    prompts that leave fewer than ``room`` tokens for the answer."""
    longest = max((len(p) for p in prompts), default=0)
    if longest > max_length - room:
        raise ValueError(
            f"a prompt of {longest} tokens leaves no room for its answer within max_length={max_length}: raise "
            f"TrainConfig.max_length or build shorter prompts (PromptConfig.max_prompt_tokens, n_recent)"
        )


def _curves(log_history: list[dict[str, Any]]) -> dict[str, list[float]]:
    logs = [entry for entry in log_history if "loss" in entry]  # training logs (not the final summary)
    curves: dict[str, list[float]] = {"step": [int(e["step"]) for e in logs]}
    for key in CURVE_KEYS:
        if logs and all(key in e for e in logs):
            curves[key] = [float(e[key]) for e in logs]
    return curves


def _run(method: str, trainer: Any, lm: LoadedLM, config: TrainConfig, lr: float) -> TrainResult:
    # Without progress bars the Trainer prints every log as a dict; the curves are returned instead.
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    lm.model.eval()
    steps = trainer.state.global_step
    return TrainResult(
        method=method,
        curves=_curves(trainer.state.log_history),
        steps=steps,
        examples=steps * config.batch_size * config.gradient_accumulation_steps,
        seconds=round(seconds, 3),
        config={**asdict(config), "learning_rate": lr},
        model=lm.model,
    )


def train_orpo(lm: LoadedLM, pairs: PairSet | Sequence[Pair] | Dataset, config: TrainConfig | None = None) -> TrainResult:
    """Train ``lm.model`` in place with ORPO on ``pairs``; returns the curves and the model."""
    config = config or TrainConfig()
    with tempfile.TemporaryDirectory(prefix="orpo-") as tmp:
        trainer = orpo_trainer(lm, pairs, config, tmp)
        return _run("orpo", trainer, lm, config, trainer.args.learning_rate)


def train_sft(lm: LoadedLM, pairs: PairSet | Sequence[Pair] | Dataset, config: TrainConfig | None = None) -> TrainResult:
    """SFT baseline: the chosen answers only, with TRL's SFTTrainer and the same steps, batch size
    and learning rate as ``train_orpo`` (give it a fresh model, not the ORPO-trained one)."""
    config = config or TrainConfig()
    data = preference_dataset(pairs)
    data = Dataset.from_dict({"prompt": data["prompt"], "completion": data["chosen"]})
    _check_fits([encode_prompt(lm.tokenizer, p) for p in data["prompt"]], config.max_length)
    with tempfile.TemporaryDirectory(prefix="sft-") as tmp:
        args = SFTConfig(completion_only_loss=config.sft_completion_only, **_common_args(lm, config, tmp))
        trainer = SFTTrainer(model=lm.model, args=args, train_dataset=data, processing_class=lm.tokenizer)
        return _run("sft", trainer, lm, config, args.learning_rate)


# ---------------------------------------------------------------------------------------------
# The ORPO loss, written out


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate near 0 and for very negative x (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of the labelled tokens of each sequence.

    Args:
        logits: (B, T, V) next-token logits; position t predicts token t + 1.
        labels: (B, T) token ids, ``-100`` where a token is not part of the completion.

    Returns:
        (B,) the mean over completion tokens of log p(token | tokens before it).
    """
    labels = labels[:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T - 1)
    return (token_logp * mask).sum(-1) / mask.sum(-1)


@dataclass
class ORPOLoss:
    """The ORPO loss of a batch and its parts (the loss keeps its graph; the rest are detached).

    Attributes:
        loss: NLL + λ · odds_ratio_term (scalar).
        nll: mean token NLL of the chosen sequences (scalar).
        odds_ratio_term: mean of −log σ(log odds ratio) over the batch (scalar, before λ).
        log_odds_ratio: (B,) log odds(chosen) − log odds(rejected).
        chosen_logps, rejected_logps: (B,) mean completion log-probabilities.
    """

    loss: torch.Tensor
    nll: torch.Tensor
    odds_ratio_term: torch.Tensor
    log_odds_ratio: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def orpo_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    beta: float = 0.1,
    nll_tokens: Literal["prompt+chosen", "chosen"] = "prompt+chosen",
) -> ORPOLoss:
    """ORPO loss of a tokenised batch, computed from its definition.

    Args:
        model: a causal LM returning ``.logits``.
        batch: TRL's ORPO batch layout: ``chosen_input_ids``, ``chosen_attention_mask``,
            ``chosen_labels`` and the same three for ``rejected``, each (B, T); labels are the
            input ids with ``-100`` over the prompt and the padding.
        beta: λ.
        nll_tokens: tokens of the NLL term: ``"prompt+chosen"`` (TRL's choice for decoder-only
            models) or ``"chosen"`` (the answer only, as the ORPO paper writes L_SFT).

    Returns:
        an ``ORPOLoss``.
    """
    if nll_tokens not in ("prompt+chosen", "chosen"):
        raise ValueError(f"nll_tokens must be 'prompt+chosen' or 'chosen', got {nll_tokens!r}")
    logps, chosen_logits = {}, None
    for side in ("chosen", "rejected"):
        ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
        logps[side] = completion_logps(logits, labels)
        if side == "chosen":
            chosen_logits = logits
    ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    targets = ids.masked_fill(mask == 0, -100) if nll_tokens == "prompt+chosen" else batch["chosen_labels"]
    nll = F.cross_entropy(chosen_logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=-100)
    lw, ll = logps["chosen"], logps["rejected"]
    log_odds_ratio = (lw - log1mexp(lw)) - (ll - log1mexp(ll))
    odds_ratio_term = -F.logsigmoid(log_odds_ratio).mean()
    return ORPOLoss(
        loss=nll + beta * odds_ratio_term,
        nll=nll.detach(),
        odds_ratio_term=odds_ratio_term.detach(),
        log_odds_ratio=log_odds_ratio.detach(),
        chosen_logps=lw.detach(),
        rejected_logps=ll.detach(),
    )
