"""Data sources -> conversational prompt/completion examples with a language tag.

Every source, whatever its format, becomes rows of
`{"prompt": [chat messages], "completion": [{"role": "assistant", ...}], "language": str}`,
which TRL's SFTTrainer treats as a conversational prompt-completion dataset: the chat template is
applied, and with `completion_only_loss` only the answer tokens carry loss.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cft_adapters.errors import DataError, HubUnavailable
from cft_adapters.recipe import BUILTIN_PREFIX, DatasetSource, PhaseConfig, Recipe, builtin_data_path

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class SourceSummary:
    where: str  # dotted key path of the source in the recipe
    source: str
    examples: int | None  # None when unknown without downloading
    languages: dict[str, int] = field(default_factory=dict)
    preview: list[dict[str, Any]] = field(default_factory=list)
    unchecked: str | None = None  # why the source could not be read (dry run, hub unreachable)


@dataclass
class PhaseData:
    dataset: Any  # datasets.Dataset with prompt / completion / language
    sources: list[SourceSummary]

    @property
    def languages(self) -> dict[str, int]:
        return dict(sorted(Counter(self.dataset["language"]).items()))

    def for_trainer(self) -> Any:
        """The columns SFTTrainer reads; the language tag stays in the run statistics."""
        return self.dataset.remove_columns(["language"])


def required_columns(src: DatasetSource) -> list[str]:
    if src.format == "alpaca":
        cols = ["instruction", "output"]
    elif src.format == "messages":
        cols = [src.messages_column]
    else:
        assert src.columns is not None
        cols = [src.columns.prompt, src.columns.response] + ([src.columns.system] if src.columns.system else [])
    return cols + ([src.language_column] if src.language_column else [])


def to_conversation(row: dict[str, Any], src: DatasetSource, where: str) -> dict[str, Any]:
    """One raw row -> prompt/completion messages and a language tag."""
    if src.format == "alpaca":
        instruction, extra = _text(row, "instruction", where), row.get("input") or ""
        prompt = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}]
        answer = _text(row, "output", where)
    elif src.format == "messages":
        prompt, answer = _split_messages(row.get(src.messages_column), where, src.messages_column)
    else:
        assert src.columns is not None
        prompt = [{"role": "user", "content": _text(row, src.columns.prompt, where)}]
        if src.columns.system and row.get(src.columns.system):
            prompt.insert(0, {"role": "system", "content": _text(row, src.columns.system, where)})
        answer = _text(row, src.columns.response, where)
    language = src.language if src.language is not None else _text(row, str(src.language_column), where)
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}], "language": language}


def _text(row: dict[str, Any], column: str, where: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise DataError(f"{where}: column '{column}': expected text, got {type(value).__name__} ({value!r:.60})")
    return value


def _split_messages(messages: Any, where: str, column: str) -> tuple[list[dict[str, str]], str]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: column '{column}': expected a list of at least 2 chat messages, got {messages!r:.80}")
    clean = []
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: column '{column}': each message needs 'role' and 'content' text, got {turn!r:.80}")
        clean.append({"role": turn["role"], "content": turn["content"]})
    if clean[-1]["role"] != "assistant":
        raise DataError(f"{where}: column '{column}': the last message must be the assistant's answer, got role '{clean[-1]['role']}'")
    if not any(turn["role"] == "user" for turn in clean[:-1]):
        raise DataError(f"{where}: column '{column}': no user message before the answer")
    return clean[:-1], clean[-1]["content"]


def _local_file(src: DatasetSource) -> Path:
    assert src.path is not None
    return builtin_data_path(src.path) if src.path.startswith(BUILTIN_PREFIX) else Path(src.path)


def _load_raw(src: DatasetSource, where: str, *, streaming: bool) -> Any:
    import datasets

    try:
        if src.path is not None:
            file = _local_file(src)
            return datasets.load_dataset(_BUILDERS[file.suffix], data_files=str(file), split="train", streaming=streaming)
        return datasets.load_dataset(
            src.hub, name=src.name, data_files=src.data_files, split=src.split, revision=src.revision, streaming=streaming
        )
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the source and the reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if src.hub is not None:
            reason += " (the hub dataset may need network access, a config name, or a different split)"
            raise HubUnavailable(f"{where}: cannot read {src.describe()}: {reason}") from None
        raise DataError(f"{where}: cannot read {src.describe()}: {reason}") from None


def _check_columns(columns: list[str] | None, src: DatasetSource, where: str) -> None:
    if columns is None:
        return
    missing = [c for c in required_columns(src) if c not in columns]
    if missing:
        raise DataError(
            f"{where}: {src.describe()}: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)} for format '{src.format}' (found: {', '.join(columns)})"
        )


def load_source(src: DatasetSource, where: str, seed: int) -> Any:
    """Read a whole source, check it, convert it and sample it (seeded)."""
    raw = _load_raw(src, where, streaming=False)
    _check_columns(raw.column_names, src, where)
    if len(raw) == 0:
        raise DataError(f"{where}: {src.describe()}: the dataset is empty")
    keep = src.max_examples if src.max_examples is not None else (
        max(1, round(src.fraction * len(raw))) if src.fraction is not None else len(raw)
    )
    # A seeded sample; `order` maps back to the rows of the file, so errors name the real row.
    order = np.random.default_rng(seed).permutation(len(raw))[: min(keep, len(raw))].tolist()
    raw = raw.select(order)
    converted = raw.map(
        lambda row, i: to_conversation(row, src, f"{where} row {order[i]}"),
        with_indices=True,
        remove_columns=raw.column_names,
        load_from_cache_file=False,
        desc=None,
    )
    return converted


def load_phase_data(phase: PhaseConfig, phase_index: int, seed: int) -> PhaseData:
    """All sources of recipe phases[phase_index], concatenated and shuffled with `seed`."""
    import datasets

    parts, summaries = [], []
    for j, src in enumerate(phase.datasets):
        where = f"phases[{phase_index}].datasets[{j}]"
        part = load_source(src, where, seed)
        parts.append(part)
        summaries.append(SourceSummary(where, src.describe(), len(part), dict(Counter(part["language"]))))
    dataset = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    return PhaseData(dataset=dataset, sources=summaries)


def preview_source(src: DatasetSource, where: str, rows: int = 2) -> SourceSummary:
    """Dry-run check: read only the first rows, check columns and conversion; count local rows."""
    raw = _load_raw(src, where, streaming=True)
    first = list(itertools.islice(iter(raw), rows))
    if not first:
        raise DataError(f"{where}: {src.describe()}: the dataset is empty")
    _check_columns(list(first[0].keys()), src, where)
    preview = [to_conversation(row, src, f"{where} row {i}") for i, row in enumerate(first)]
    count = _count_local_rows(src) if src.path is not None else None
    if count is not None:
        count = min(count, src.max_examples) if src.max_examples else count
        count = max(1, round(src.fraction * count)) if src.fraction else count
    languages = Counter(p["language"] for p in preview)
    if src.path is not None and src.language_column:  # local: count every row's tag, not the preview's
        languages = Counter(str(v) for v in _load_raw(src, where, streaming=False)[src.language_column])
    return SourceSummary(where, src.describe(), count, dict(languages), preview)


def _count_local_rows(src: DatasetSource) -> int | None:
    file = _local_file(src)
    if file.suffix == ".jsonl":
        with file.open("rb") as fh:
            return sum(1 for line in fh if line.strip())
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file).metadata.num_rows
    if file.suffix == ".csv":
        import csv

        with file.open(newline="", encoding="utf-8") as fh:
            return max(0, sum(1 for _ in csv.reader(fh)) - 1)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError:  # JSON Lines under a .json name
        return sum(1 for line in file.read_text(encoding="utf-8").splitlines() if line.strip())
    return len(data) if isinstance(data, list) else None


def check_data(recipe: Recipe, allow_unreachable_hub: bool = False) -> dict[int, list[SourceSummary]]:
    """Read the first rows of every source. Every problem is collected before raising. With
    allow_unreachable_hub (the dry run), a hub source that cannot be read is reported as unchecked."""
    problems: list[str] = []
    found: dict[int, list[SourceSummary]] = {}
    for i, phase in enumerate(recipe.phases):
        for j, src in enumerate(phase.datasets):
            where = f"phases[{i}].datasets[{j}]"
            try:
                found.setdefault(i, []).append(preview_source(src, where))
            except HubUnavailable as exc:
                if not allow_unreachable_hub:
                    raise
                found.setdefault(i, []).append(SourceSummary(where, src.describe(), None, unchecked=exc.problems[0]))
            except DataError as exc:
                problems += exc.problems
        replay = phase.replay
        extra = [(replay.prompts, "prompts", True), (replay.source, "source", False)] if replay else []
        for src, key, prompts_only in extra:
            if src is None:
                continue
            try:
                preview_prompts(src, f"phases[{i}].replay.{key}") if prompts_only else preview_source(src, f"phases[{i}].replay.{key}")
            except HubUnavailable as exc:
                if not allow_unreachable_hub:
                    raise
                found.setdefault(i, []).append(SourceSummary(f"phases[{i}].replay.{key}", src.describe(), None, unchecked=exc.problems[0]))
            except DataError as exc:
                problems += exc.problems
    if problems:
        raise DataError(problems)
    return found


def to_prompt(row: dict[str, Any], src: DatasetSource, where: str) -> list[dict[str, str]]:
    """Only the prompt side of a row (generative replay answers it): alpaca instruction (+ input),
    the chat turns before the last assistant answer, or the mapped prompt column."""
    if src.format == "alpaca":
        instruction, extra = _text(row, "instruction", where), row.get("input") or ""
        return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}]
    if src.format == "messages":
        turns = row.get(src.messages_column)
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
            turns = turns[:-1]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: column '{src.messages_column}': expected a non-empty chat list")
        return [{"role": t["role"], "content": t["content"]} for t in turns]
    assert src.columns is not None
    return [{"role": "user", "content": _text(row, src.columns.prompt, where)}]


def load_prompts(src: DatasetSource, where: str, seed: int) -> list[dict[str, Any]]:
    """Prompts of a source in a seeded order, each with its language tag."""
    raw = _load_raw(src, where, streaming=False)
    needed = {"alpaca": ["instruction"], "messages": [src.messages_column]}.get(
        src.format, [src.columns.prompt] if src.columns else [])
    needed += [src.language_column] if src.language_column else []
    missing = [c for c in needed if c not in raw.column_names]
    if missing:
        raise DataError(f"{where}: {src.describe()}: missing column(s) {', '.join(repr(m) for m in missing)} "
                        f"(found: {', '.join(raw.column_names)})")
    if len(raw) == 0:
        raise DataError(f"{where}: {src.describe()}: the prompt source is empty")
    order = np.random.default_rng(seed).permutation(len(raw)).tolist()
    if src.max_examples is not None:
        order = order[: src.max_examples]
    out = []
    for i in order:
        row = raw[i]
        language = src.language if src.language is not None else _text(row, str(src.language_column), where)
        out.append({"prompt": to_prompt(row, src, f"{where} row {i}"), "language": language})
    return out


def preview_prompts(src: DatasetSource, where: str, rows: int = 2) -> list[list[dict[str, str]]]:
    """Dry-run check of a prompt source: the first rows convert to prompts."""
    raw = _load_raw(src, where, streaming=True)
    first = list(itertools.islice(iter(raw), rows))
    if not first:
        raise DataError(f"{where}: {src.describe()}: the prompt source is empty")
    return [to_prompt(row, src, f"{where} row {i}") for i, row in enumerate(first)]


def truncate_tokenized(dataset: Any, max_length: int) -> Any:
    """Cut tokenized examples (input_ids and every per-token column) to max_length, keeping the start."""

    def cut(row: dict[str, Any]) -> dict[str, Any]:
        n = len(row["input_ids"])
        if n <= max_length:
            return row
        return {k: (v[:max_length] if isinstance(v, list) and len(v) == n else v) for k, v in row.items()}

    return dataset.map(cut, load_from_cache_file=False)
