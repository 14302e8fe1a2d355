"""Data sources -> conversational prompt/completion examples with a language tag.

Every source, whatever its format, becomes rows of
`{"prompt": [chat messages], "completion": [{"role": "assistant", ...}], "language": str}`,
which TRL's SFTTrainer treats as a conversational prompt-completion dataset: the chat template is
applied, and with `completion_only_loss` only the answer tokens carry loss.

Before any training, check_data reads every row of every local source, streamed, so that a bad row
of the last phase's data is reported (file and line) before the first phase spends any time.
"""

from __future__ import annotations

import csv
import itertools
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cft_adapters.errors import DataError, HubUnavailable
from cft_adapters.formats import FORMATS, RowError, language_columns, row_language
from cft_adapters.fingerprint import local_file, source_fingerprint  # noqa: F401  (source_fingerprint: re-exported)
from cft_adapters.local_rows import BadFile, BadRow, first_line, local_rows
from cft_adapters.recipe import DatasetSource, PhaseConfig, Recipe

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class SourceSummary:
    where: str  # dotted key path of the source in the recipe
    source: str
    examples: int | None  # None when unknown without downloading
    languages: dict[str, int] = field(default_factory=dict)
    preview: list[dict[str, Any]] = field(default_factory=list)
    unchecked: str | None = None  # why the source could not be read (dry run, hub unreachable)
    warnings: list[str] = field(default_factory=list)  # e.g. rows with an empty answer


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
    return FORMATS[src.format].columns(src) + language_columns(src)


def prompt_columns(src: DatasetSource) -> list[str]:
    """The columns a prompt source (generative replay) needs: no answer."""
    return FORMATS[src.format].prompt_columns(src) + language_columns(src)


def to_conversation(row: dict[str, Any], src: DatasetSource, where: str) -> dict[str, Any]:
    """One raw row -> prompt/completion messages and a language tag."""
    try:
        return _conversation(row, src)
    except RowError as exc:
        raise DataError(f"{where}: {exc}") from None


def _conversation(row: dict[str, Any], src: DatasetSource) -> dict[str, Any]:
    prompt, answer = FORMATS[src.format].conversation(row, src)
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}], "language": row_language(row, src)}


def _load_raw(src: DatasetSource, where: str, *, streaming: bool) -> Any:
    import datasets

    try:
        if src.path is not None:
            file = local_file(src)
            return datasets.load_dataset(_BUILDERS[file.suffix], data_files=str(file), split="train",
                                         streaming=streaming, **_csv_options(file))
        return datasets.load_dataset(
            src.hub, name=src.name, data_files=src.data_files, split=src.split, revision=src.revision, streaming=streaming
        )
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the source and the reason
        raise _unreadable(src, where, exc) from None


def _unreadable(src: DatasetSource, where: str, exc: Exception) -> DataError:
    reason = first_line(exc)
    if src.hub is not None:
        reason += " (the hub dataset may need network access, a config name, or a different split)"
        return HubUnavailable(f"{where}: cannot read {src.describe()}: {reason}")
    return DataError(f"{where}: cannot read {src.describe()}: {reason}")


def _csv_options(file: Path) -> dict[str, Any]:
    """CSV cells are text, as check_data reads them: pandas would turn '4' into a number and an
    empty cell or 'NA' into NaN, neither of which is an answer."""
    if file.suffix != ".csv":
        return {}
    import datasets

    with file.open(newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}), "na_filter": False}


def _check_columns(columns: list[str] | None, src: DatasetSource, where: str) -> None:
    if columns is None:
        return
    missing = [c for c in required_columns(src) if c not in columns]
    if missing:
        raise DataError(
            f"{where}: {src.describe()}: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)} for format '{src.format}' (found: {', '.join(columns)})"
        )


def sample_order(src: DatasetSource, rows: int, seed: int) -> list[int]:
    """The rows a source keeps, in a seeded order: `max_examples` of them, else `fraction`, else all."""
    keep = src.max_examples if src.max_examples is not None else (
        max(1, round(src.fraction * rows)) if src.fraction is not None else rows
    )
    return np.random.default_rng(seed).permutation(rows)[: min(keep, rows)].tolist()


def load_source(src: DatasetSource, where: str, seed: int) -> Any:
    """Read a whole source, check it, convert it and sample it (seeded)."""
    raw = _load_raw(src, where, streaming=False)
    _check_columns(raw.column_names, src, where)
    if len(raw) == 0:
        raise DataError(f"{where}: {src.describe()}: the dataset is empty")
    # A seeded sample; `order` maps back to the rows of the file, so errors name the real row.
    order = sample_order(src, len(raw), seed)
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


# ---------------------------------------------------------------------------------------------
# checking before training: every row of a local file, the first rows of a hub dataset
# ---------------------------------------------------------------------------------------------


