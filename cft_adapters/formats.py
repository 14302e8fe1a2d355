"""Data formats: how a row of a source becomes chat messages. A registry, FORMATS, keyed by the
schema's `DatasetSource.format` values (tests/test_registries.py checks the two agree, so a format
added to the schema without an entry here fails a test instead of falling through to another).

Each format declares the columns a training row needs, the columns a prompt-only row needs
(generative replay answers it), and how to read both. Readers raise RowError (what is wrong with the
row); the caller adds where the row is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cft_adapters.recipe import DatasetSource

Messages = list[dict[str, str]]


class RowError(ValueError):
    """What is wrong with one row, without saying where the row is."""


@dataclass(frozen=True)
class Format:
    summary: str
    columns: Callable[[DatasetSource], list[str]]  # what a training row needs (the language column aside)
    prompt_columns: Callable[[DatasetSource], list[str]]  # what a prompt-only row needs
    conversation: Callable[[dict[str, Any], DatasetSource], tuple[Messages, str]]  # (prompt, answer)
    prompt: Callable[[dict[str, Any], DatasetSource], Messages]


def text(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise RowError(f"column '{column}': expected text, got {type(value).__name__} ({value!r:.60})")
    return value


def chat_turns(messages: list[Any], column: str) -> Messages:
    clean = []
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise RowError(f"column '{column}': each message needs 'role' and 'content' text, got {turn!r:.80}")
        clean.append({"role": turn["role"], "content": turn["content"]})
    return clean


# -- alpaca: instruction / input / output ---------------------------------------------------------


def _alpaca_prompt(row: dict[str, Any], src: DatasetSource) -> Messages:
    instruction, extra = text(row, "instruction"), row.get("input") or ""
    return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}]


def _alpaca(row: dict[str, Any], src: DatasetSource) -> tuple[Messages, str]:
    return _alpaca_prompt(row, src), text(row, "output")


# -- messages: a chat list whose last turn is the assistant's answer ----------------------------------


def _messages(row: dict[str, Any], src: DatasetSource) -> tuple[Messages, str]:
    column, messages = src.messages_column, row.get(src.messages_column)
    if not isinstance(messages, list) or len(messages) < 2:
        raise RowError(f"column '{column}': expected a list of at least 2 chat messages, got {messages!r:.80}")
    clean = chat_turns(messages, column)
    if clean[-1]["role"] != "assistant":
        raise RowError(f"column '{column}': the last message must be the assistant's answer, got role '{clean[-1]['role']}'")
    if not any(turn["role"] == "user" for turn in clean[:-1]):
        raise RowError(f"column '{column}': no user message before the answer")
    return clean[:-1], clean[-1]["content"]


def _messages_prompt(row: dict[str, Any], src: DatasetSource) -> Messages:
    turns = row.get(src.messages_column)
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        turns = turns[:-1]
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column '{src.messages_column}': expected a non-empty chat list")
    return chat_turns(turns, src.messages_column)


# -- sharegpt: `conversations` of {from, value} turns (human / gpt / system) ------------------------

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "system": "system"}


def _sharegpt_turns(row: dict[str, Any], src: DatasetSource) -> Messages:
    column, turns = src.conversations_column, row.get(src.conversations_column)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"column '{column}': expected a list of {{from, value}} turns, got {turns!r:.80}")
    clean = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise RowError(f"column '{column}': each turn needs 'from' and 'value' text, got {turn!r:.80}")
        role = SHAREGPT_ROLES.get(turn["from"].lower())
        if role is None:
            raise RowError(f"column '{column}': unknown speaker '{turn['from']}' (known: {', '.join(SHAREGPT_ROLES)})")
        clean.append({"role": role, "content": turn["value"]})
    return clean


def _sharegpt(row: dict[str, Any], src: DatasetSource) -> tuple[Messages, str]:
    return _messages({src.conversations_column: _sharegpt_turns(row, src)}, _as_messages(src))


def _sharegpt_prompt(row: dict[str, Any], src: DatasetSource) -> Messages:
    return _messages_prompt({src.conversations_column: _sharegpt_turns(row, src)}, _as_messages(src))


def _as_messages(src: DatasetSource) -> DatasetSource:
    """The 'messages' rules (last turn the answer, a user turn before it), on the converted turns."""
    return src.model_copy(update={"messages_column": src.conversations_column})


# -- columns: an explicit mapping (prompt, response, optional system) --------------------------------


def _mapped_columns(src: DatasetSource) -> list[str]:
    assert src.columns is not None  # the schema requires `columns` for this format
    return [src.columns.prompt, src.columns.response] + ([src.columns.system] if src.columns.system else [])


def _columns_prompt(row: dict[str, Any], src: DatasetSource) -> Messages:
    assert src.columns is not None
    return [{"role": "user", "content": text(row, src.columns.prompt)}]


def _columns(row: dict[str, Any], src: DatasetSource) -> tuple[Messages, str]:
    assert src.columns is not None
    prompt = _columns_prompt(row, src)
    if src.columns.system and row.get(src.columns.system):
        prompt.insert(0, {"role": "system", "content": text(row, src.columns.system)})
    return prompt, text(row, src.columns.response)


FORMATS: dict[str, Format] = {
    "alpaca": Format("instruction / input / output (Alpaca, MultiAlpaca, Bactrian-X)",
                     lambda src: ["instruction", "output"], lambda src: ["instruction"], _alpaca, _alpaca_prompt),
    "messages": Format("a chat list whose last turn is the assistant's answer",
                       lambda src: [src.messages_column], lambda src: [src.messages_column], _messages, _messages_prompt),
    "sharegpt": Format("ShareGPT: `conversations` of {from, value} turns (human / gpt / system)",
                       lambda src: [src.conversations_column], lambda src: [src.conversations_column], _sharegpt,
                       _sharegpt_prompt),
    "columns": Format("explicit prompt / response (/ system) columns",
                      _mapped_columns, lambda src: [src.columns.prompt] if src.columns else [], _columns, _columns_prompt),
}


def language_columns(src: DatasetSource) -> list[str]:
    return [src.language_column] if src.language_column else []


def row_language(row: dict[str, Any], src: DatasetSource) -> str:
    return src.language if src.language is not None else text(row, str(src.language_column))
