"""What a reward input is, and how it becomes the token ids a model scores.

Four input forms are accepted, one per item:

- ``PromptResponse``: a single user turn and the assistant's reply, formatted with the tokenizer's
  chat template (or the fallback format below when the tokenizer has none);
- ``Messages``: a whole conversation, formatted with the chat template (or the fallback);
- ``Text``: text that is already formatted; special tokens are added as the tokenizer does by default,
  without ever doubling a BOS the text already carries, or not at all with ``add_special_tokens: false``
  (how TRL tokenizes a plain-string prompt + completion for a reward model);
- ``TokenIds``: token ids used exactly as given.

Fallback format (tokenizers without a chat template), the HH-RLHF convention::

    "\\n\\nHuman: {user}\\n\\nAssistant: {assistant}" (system turns as "\\n\\nSystem: {system}")

Encoder models (BERT-like cross-encoders) without a chat template score ``PromptResponse`` as a text
pair (``[CLS] prompt [SEP] response [SEP]``), as cross-encoders are trained.

Truncation keeps at most ``max_length`` tokens: ``left`` (default) drops the oldest tokens so the
scored end survives, keeping a leading special token (BOS/CLS) in place; ``right`` drops the end;
``error`` refuses the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from rmserve.names import Truncation

Role = Literal["system", "user", "assistant"]

FALLBACK_ROLE_NAMES: dict[str, str] = {"system": "System", "user": "Human", "assistant": "Assistant"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Message(_Frozen):
    """One chat turn."""

    role: Role = Field(description="Who speaks: system, user or assistant.")
    content: str = Field(description="The turn's text.")


class PromptResponse(_Frozen):
    """A user prompt and the assistant response to score."""

    prompt: str = Field(description="The user turn.")
    response: str = Field(description="The assistant turn that is scored.")


class Messages(_Frozen):
    """A whole conversation; its last turn is normally the assistant response being scored."""

    messages: list[Message] = Field(min_length=1, description="The conversation, in order.")


class Text(_Frozen):
    """Already formatted text (e.g. a chat-templated string)."""

    text: str = Field(min_length=1, description="Formatted text, scored as is.")
    add_special_tokens: bool | None = Field(
        None,
        description="Whether the tokenizer adds its special tokens (BOS, ...); default: as the tokenizer "
        "does by default. false: tokenize the text alone, as TRL does for a plain-string prompt + completion.",
    )


class TokenIds(_Frozen):
    """Token ids, scored exactly as given."""

    input_ids: list[Annotated[int, Field(ge=0)]] = Field(
        min_length=1, description="Token ids of the model's tokenizer (each below its vocabulary size)."
    )


RewardInput = PromptResponse | Messages | Text | TokenIds

_INPUT_FORMS = {  # tag: (required keys, optional keys)
    "prompt_response": ({"prompt", "response"}, set()),
    "messages": ({"messages"}, set()),
    "text": ({"text"}, {"add_special_tokens"}),
    "input_ids": ({"input_ids"}, set()),
}
INPUT_FORMS_HELP = (
    'each input is one of {"prompt", "response"}, {"messages"}, {"text"} (optionally with '
    '"add_special_tokens") or {"input_ids"}'
)


def _input_form(value: Any) -> str | None:
    """The tag of an input object, from its keys (None: no form matches)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if not isinstance(value, dict):
        return None
    keys = set(value)
    for tag, (required, optional) in _INPUT_FORMS.items():
        if required <= keys <= required | optional:
            return tag
    return None


# The JSON form of an input: the form is chosen by the keys, with one clear error when none fits.
ScoreInput = Annotated[
    Annotated[PromptResponse, Tag("prompt_response")]
    | Annotated[Messages, Tag("messages")]
    | Annotated[Text, Tag("text")]
    | Annotated[TokenIds, Tag("input_ids")],
    Discriminator(
        _input_form,
        custom_error_type="input_form",
        custom_error_message=f"{INPUT_FORMS_HELP}, with no other keys",
    ),
]


INPUT_ADAPTER: TypeAdapter[RewardInput] = TypeAdapter(ScoreInput)


