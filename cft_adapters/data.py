"""Data sources -> conversational prompt/completion examples with a language tag.

Every source, whatever its format, becomes rows of
`{"prompt": [chat messages], "completion": [{"role": "assistant", ...}], "language": str}`,
which TRL's SFTTrainer treats as a conversational prompt-completion dataset: the chat template is
applied, and with `completion_only_loss` only the answer tokens carry loss.

Before any training, check_data reads every row of every local source, streamed, so that a bad row
of the last phase's data is reported (file and line) before the first phase spends any time.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import json.scanner
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cft_adapters.errors import DataError, HubUnavailable
from cft_adapters.recipe import BUILTIN_PREFIX, DatasetSource, PhaseConfig, Recipe, builtin_data_path
from cft_adapters.util.digest import file_sha256

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
    if src.format == "alpaca":
        cols = ["instruction", "output"]
    elif src.format == "messages":
        cols = [src.messages_column]
    else:
        assert src.columns is not None
        cols = [src.columns.prompt, src.columns.response] + ([src.columns.system] if src.columns.system else [])
    return cols + ([src.language_column] if src.language_column else [])


def prompt_columns(src: DatasetSource) -> list[str]:
    """The columns a prompt source (generative replay) needs: no answer."""
    if src.format == "alpaca":
        cols = ["instruction"]
    elif src.format == "messages":
        cols = [src.messages_column]
    else:
        assert src.columns is not None
        cols = [src.columns.prompt]
    return cols + ([src.language_column] if src.language_column else [])


class _RowError(ValueError):
    """What is wrong with one row, without saying where the row is."""


def to_conversation(row: dict[str, Any], src: DatasetSource, where: str) -> dict[str, Any]:
    """One raw row -> prompt/completion messages and a language tag."""
    try:
        return _conversation(row, src)
    except _RowError as exc:
        raise DataError(f"{where}: {exc}") from None


def _conversation(row: dict[str, Any], src: DatasetSource) -> dict[str, Any]:
    if src.format == "alpaca":
        instruction, extra = _text(row, "instruction"), row.get("input") or ""
        prompt = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}]
        answer = _text(row, "output")
    elif src.format == "messages":
        prompt, answer = _split_messages(row.get(src.messages_column), src.messages_column)
    else:
        assert src.columns is not None
        prompt = [{"role": "user", "content": _text(row, src.columns.prompt)}]
        if src.columns.system and row.get(src.columns.system):
            prompt.insert(0, {"role": "system", "content": _text(row, src.columns.system)})
        answer = _text(row, src.columns.response)
    language = src.language if src.language is not None else _text(row, str(src.language_column))
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}], "language": language}


def _text(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise _RowError(f"column '{column}': expected text, got {type(value).__name__} ({value!r:.60})")
    return value


def _split_messages(messages: Any, column: str) -> tuple[list[dict[str, str]], str]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise _RowError(f"column '{column}': expected a list of at least 2 chat messages, got {messages!r:.80}")
    clean = _chat_turns(messages, column)
    if clean[-1]["role"] != "assistant":
        raise _RowError(f"column '{column}': the last message must be the assistant's answer, got role '{clean[-1]['role']}'")
    if not any(turn["role"] == "user" for turn in clean[:-1]):
        raise _RowError(f"column '{column}': no user message before the answer")
    return clean[:-1], clean[-1]["content"]


def _chat_turns(messages: list[Any], column: str) -> list[dict[str, str]]:
    clean = []
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise _RowError(f"column '{column}': each message needs 'role' and 'content' text, got {turn!r:.80}")
        clean.append({"role": turn["role"], "content": turn["content"]})
    return clean


def _local_file(src: DatasetSource) -> Path:
    assert src.path is not None
    return builtin_data_path(src.path) if src.path.startswith(BUILTIN_PREFIX) else Path(src.path)


def _load_raw(src: DatasetSource, where: str, *, streaming: bool) -> Any:
    import datasets

    try:
        if src.path is not None:
            file = _local_file(src)
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
    reason = _first_line(exc)
    if src.hub is not None:
        reason += " (the hub dataset may need network access, a config name, or a different split)"
        return HubUnavailable(f"{where}: cannot read {src.describe()}: {reason}")
    return DataError(f"{where}: cannot read {src.describe()}: {reason}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    file = _local_file(src)
    try:
        stat = file.stat()
    except OSError as exc:
        raise DataError(f"{where}: {src.describe()}: cannot read: {exc.strerror}") from None
    shape = src.model_dump_json(include={"format", "columns", "messages_column", "language", "language_column"})
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
        unit, rows = _local_rows(file)
        for number, row in rows:
            scan.rows += 1
            if type(row) is _BadRow:
                reason = str(row)
            else:
                try:
                    example = convert(row, src)
                except _RowError as exc:
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
    except _BadFile as exc:  # the rest of the file cannot be read
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
# reading local files row by row, streamed, each row with its line
# ---------------------------------------------------------------------------------------------

_CHUNK = 1 << 20
_NL = b"\n"


class _BadRow(str):
    """Why a row could not be read; it stands in for the row, and reading goes on."""


class _BadFile(Exception):
    """(where, why): the rest of the file cannot be read (a broken JSON array, CSV or parquet file)."""


def _local_rows(file: Path) -> tuple[str, Iterator[tuple[int, dict[str, Any] | _BadRow]]]:
    """('line' or 'row', (number, row) for every row). Rows are numbered as an editor shows them:
    JSON and CSV by line (from 1), parquet by row (from 1)."""
    if file.suffix == ".parquet":
        return "row", _parquet_rows(file)
    if file.suffix == ".csv":
        return "line", _csv_rows(file)
    # As datasets does: a file that opens with '[' is one JSON array; anything else is JSON Lines.
    return "line", (_json_array_rows(file) if _first_byte(file) == b"[" else _json_lines_rows(file))


def _first_byte(file: Path) -> bytes:
    with file.open("rb") as fh:
        head = fh.read(_CHUNK).removeprefix(codecs.BOM_UTF8)
        while head and not head.lstrip():
            head = fh.read(_CHUNK)
    return head.lstrip()[:1]


def _json_lines_rows(file: Path) -> Iterator[tuple[int, dict[str, Any] | _BadRow]]:
    # The C scanner that json.loads runs, called directly: json.loads' own Python layers cost a third
    # of the time on a large file. Anything the fast path does not accept goes through json.loads.
    scan = json.scanner.make_scanner(json.JSONDecoder())
    with file.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, _BadRow(_not_utf8(raw[exc.start], exc.start + 1))
                continue
            try:
                row, end = scan(text, 0)
                if end != len(text) and not text[end:].isspace():
                    raise ValueError
            except (StopIteration, ValueError):
                row = _json_line(text, raw, number, file)
                if row is None:
                    continue
            if isinstance(row, dict) or type(row) is _BadRow:
                yield number, row
            else:
                yield number, _BadRow(f"expected a JSON object, got {_json_kind(row)}")


def _json_line(text: str, raw: bytes, number: int, file: Path) -> Any:
    """One line through json.loads: its value, None for a blank line, or why it is not JSON."""
    try:
        return json.loads(text.removeprefix("\ufeff") if number == 1 else text)
    except json.JSONDecodeError as exc:
        if not text.strip():  # blank lines are skipped, as datasets does
            return None
        column = min(exc.pos, len(raw.rstrip(b"\r\n"))) + 1  # not past the line's end
        hint = "; a .json file holds one JSON object per line, or one JSON array of objects" if file.suffix == ".json" else ""
        return _BadRow(f"not valid JSON: {exc.msg} (column {column}){hint}")


def _not_utf8(byte: int, column: int) -> str:
    return f"not UTF-8 text (byte 0x{byte:02x} at column {column}); save the file as UTF-8"


def _json_kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _utf8_blocks(file: Path) -> Iterator[str]:
    """The text of a file in blocks of about 1 MiB. A byte that is not UTF-8 ends it with a
    _BadFile naming its line and column."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, column = 1, 0  # where the next byte read is (column counted in bytes, from 0)
    with file.open("rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            pending = decoder.getstate()[0]  # the start of a character cut by the last chunk
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                data, start = exc.object, exc.start  # data is pending + chunk
                newline = data.rfind(_NL, 0, start)
                at = start - newline if newline >= 0 else column - len(pending) + start + 1
                raise _BadFile(f"line {line + data.count(_NL, 0, start)}", _not_utf8(data[start], at)) from None
            newline = chunk.rfind(b"\n")
            line += chunk.count(b"\n")
            column = len(chunk) - newline - 1 if newline >= 0 else column + len(chunk)
            if text:
                yield text
            if not chunk:
                return


class _TextWindow:
    """The unread part of a streamed text, and the line and column of any position in it."""

    def __init__(self, blocks: Iterator[str]):
        self.blocks, self.text, self.eof = blocks, "", False
        self.dropped = 0  # characters dropped before text[0]
        self._line, self._counted = 1, 0  # line number at text[_counted]
        self._column0 = 0  # characters of the line that text[0] is on, before text[0]

    def more(self, keep_from: int) -> bool:
        """Drop text[:keep_from] and read the next block; False at the end of the file."""
        self.line_at(keep_from)
        newline = self.text.rfind("\n", 0, keep_from)
        self._column0 = keep_from - newline - 1 if newline >= 0 else self._column0 + keep_from
        self.text, self.dropped, self._counted = self.text[keep_from:], self.dropped + keep_from, 0
        block = next(self.blocks, None)
        if block is None:
            self.eof = True
            return False
        self.text += block
        return True

    def line_at(self, pos: int) -> int:
        """Line number (from 1) of text[pos]; positions must be asked in increasing order."""
        self._line += self.text.count("\n", self._counted, pos)
        self._counted = pos
        return self._line

    def column_at(self, pos: int) -> int:
        newline = self.text.rfind("\n", 0, pos)
        return pos - newline if newline >= 0 else self._column0 + pos + 1


_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array_rows(file: Path) -> Iterator[tuple[int, dict[str, Any] | _BadRow]]:
    """The elements of a file holding one JSON array, streamed: only the unread rest of the last
    block and the element being read are in memory, even when the whole array is one line."""
    window = _TextWindow(_utf8_blocks(file))
    window.more(0)
    window.text = window.text.removeprefix("\ufeff")
    decoder = json.JSONDecoder()
    pos, elements = _next_token(window, 0) + 1, 0  # past the '[' that _first_byte saw
    while True:
        pos = _next_token(window, pos)
        if pos >= 0 and window.text[pos] == "]":  # the end (a ']' right after a ',' is decoded, and fails)
            break
        if pos >= 0 and elements:
            if window.text[pos] != ",":
                raise _BadFile(f"line {window.line_at(pos)}", f"not valid JSON: expected ',' or ']' after element "
                               f"{elements} of the array (column {window.column_at(pos)})")
            pos = _next_token(window, pos + 1)
        if pos < 0:
            raise _BadFile(f"line {window.line_at(len(window.text))}", "not valid JSON: the array is not closed with ']'")
        line = window.line_at(pos)
        value, pos = _decode_one(window, decoder, pos)
        elements += 1
        yield line, value if isinstance(value, dict) else _BadRow(f"expected a JSON object, got {_json_kind(value)}")
    after = _next_token(window, pos + 1)
    if after >= 0:
        raise _BadFile(f"line {window.line_at(after)}",
                       f"not valid JSON: text after the closing ']' (column {window.column_at(after)})")


def _next_token(window: _TextWindow, pos: int) -> int:
    """Index of the next non-space character at or after pos (reading more as needed), or -1 at the end."""
    while True:
        pos = _SPACE.match(window.text, pos).end()
        if pos < len(window.text):
            return pos
        if not window.more(pos):
            return -1
        pos = 0


def _decode_one(window: _TextWindow, decoder: json.JSONDecoder, pos: int) -> tuple[Any, int]:
    """One JSON value starting at window.text[pos]. A value cut by the end of the window fails to
    parse, so on failure the window grows; an error that more text does not move is a real one."""
    last = None
    while True:
        try:
            return decoder.raw_decode(window.text, pos)
        except json.JSONDecodeError as exc:
            error = (window.dropped + exc.pos, exc.msg)
            if window.eof or (error == last and not exc.msg.startswith("Unterminated string")):
                raise _BadFile(f"line {window.line_at(exc.pos)}",
                               f"not valid JSON: {exc.msg} (column {window.column_at(exc.pos)})") from None
            last = error
            window.more(pos)  # keeps text[pos:] (the value so far) and appends the next block
            pos = 0


def _csv_rows(file: Path) -> Iterator[tuple[int, dict[str, str] | _BadRow]]:
    limit = csv.field_size_limit(2**31 - 1)  # the default (128 KiB a cell) is smaller than some answers
    reader = None
    try:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                return
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise _BadFile("line 1", f"column name(s) {', '.join(repr(r) for r in repeated)} repeated in the header")
            start = reader.line_num + 1
            for record in reader:
                if record:  # blank lines are skipped, as pandas does
                    yield start, (dict(zip(header, record)) if len(record) == len(header)
                                  else _BadRow(f"{len(record)} fields, but the header has {len(header)}"))
                start = reader.line_num + 1
    except UnicodeDecodeError:
        for _ in _utf8_blocks(file):  # finds the line of the first byte that is not UTF-8
            pass
        raise _BadFile("", "not UTF-8 text; save the file as UTF-8") from None
    except csv.Error as exc:
        raise _BadFile(f"line {reader.line_num if reader else 1}", f"not valid CSV: {exc}") from None
    finally:
        csv.field_size_limit(limit)


def _parquet_rows(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=1024)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise _BadFile("", f"not a readable parquet file ({_first_line(exc)})") from None
    number = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # a damaged row group
            raise _BadFile(f"row {number + 1}", f"cannot be read ({_first_line(exc)})") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            number += 1
            yield number, row


# ---------------------------------------------------------------------------------------------
# what a source holds, for the phase config digest
# ---------------------------------------------------------------------------------------------

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Per (file, size, mtime_ns) or (hub id, revision): every phase digest asks again, within one process.
_FINGERPRINTS: dict[tuple[Any, ...], dict[str, Any]] = {}


def source_fingerprint(src: DatasetSource) -> dict[str, Any]:
    """What a source holds. A local or builtin file: {"kind": "file", "size", "sha256"} of its
    bytes (the recipe takes single files, no folders or globs). A hub dataset: {"kind": "hub", "id",
    "revision": the commit if it can be found (the hub, or the local hub cache when offline), else
    the recipe's revision, "resolved": whether it is a commit}. Cached within the process."""
    if src.path is not None:
        return _file_fingerprint(_local_file(src), src.describe())
    return _hub_fingerprint(str(src.hub), src.revision)


def _file_fingerprint(file: Path, name: str) -> dict[str, Any]:
    try:
        stat = file.stat()
        key = ("file", str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _FINGERPRINTS:
            _FINGERPRINTS[key] = {"kind": "file", "size": stat.st_size, "sha256": file_sha256(file, _CHUNK)}
    except OSError as exc:
        raise DataError(f"{name}: cannot read: {exc.strerror}") from None
    return dict(_FINGERPRINTS[key])


def _hub_fingerprint(repo_id: str, revision: str | None) -> dict[str, Any]:
    key = ("hub", repo_id, revision)
    if key not in _FINGERPRINTS:
        commit = _hub_commit(repo_id, revision)
        _FINGERPRINTS[key] = {"kind": "hub", "id": repo_id, "revision": commit or revision, "resolved": commit is not None}
    return dict(_FINGERPRINTS[key])


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub dataset's revision (default: main) names: a commit id as written, else the
    hub's answer (not asked offline), else the ref the hub cache recorded at the last download."""
    if revision is not None and _COMMIT.match(revision):
        return revision
    from huggingface_hub import constants

    if not _hub_offline():
        try:
            from huggingface_hub import HfApi

            sha = HfApi().dataset_info(repo_id, revision=revision, timeout=10).sha
            if sha and _COMMIT.match(sha):
                return sha
        except Exception:  # unreachable, gated or unknown: the cache may still know
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        sha = ref.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return sha if _COMMIT.match(sha) else None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    hub = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    return bool(hub) or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


# ---------------------------------------------------------------------------------------------
# prompts (generative replay) and tokenized data
# ---------------------------------------------------------------------------------------------


def to_prompt(row: dict[str, Any], src: DatasetSource, where: str) -> list[dict[str, str]]:
    """Only the prompt side of a row (generative replay answers it): alpaca instruction (+ input),
    the chat turns before the last assistant answer, or the mapped prompt column."""
    try:
        return _prompt(row, src)
    except _RowError as exc:
        raise DataError(f"{where}: {exc}") from None


def _prompt(row: dict[str, Any], src: DatasetSource) -> list[dict[str, str]]:
    if src.format == "alpaca":
        instruction, extra = _text(row, "instruction"), row.get("input") or ""
        return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}]
    if src.format == "messages":
        turns = row.get(src.messages_column)
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
            turns = turns[:-1]
        if not isinstance(turns, list) or not turns:
            raise _RowError(f"column '{src.messages_column}': expected a non-empty chat list")
        return _chat_turns(turns, src.messages_column)
    assert src.columns is not None
    return [{"role": "user", "content": _text(row, src.columns.prompt)}]


def _prompt_example(row: dict[str, Any], src: DatasetSource) -> dict[str, Any]:
    language = src.language if src.language is not None else _text(row, str(src.language_column))
    return {"prompt": _prompt(row, src), "language": language}


def load_prompts(src: DatasetSource, where: str, seed: int) -> list[dict[str, Any]]:
    """Prompts of a source in a seeded order, each with its language tag."""
    raw = _load_raw(src, where, streaming=False)
    missing = [c for c in prompt_columns(src) if c not in raw.column_names]
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
        try:
            out.append(_prompt_example(raw[i], src))
        except _RowError as exc:
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
