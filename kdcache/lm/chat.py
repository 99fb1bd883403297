"""Chat data: a conversation rendered with the tokenizer's chat template, and its assistant tokens.

A conversation is a list of ``{"role": ..., "content": ...}`` dicts (a ``messages`` column). It is
rendered to text by ``tokenizer.apply_chat_template`` (the teacher's template, which the
fingerprint records) and tokenized without adding special tokens: the template writes its own.

The assistant tokens are what the model must generate after the template's generation prompt:
for assistant message i, the characters from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])``
(the reply and the template's end-of-turn marker, not the role header). A token is an assistant
token when it starts inside such a span (character offsets of a fast tokenizer). This needs a
template that renders a conversation's first turns as a prefix of the whole, which the common
templates do; one that rewrites earlier turns is refused for ``--train-on assistant``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdcache.errors import SpecError

ROLE, CONTENT = "role", "content"


def check_conversation(value: Any, where: str) -> list[dict[str, Any]]:
    """``value`` as a conversation, or a one-line refusal naming ``where`` (file and row)."""
    if not isinstance(value, list) or not value:
        raise SpecError(f"{where}: a conversation must be a non-empty list of messages")
    for number, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get(ROLE), str)
            and isinstance(message.get(CONTENT), str)
        ):
            raise SpecError(
                f"{where}: message {number} is not a dict with string 'role' and 'content' "
                f"fields, got {str(message)[:60]}"
            )
    return value


def _render(tokenizer: Any, messages: list[dict[str, Any]], where: str, **options: Any) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        raise SpecError(
            f"{where}: the tokenizer's chat template cannot render this conversation "
            f"({str(error)[:80]}); fix the conversation or give a tokenizer whose template takes it"
        ) from None
    return str(text)


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, Any]], text: str, where: str
) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the whole conversation rendered) that the assistant writes."""
    spans = []
    for number, message in enumerate(messages):
        if message[ROLE] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:number], where, add_generation_prompt=True)
        upto = _render(tokenizer, messages[: number + 1], where)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise SpecError(
                f"{where}: the tokenizer's chat template does not render the turns before "
                f"message {number} as a prefix of the whole conversation, so its assistant tokens "
                "cannot be located; use --train-on all, or a template that renders turns in order"
            )
        spans.append((len(prompt), len(upto)))
    return spans


def render_conversation(
    tokenizer: Any, messages: list[dict[str, Any]], where: str, *, locate_assistant: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The token ids of a rendered conversation and, when ``locate_assistant``, whether the
    assistant wrote each token (else None)."""
    if not getattr(tokenizer, "chat_template", None):
        raise SpecError(
            f"{where} holds conversations (a messages column) but the tokenizer has no chat "
            "template; give a model whose tokenizer_config.json sets chat_template, or a text "
            "column"
        )
    text = _render(tokenizer, messages, where)
    if not locate_assistant:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64), None
    spans = assistant_spans(tokenizer, messages, text, where)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise SpecError(
            f"{where}: locating assistant tokens needs a fast tokenizer (character offsets); "
            "save the model's tokenizer with tokenizers installed"
        ) from None
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
    assistant = np.zeros(len(ids), dtype=bool)
    for begin, end in spans:
        assistant |= (starts >= begin) & (starts < end)
    return ids, assistant