def preview_source(src: DatasetSource, where: str, rows: int = 2) -> SourceSummary:
    """Check one training source. A local file: every row, streamed (see _check_local). A hub
    dataset: its first rows only, since reading it all means downloading it."""
    if src.path is not None:
        return _check_local(src, where, prompts=False, preview_rows=rows)
    first = _first_hub_rows(src, where, rows)
    if not first:
        raise DataError(f"{where}: {src.describe()}: the dataset is empty")
    _check_columns(list(first[0].keys()), src, where)
    preview = [to_conversation(row, src, f"{where} row {i}") for i, row in enumerate(first)]
    return SourceSummary(where, src.describe(), None, dict(Counter(p["language"] for p in preview)), preview)


def preview_prompts(src: DatasetSource, where: str, rows: int = 2) -> list[list[dict[str, str]]]:
    """Check one prompt source (generative replay): every row of a local file, the first rows of a hub dataset."""
    if src.path is not None:
        return [example["prompt"] for example in _check_local(src, where, prompts=True, preview_rows=rows).preview]
    first = _first_hub_rows(src, where, rows)
    if not first:
        raise DataError(f"{where}: {src.describe()}: the prompt source is empty")
    return [to_prompt(row, src, f"{where} row {i}") for i, row in enumerate(first)]


def _first_hub_rows(src: DatasetSource, where: str, rows: int) -> list[dict[str, Any]]:
    raw = _load_raw(src, where, streaming=True)
    try:
        return list(itertools.islice(iter(raw), rows))
    except Exception as exc:  # streaming reads lazily: the download or the parse fails here, not in _load_raw
        raise _unreadable(src, where, exc) from None


def check_data(
    recipe: Recipe, allow_unreachable_hub: bool = False, *, warn: Callable[[str], None] | None = None
) -> dict[int, list[SourceSummary]]:
    """Check every source of every phase before any training: every row of each local file, the
    first rows of each hub dataset. Problems are collected over all sources before raising, one
    line per source. With allow_unreachable_hub (the dry run), a hub source that cannot be read is
    reported as unchecked. Warnings (rows with an empty answer) go to `warn`; by default they are
    printed to stderr, once per process."""
    problems: list[str] = []
    found: dict[int, list[SourceSummary]] = {}
    for i, phase in enumerate(recipe.phases):
        sources = [(src, f"phases[{i}].datasets[{j}]", False) for j, src in enumerate(phase.datasets)]
        if phase.replay is not None:
            sources += [(src, f"phases[{i}].replay.{key}", key == "prompts")
                        for key, src in (("prompts", phase.replay.prompts), ("source", phase.replay.source)) if src]
        for src, where, prompts in sources:
            try:
                found.setdefault(i, []).append(_check_source(src, where, prompts=prompts))
            except HubUnavailable as exc:
                if not allow_unreachable_hub:
                    raise
                found.setdefault(i, []).append(SourceSummary(where, src.describe(), None, unchecked=exc.problems[0]))
            except DataError as exc:
                problems += exc.problems
    for summary in (s for summaries in found.values() for s in summaries):
        for message in summary.warnings:
            (warn or _warn_once)(message)
    if problems:
        raise DataError(problems)
    return found


def _check_source(src: DatasetSource, where: str, *, prompts: bool) -> SourceSummary:
    if src.path is not None:
        return _check_local(src, where, prompts=prompts)
    if prompts:
        return SourceSummary(where, src.describe(), None, preview=[{"prompt": p} for p in preview_prompts(src, where)])
    return preview_source(src, where)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass
class _Scan:
    """What reading every row of a local source found."""

    rows: int
    languages: Counter[str]
    preview: list[dict[str, Any]]
    empty: list[str]  # where the rows with an empty answer are (the first few)
    empty_count: int


# Per (file, size, mtime_ns, row shape): a study trains many runs on the same files in one process.
_SCANS: dict[tuple[Any, ...], _Scan] = {}
_SHOWN = 5  # bad or empty rows named in a message


def _check_local(src: DatasetSource, where: str, *, prompts: bool, preview_rows: int = 2) -> SourceSummary:
    """Every row of a local source (streamed): its shape errors name the file and the line (JSON,
    CSV) or row (parquet); rows with an empty answer are a warning, not an error."""
    file = local_file(src)
    try:
        stat = file.stat()
    except OSError as exc:
        raise DataError(f"{where}: {src.describe()}: cannot read: {exc.strerror}") from None
    shape = src.model_dump_json(include={"format", "columns", "messages_column", "language", "language_column"}
                                | ({"conversations_column"} if src.format == "sharegpt" else set()))
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, shape, prompts, preview_rows)
    if key not in _SCANS:
        _SCANS[key] = _scan_local(src, file, where, prompts=prompts, preview_rows=preview_rows)
    scan = _SCANS[key]
    count = min(scan.rows, src.max_examples) if src.max_examples else scan.rows
    count = max(1, round(src.fraction * count)) if src.fraction else count
    warnings = []
    if scan.empty_count:
        more = ", ..." if scan.empty_count > len(scan.empty) else ""
        warnings.append(f"{where}: {src.describe()}: {scan.empty_count} row(s) with an empty answer "
                        f"({', '.join(scan.empty)}{more}); they are kept, and teach the model to answer with nothing")
    return SourceSummary(where, src.describe(), count, dict(scan.languages), list(scan.preview), warnings=warnings)


