"""Prompts for the LLM recommender: a user's most recent item titles and an instruction to name
the next item.

A prompt is the chat-templated text up to where the answer starts (``add_generation_prompt``), so
that a completion is exactly the answer: one item title. The same prompt text feeds ORPO training
(TRL's ``prompt`` column) and candidate scoring at test time.

Decisions (assumed, not from the paper):

* the ``n_recent`` (default 10) most recent titled items, oldest first, numbered;
* items without a usable title are left out of prompts and counted, never invented;
* titles longer than ``max_title_chars`` (some Amazon titles run to 900 characters) are clipped
  at a word boundary, so that ten titles and an answer fit a small model's context;
* a prompt longer than its token budget (the model's context minus room for the answer) drops
  its oldest items until it fits; the number dropped is recorded with the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from paperlib.data.sequences import DataError, SequentialData

DEFAULT_INSTRUCTION = (
    "Here are the items a user chose, oldest first:\n{history}\n"
    "Name the item this user will choose next. Answer with its title only."
)


@dataclass
class PromptConfig:
    """How prompts are written.

    Attributes:
        n_recent: how many of the most recent titled items a prompt shows.
        instruction: the user message; ``{history}`` is replaced by the numbered titles.
        system: system message; ``None`` keeps the chat template's own default.
        max_title_chars: longer titles are clipped to this many characters.
        answer_tokens: tokens kept free for the answer when fitting a prompt into the context.
        max_prompt_tokens: token budget of a prompt; ``None`` means the model's context length
            minus ``answer_tokens`` (given to ``PromptBuilder``).
    """

    n_recent: int = 10
    instruction: str = DEFAULT_INSTRUCTION
    system: str | None = None
    max_title_chars: int = 120
    answer_tokens: int = 64
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.n_recent < 1:
            raise ValueError(f"n_recent must be at least 1, got {self.n_recent}")
        if "{history}" not in self.instruction:
            raise ValueError("instruction must contain the placeholder {history} where the titles go")
        if self.max_title_chars < 8:
            raise ValueError(f"max_title_chars must be at least 8, got {self.max_title_chars}")


@dataclass
class Titles:
    """Usable item titles of a dataset.

    Attributes:
        titles: item id -> cleaned title (whitespace collapsed, long titles clipped).
        n_missing: catalogue items (``1..n_items``) with no title or an empty one; they are never
            shown in a prompt nor used as an answer.
    """

    titles: dict[int, str]
    n_missing: int

    def __contains__(self, item: int) -> bool:
        return item in self.titles

    def __getitem__(self, item: int) -> str:
        return self.titles[item]


def clip_title(title: str, max_chars: int) -> str:
    """Collapse whitespace and clip to ``max_chars`` characters at a word boundary ("…" marks a cut)."""
    text = " ".join(title.split())
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 1]
    if " " in cut[max_chars // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:-") + "…"


def item_titles(data: SequentialData, max_chars: int = 120) -> Titles:
    """The dataset's usable titles; a dataset without titles is a ``DataError``."""
    if not data.titles:
        raise DataError(
            f"dataset {data.name!r} has no item titles, and the LLM recommender needs them: it reads and "
            "writes item titles. Use a dataset with a title file (ml-1m: movies.dat; amazon-beauty: its "
            "title/metadata file), or put that file beside the interactions and reload."
        )
    titles: dict[int, str] = {}
    for item in range(1, data.n_items + 1):
        raw = data.titles.get(item)
        if isinstance(raw, str) and raw.strip():
            titles[item] = clip_title(raw, max_chars)
    return Titles(titles=titles, n_missing=data.n_items - len(titles))


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt as TRL's ORPO trainer makes them: no special tokens added by the
    tokenizer, then BOS in front if the tokenizer has one and the text does not start with it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


@dataclass
class Prompt:
    """One prompt and what went into it.

    Attributes:
        text: the prompt text, ending where the answer starts.
        items: item ids shown, oldest first.
        n_untitled: items without a title passed over while collecting the most recent ones.
        n_dropped: oldest items dropped so that the prompt fits its token budget.
        n_tokens: length of the prompt in tokens (as ``encode_prompt`` counts them).
    """

    text: str
    items: list[int]
    n_untitled: int
    n_dropped: int
    n_tokens: int


class PromptBuilder:
    """Writes prompts from item histories for one tokenizer and one token budget.

    >>> builder = PromptBuilder(lm.tokenizer, item_titles(data), PromptConfig(), lm.context_length)
    >>> builder(history).text
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        titles: Titles,
        config: PromptConfig | None = None,
        context_length: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.titles = titles
        self.config = config or PromptConfig()
        budget = self.config.max_prompt_tokens
        if budget is None:
            if context_length is None:
                raise ValueError("give the model's context_length or set PromptConfig.max_prompt_tokens")
            budget = context_length - self.config.answer_tokens
        if budget < 16:
            raise ValueError(
                f"prompt token budget {budget} is too small to hold a prompt: raise the context length or "
                "lower PromptConfig.answer_tokens"
            )
        self.max_prompt_tokens = budget
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, items: Sequence[int]) -> str:
        """Prompt text showing exactly ``items`` (all must have titles), oldest first."""
        history = "\n".join(f"{k}. {self.titles[i]}" for k, i in enumerate(items, start=1))
        user = self.config.instruction.format(history=history)
        if self.uses_chat_template:
            messages = [{"role": "user", "content": user}]
            if self.config.system is not None:
                messages.insert(0, {"role": "system", "content": self.config.system})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        system = f"{self.config.system}\n\n" if self.config.system else ""
        return f"{system}{user}\nAnswer:\n"

    def __call__(self, history: Sequence[int]) -> Prompt:
        """Prompt for the next item after ``history`` (item ids, oldest first)."""
        shown: list[int] = []
        untitled = 0
        for item in reversed(list(history)):
            if len(shown) == self.config.n_recent:
                break
            if int(item) in self.titles:
                shown.append(int(item))
            else:
                untitled += 1
        shown.reverse()
        if not shown:
            raise DataError("no item of this history has a title: cannot write a prompt for it")
        dropped = 0
        while True:
            text = self.render(shown)
            n_tokens = len(encode_prompt(self.tokenizer, text))
            if n_tokens <= self.max_prompt_tokens:
                return Prompt(text=text, items=shown, n_untitled=untitled, n_dropped=dropped, n_tokens=n_tokens)
            if len(shown) == 1:
                raise DataError(
                    f"a prompt with a single item needs {n_tokens} tokens, more than the budget of "
                    f"{self.max_prompt_tokens}: shorten the instruction or lower max_title_chars"
                )
            shown = shown[1:]  # drop the oldest item
            dropped += 1
