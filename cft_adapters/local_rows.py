"""Local data files read row by row, streamed, each row with where it is (line or row number).

JSON Lines, a JSON array, CSV and parquet. A row that cannot be read comes back as a BadRow (why),
and reading goes on; a file whose rest cannot be read raises BadFile. data.check_data uses this to
name every bad row of a file before any training.
"""

from __future__ import annotations

import codecs
import csv
import json
import json.scanner
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any


_CHUNK = 1 << 20
_NL = b"\n"


class BadRow(str):
    """Why a row could not be read; it stands in for the row, and reading goes on."""


class BadFile(Exception):
    """(where, why): the rest of the file cannot be read (a broken JSON array, CSV or parquet file)."""


def local_rows(file: Path) -> tuple[str, Iterator[tuple[int, dict[str, Any] | BadRow]]]:
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


def _json_lines_rows(file: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    # The C scanner that json.loads runs, called directly: json.loads' own Python layers cost a third
    # of the time on a large file. Anything the fast path does not accept goes through json.loads.
    scan = json.scanner.make_scanner(json.JSONDecoder())
    with file.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, BadRow(_not_utf8(raw[exc.start], exc.start + 1))
                continue
            try:
                row, end = scan(text, 0)
                if end != len(text) and not text[end:].isspace():
                    raise ValueError
            except (StopIteration, ValueError):
                row = _json_line(text, raw, number, file)
                if row is None:
                    continue
            if isinstance(row, dict) or type(row) is BadRow:
                yield number, row
            else:
                yield number, BadRow(f"expected a JSON object, got {_json_kind(row)}")


def _json_line(text: str, raw: bytes, number: int, file: Path) -> Any:
    """One line through json.loads: its value, None for a blank line, or why it is not JSON."""
    try:
        return json.loads(text.removeprefix("\ufeff") if number == 1 else text)
    except json.JSONDecodeError as exc:
        if not text.strip():  # blank lines are skipped, as datasets does
            return None
        column = min(exc.pos, len(raw.rstrip(b"\r\n"))) + 1  # not past the line's end
        hint = "; a .json file holds one JSON object per line, or one JSON array of objects" if file.suffix == ".json" else ""
        return BadRow(f"not valid JSON: {exc.msg} (column {column}){hint}")


def _not_utf8(byte: int, column: int) -> str:
    return f"not UTF-8 text (byte 0x{byte:02x} at column {column}); save the file as UTF-8"


def _json_kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _utf8_blocks(file: Path) -> Iterator[str]:
    """The text of a file in blocks of about 1 MiB. A byte that is not UTF-8 ends it with a
    BadFile naming its line and column."""
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
                raise BadFile(f"line {line + data.count(_NL, 0, start)}", _not_utf8(data[start], at)) from None
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


def _json_array_rows(file: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
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
                raise BadFile(f"line {window.line_at(pos)}", f"not valid JSON: expected ',' or ']' after element "
                               f"{elements} of the array (column {window.column_at(pos)})")
            pos = _next_token(window, pos + 1)
        if pos < 0:
            raise BadFile(f"line {window.line_at(len(window.text))}", "not valid JSON: the array is not closed with ']'")
        line = window.line_at(pos)
        value, pos = _decode_one(window, decoder, pos)
        elements += 1
        yield line, value if isinstance(value, dict) else BadRow(f"expected a JSON object, got {_json_kind(value)}")
    after = _next_token(window, pos + 1)
    if after >= 0:
        raise BadFile(f"line {window.line_at(after)}",
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
                raise BadFile(f"line {window.line_at(exc.pos)}",
                               f"not valid JSON: {exc.msg} (column {window.column_at(exc.pos)})") from None
            last = error
            window.more(pos)  # keeps text[pos:] (the value so far) and appends the next block
            pos = 0


def _csv_rows(file: Path) -> Iterator[tuple[int, dict[str, str] | BadRow]]:
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
                raise BadFile("line 1", f"column name(s) {', '.join(repr(r) for r in repeated)} repeated in the header")
            start = reader.line_num + 1
            for record in reader:
                if record:  # blank lines are skipped, as pandas does
                    yield start, (dict(zip(header, record)) if len(record) == len(header)
                                  else BadRow(f"{len(record)} fields, but the header has {len(header)}"))
                start = reader.line_num + 1
    except UnicodeDecodeError:
        for _ in _utf8_blocks(file):  # finds the line of the first byte that is not UTF-8
            pass
        raise BadFile("", "not UTF-8 text; save the file as UTF-8") from None
    except csv.Error as exc:
        raise BadFile(f"line {reader.line_num if reader else 1}", f"not valid CSV: {exc}") from None
    finally:
        csv.field_size_limit(limit)


def _parquet_rows(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=1024)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise BadFile("", f"not a readable parquet file ({first_line(exc)})") from None
    number = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # a damaged row group
            raise BadFile(f"row {number + 1}", f"cannot be read ({first_line(exc)})") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            number += 1
            yield number, row


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