def _scan_local(src: DatasetSource, file: Path, where: str, *, prompts: bool, preview_rows: int) -> _Scan:
    needed = prompt_columns(src) if prompts else required_columns(src)
    convert = _prompt_example if prompts else _conversation
    scan = _Scan(rows=0, languages=Counter(), preview=[], empty=[], empty_count=0)
    bad: list[tuple[str, str]] = []  # (where in the file, why): the first few
    bad_count, unit = 0, "row"
    try:
        unit, rows = local_rows(file)
        for number, row in rows:
            scan.rows += 1
            if type(row) is BadRow:
                reason = str(row)
            else:
                try:
                    example = convert(row, src)
                except RowError as exc:
                    reason = _missing_columns(row, needed, src) or str(exc)
                else:
                    scan.languages[example["language"]] += 1
                    if len(scan.preview) < preview_rows:
                        scan.preview.append(example)
                    if not prompts and (not (answer := example["completion"][0]["content"]) or answer.isspace()):
                        scan.empty_count += 1
                        if len(scan.empty) < _SHOWN:
                            scan.empty.append(f"{unit} {number}")
                    continue
            bad_count += 1
            if len(bad) <= _SHOWN:
                bad.append((f"{unit} {number}", reason))
    except BadFile as exc:  # the rest of the file cannot be read
        bad_count += 1
        bad.append(exc.args)
    except OSError as exc:
        raise DataError(f"{where}: {src.describe()}: cannot read: {exc.strerror}") from None
    if bad:
        loc, reason = bad[0]
        line = f"{where}: {src.describe()}{' ' + loc if loc else ''}: {reason}"
        if bad_count > 1:
            others = ", ".join(loc for loc, _ in bad[1:]) + (", ..." if bad_count > len(bad) else "")
            line += f" (and {bad_count - 1} more bad {unit}{'s' if bad_count > 2 else ''}: {others})"
        raise DataError(line)
    if scan.rows == 0:
        raise DataError(f"{where}: {src.describe()}: the {'prompt source' if prompts else 'dataset'} is empty")
    return scan


def _missing_columns(row: dict[str, Any], needed: list[str], src: DatasetSource) -> str | None:
    missing = [c for c in needed if c not in row]
    if not missing:
        return None
    return (f"missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
            f"for format '{src.format}' (found: {', '.join(str(c) for c in row)})")


# ---------------------------------------------------------------------------------------------
# prompts (generative replay) and tokenized data
# ---------------------------------------------------------------------------------------------


def to_prompt(row: dict[str, Any], src: DatasetSource, where: str) -> list[dict[str, str]]:
    """Only the prompt side of a row (generative replay answers it): alpaca instruction (+ input),
    the chat turns before the last assistant answer, or the mapped prompt column."""
    try:
        return FORMATS[src.format].prompt(row, src)
    except RowError as exc:
        raise DataError(f"{where}: {exc}") from None


def _prompt_example(row: dict[str, Any], src: DatasetSource) -> dict[str, Any]:
    return {"prompt": FORMATS[src.format].prompt(row, src), "language": row_language(row, src)}


def load_prompts(src: DatasetSource, where: str, seed: int) -> list[dict[str, Any]]:
    """Prompts of a source in a seeded order, each with its language tag."""
    raw = _load_raw(src, where, streaming=False)
    missing = [c for c in prompt_columns(src) if c not in raw.column_names]
    if missing:
        raise DataError(f"{where}: {src.describe()}: missing column(s) {', '.join(repr(m) for m in missing)} "
                        f"(found: {', '.join(raw.column_names)})")
    if len(raw) == 0:
        raise DataError(f"{where}: {src.describe()}: the prompt source is empty")
    order = sample_order(src, len(raw), seed)
    out = []
    for i in order:
        try:
            out.append(_prompt_example(raw[i], src))
        except RowError as exc:
            raise DataError(f"{where} row {i}: {exc}") from None
    return out


def truncate_tokenized(dataset: Any, max_length: int) -> Any:
    """Cut tokenized examples (input_ids and every per-token column) to max_length, keeping the start."""

    def cut(row: dict[str, Any]) -> dict[str, Any]:
        n = len(row["input_ids"])
        if n <= max_length:
            return row
        return {k: (v[:max_length] if isinstance(v, list) and len(v) == n else v) for k, v in row.items()}

    return dataset.map(cut, load_from_cache_file=False)
