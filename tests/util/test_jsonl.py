"""The JSON Lines files the package writes itself read back whole, whatever text they hold."""

from __future__ import annotations

import pytest

from cft_adapters.util.jsonl import read_jsonl, write_jsonl


def test_rows_with_unicode_line_separators_read_back_whole(tmp_path) -> None:
    rows = [{"prompt": f"a{sep}b", "answer": f"x {sep} y"} for sep in ("\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c")]
    rows.append({"prompt": "ünïcödé 中文 العربية", "answer": ""})
    path = tmp_path / "replay.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows


def test_a_line_cut_short_names_the_file_and_line(tmp_path) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"pool\.jsonl: line 3: not valid JSON"):
        read_jsonl(path)