class InputError(ValueError):
    """An input cannot be scored as given; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class EncodedInput:
    """Token ids ready for the model.

    Attributes:
        token_ids: the ids to score, at most ``max_length`` of them, never empty.
        token_type_ids: segment ids for encoder text pairs, else ``None``.
        truncated: whether tokens were dropped to fit ``max_length``.
        prompt_tokens: with an encoder made with ``prompt_spans``: how many of the leading ``token_ids``
            are the prompt (see ``InputEncoder``); else ``None``.
    """

    token_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...] | None
    truncated: bool
    prompt_tokens: int | None = None

    def __len__(self) -> int:
        return len(self.token_ids)


class InputEncoder:
    """Turns reward inputs into ``EncodedInput`` for one tokenizer.

    Not thread-safe (Hugging Face fast tokenizers are not): use one encoder per thread.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        max_length: the most tokens one input may have after truncation.
        vocab_size: ids in ``TokenIds`` inputs must lie in ``[0, vocab_size)``.
        text_pairs: score ``PromptResponse`` as a text pair when there is no chat template
            (encoder cross-encoders).
        prompt_spans: also give each encoding its ``prompt_tokens``: the leading tokens that are the
            prompt (every turn before the scored reply: a ``PromptResponse``'s prompt, the turns before a
            ``Messages``' final assistant turn), found as the common prefix of the input's tokens and the
            prompt's own, counted after truncation (at least 1). Inputs without a reply to tell apart
            (``Text``, ``TokenIds``, conversations not ending with an assistant turn) are all prompt.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int,
        vocab_size: int,
        text_pairs: bool,
        prompt_spans: bool = False,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.text_pairs = text_pairs
        self.prompt_spans = prompt_spans
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._special_ids = frozenset(tokenizer.all_special_ids)

    def encode(
        self, item: RewardInput, truncation: Truncation = "left", limit: int | None = None
    ) -> EncodedInput:
        """Tokenise one input and apply the truncation policy.

        Args:
            item: the input.
            truncation: what to do past the limit.
            limit: a tighter token limit than ``max_length`` for this input (e.g. vLLM's
                ``truncate_prompt_tokens``).

        Raises:
            InputError: the input is empty after tokenisation, has out-of-vocabulary ids, or is
                longer than the limit with ``truncation="error"``.
        """
        ids, types = self._tokenize(item)
        if not ids:
            raise InputError("the input has no tokens after tokenization; send a non-empty text.")
        limit = min(limit or self.max_length, self.max_length)
        encoded = self._truncate(ids, types, truncation, limit)
        if not self.prompt_spans:
            return encoded
        prompt = self._prompt_length(item, ids)
        keep = self._kept(ids, truncation, limit)
        kept = prompt if keep is None else sum(1 for i in keep if i < prompt)
        return replace(encoded, prompt_tokens=max(1, kept))

    def _prompt_length(self, item: RewardInput, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` (the untruncated input) are its prompt."""
        if isinstance(item, PromptResponse):
            turns = [Message(role="user", content=item.prompt)]
        elif isinstance(item, Messages) and len(item.messages) > 1 and item.messages[-1].role == "assistant":
            turns = item.messages[:-1]
        else:
            return len(ids)
        prompt = self._ids(self.render(turns), special=not self.has_chat_template)
        same = 0
        for a, b in zip(ids, prompt, strict=False):
            if a != b:
                break
            same += 1
        return same

    def encode_many(
        self, items: Sequence[RewardInput], truncation: Truncation = "left", limit: int | None = None
    ) -> list[EncodedInput]:
        """Encode several inputs; an error names the index of the first bad input."""
        out = []
        for index, item in enumerate(items):
            try:
                out.append(self.encode(item, truncation, limit))
            except InputError as exc:
                raise InputError(f"inputs[{index}]: {exc}") from None
        return out

    def render(self, messages: Sequence[Message]) -> str:
        """The text a conversation is scored as (chat template, or the documented fallback)."""
        if self.has_chat_template:
            turns = [{"role": m.role, "content": m.content} for m in messages]
            text = self.tokenizer.apply_chat_template(turns, tokenize=False)
            assert isinstance(text, str)
            return text
        return "".join(f"\n\n{FALLBACK_ROLE_NAMES[m.role]}: {m.content}" for m in messages)

    def _tokenize(self, item: RewardInput) -> tuple[list[int], list[int] | None]:
        if isinstance(item, TokenIds):
            bad = [i for i in item.input_ids if not 0 <= i < self.vocab_size]
            if bad:
                raise InputError(
                    f"input_ids contains {bad[0]}, outside this model's vocabulary [0, {self.vocab_size}); "
                    "send ids produced by the model's own tokenizer."
                )
            return list(item.input_ids), None
        if isinstance(item, Text):
            return self._ids(item.text, special=item.add_special_tokens is not False), None
        if isinstance(item, PromptResponse):
            if self.text_pairs and not self.has_chat_template:
                enc = self.tokenizer(
                    item.prompt, item.response, add_special_tokens=True, return_token_type_ids=True
                )
                return list(enc["input_ids"]), list(
                    enc["token_type_ids"]
                ) if "token_type_ids" in enc else None
            messages = [
                Message(role="user", content=item.prompt),
                Message(role="assistant", content=item.response),
            ]
            return self._ids(self.render(messages), special=not self.has_chat_template), None
        return self._ids(self.render(item.messages), special=not self.has_chat_template), None

    def _ids(self, text: str, *, special: bool) -> list[int]:
        # A chat template writes its own special tokens, so its text is tokenised without adding any
        # (as apply_chat_template(tokenize=True) does); plain text gets the tokenizer's defaults.
        ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if special and bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]  # the text already began with BOS and the tokenizer added another
        return ids

    def _truncate(
        self, ids: list[int], types: list[int] | None, truncation: Truncation, max_length: int
    ) -> EncodedInput:
        n = len(ids)
        keep = self._kept(ids, truncation, max_length)
        if keep is None:
            return EncodedInput(tuple(ids), None if types is None else tuple(types), truncated=False)
        if truncation == "error":
            raise InputError(
                f"the input has {n} tokens, more than max_length={max_length}; shorten it, or send "
                '"truncation": "left" (drop the oldest tokens) or "right" (drop the end).'
            )
        new_types = None if types is None else tuple(types[i] for i in keep)
        return EncodedInput(tuple(ids[i] for i in keep), new_types, truncated=True)

    def _kept(self, ids: list[int], truncation: Truncation, max_length: int) -> list[int] | None:
        """The indices of ``ids`` truncation keeps, in order (None: all of them)."""
        n = len(ids)
        if n <= max_length or truncation == "error":
            return None if n <= max_length else []
        if truncation == "right":
            return list(range(max_length))
        head = 1 if ids[0] in self._special_ids else 0
        return list(range(head)) + list(range(n - (max_length - head), n))
