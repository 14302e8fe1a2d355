from __future__ import annotations

import json
from pathlib import Path

import pytest

from cft_adapters.data import load_phase_data, preview_source
from cft_adapters.errors import DataError
from cft_adapters.recipe import DatasetSource, PhaseConfig

from conftest import REPO, SMOKE


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _phase(*sources: dict) -> PhaseConfig:
    return PhaseConfig.model_validate({"name": "p", "datasets": list(sources)})


def test_alpaca_with_and_without_input(tmp_path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add.", "input": "2 + 2", "output": "4"},
        {"instruction": "Say hi.", "input": "", "output": "Hi."},
    ])
    data = load_phase_data(_phase({"path": path, "language": "en"}), 0, seed=0)
    rows = sorted(data.dataset, key=lambda r: r["completion"][0]["content"])
    assert rows[0]["prompt"] == [{"role": "user", "content": "Add.\n\n2 + 2"}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "4"}]
    assert rows[1]["prompt"] == [{"role": "user", "content": "Say hi."}]
    assert data.languages == {"en": 2}
    assert data.for_trainer().column_names == ["prompt", "completion"]


def test_messages_with_language_column_and_system_turn(tmp_path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "Sois bref."}, {"role": "user", "content": "Salut ?"},
                      {"role": "assistant", "content": "Salut !"}], "lang": "fr"},
        {"messages": [{"role": "user", "content": "Hallo?"}, {"role": "assistant", "content": "Hallo!"}], "lang": "de"},
    ])
    data = load_phase_data(_phase({"path": path, "format": "messages", "language_column": "lang"}), 0, seed=0)
    assert data.languages == {"de": 1, "fr": 1}
    fr = next(r for r in data.dataset if r["language"] == "fr")
    assert [m["role"] for m in fr["prompt"]] == ["system", "user"]
    assert fr["completion"][0]["content"] == "Salut !"


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_column_mapping_from_csv_and_parquet(tmp_path, suffix) -> None:
    import pandas as pd

    frame = pd.DataFrame({"q": ["Q1", "Q2", "Q3"], "a": ["A1", "A2", "A3"], "l": ["es", "es", "pt"]})
    path = tmp_path / f"d.{suffix}"
    frame.to_csv(path, index=False) if suffix == "csv" else frame.to_parquet(path)
    src = {"path": str(path), "format": "columns", "columns": {"prompt": "q", "response": "a"}, "language_column": "l"}
    data = load_phase_data(_phase(src), 0, seed=0)
    assert data.languages == {"es": 2, "pt": 1}
    assert {r["completion"][0]["content"] for r in data.dataset} == {"A1", "A2", "A3"}


def test_max_examples_fraction_and_seeded_shuffle(tmp_path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)])
    pick = lambda seed, **kw: [r["prompt"][0]["content"] for r in  # noqa: E731
                               load_phase_data(_phase({"path": path, "language": "en", **kw}), 0, seed).dataset]
    assert len(pick(1, max_examples=7)) == 7
    assert len(pick(1, fraction=0.2)) == 10
    assert pick(1, max_examples=7) == pick(1, max_examples=7)
    assert set(pick(1, max_examples=7)) != set(pick(2, max_examples=7))


def test_two_sources_keep_their_language_tags(tmp_path) -> None:
    en = _jsonl(tmp_path / "en.jsonl", [{"instruction": "a", "output": "b"}] * 3)
    es = _jsonl(tmp_path / "es.jsonl", [{"instruction": "c", "output": "d"}] * 2)
    data = load_phase_data(_phase({"path": en, "language": "en"}, {"path": es, "language": "es"}), 0, seed=0)
    assert data.languages == {"en": 3, "es": 2}
    assert [s.examples for s in data.sources] == [3, 2]


def test_empty_dataset_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=r"phases\[0\]\.datasets\[0\]: .*empty"):
        load_phase_data(_phase({"path": str(path), "language": "en"}), 0, seed=0)


def test_wrong_format_messages_last_turn(tmp_path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}])
    src = DatasetSource(path=path, format="messages", language="fr")
    with pytest.raises(DataError, match="the last message must be the assistant's answer"):
        preview_source(src, "phases[1].datasets[0]")


def test_non_text_answer_names_row_and_column(tmp_path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "ok"}, {"instruction": "q", "output": None}])
    with pytest.raises(DataError, match=r"row \d+: column 'output': expected text, got NoneType"):
        load_phase_data(_phase({"path": path, "language": "en"}), 0, seed=0)


def test_preview_counts_local_rows(tmp_path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(12)])
    summary = preview_source(DatasetSource(path=path, language="en", max_examples=5), "phases[0].datasets[0]")
    assert summary.examples == 5
    assert summary.preview[0]["prompt"][0]["content"] == "q0"


def test_hub_source_offline_is_a_clear_error() -> None:
    src = DatasetSource(hub="tatsu-lab/alpaca", language="en")
    with pytest.raises(DataError, match=r"phases\[0\]\.datasets\[0\]: cannot read tatsu-lab/alpaca: .*network"):
        preview_source(src, "phases[0].datasets[0]")


def test_csv_cells_load_as_text_as_they_are_checked(tmp_path) -> None:
    """check_data reads CSV cells as text; loading for training must agree ('4' is an answer, not an int)."""
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\nTwo plus two?,4\nSay nothing.,\n", encoding="utf-8")
    src = DatasetSource(path=str(path), language="en")
    summary = preview_source(src, "phases[0].datasets[0]")
    assert summary.examples == 2
    assert summary.warnings == [f"phases[0].datasets[0]: {path}: 1 row(s) with an empty answer (line 3); "
                                "they are kept, and teach the model to answer with nothing"]
    data = load_phase_data(_phase({"path": str(path), "language": "en"}), 0, seed=0)
    assert sorted(r["completion"][0]["content"] for r in data.dataset) == ["", "4"]


def test_check_data_reads_every_row_and_hands_warnings_to_the_caller(tmp_path) -> None:
    from cft_adapters.data import check_data
    from cft_adapters.recipe import Recipe

    rows = [{"instruction": f"q{i}", "output": "a" if i != 70 else "", "lang": "es" if i % 2 else "pt"} for i in range(101)]
    path = _jsonl(tmp_path / "a.jsonl", rows)
    recipe = Recipe.model_validate({"output_dir": str(tmp_path / "out"), "model": {"name_or_path": "builtin:tiny-mistral"},
                                    "phases": [{"name": "p", "datasets": [{"path": path, "language_column": "lang"}]}]})
    warned: list[str] = []
    found = check_data(recipe, warn=warned.append)
    assert found[0][0].examples == 101
    assert found[0][0].languages == {"pt": 51, "es": 50}
    assert warned == found[0][0].warnings and "(line 71)" in warned[0]


def test_source_fingerprint_of_a_file_is_its_content(tmp_path) -> None:
    import hashlib
    import os

    from cft_adapters.data import source_fingerprint

    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"instruction": "q", "output": "a"}\n' * 40_000)  # > 1 MiB: several read chunks
    src = DatasetSource(path=str(path), language="en")
    expected = {"kind": "file", "size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert source_fingerprint(src) == expected

    # Cached per (path, size, mtime_ns): same size and mtime is not read again ...
    stat = path.stat()
    path.write_bytes(path.read_bytes().replace(b'"q"', b'"Q"'))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source_fingerprint(src) == expected
    # ... a new mtime is.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert source_fingerprint(src)["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() != expected["sha256"]

    builtin = source_fingerprint(DatasetSource(path="builtin:smoke/en_tasks.jsonl", language="en"))
    assert builtin["kind"] == "file" and len(builtin["sha256"]) == 64


def test_source_fingerprint_of_a_hub_dataset_offline(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    from cft_adapters.data import source_fingerprint

    # conftest switches the hub off: nothing is asked, so an unknown dataset stays unresolved.
    assert source_fingerprint(DatasetSource(hub="nobody/fp-unknown", language="en")) == {
        "kind": "hub", "id": "nobody/fp-unknown", "revision": None, "resolved": False}
    assert source_fingerprint(DatasetSource(hub="nobody/fp-unknown", revision="v1", language="en"))["revision"] == "v1"
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert source_fingerprint(DatasetSource(hub="nobody/fp-unknown", revision=commit, language="en")) == {
        "kind": "hub", "id": "nobody/fp-unknown", "revision": commit, "resolved": True}
    # What the hub cache recorded at the last download is used offline.
    refs = tmp_path / "datasets--nobody--fp-cached" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert source_fingerprint(DatasetSource(hub="nobody/fp-cached", language="en")) == {
        "kind": "hub", "id": "nobody/fp-cached", "revision": commit, "resolved": True}


def test_a_sharegpt_file_trains(tmp_path) -> None:
    """ShareGPT rows (conversations of {from, value}; human / gpt / system) train like messages rows."""
    from cft_adapters.cli import main
    from cft_adapters.manifest import RunManifest

    rows = [json.loads(line) for line in (REPO / "cft_adapters" / "data" / "smoke" / "en_tasks.jsonl").read_text().splitlines()]
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps({"conversations": [
        {"from": "system", "value": "You are helpful."},
        {"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]}) + "\n" for r in rows[:16]))
    out = tmp_path / "run"
    assert main([str(SMOKE), f"output_dir={out}", "eval.tasks=[]", "training.max_steps=2",
                 f"phases=[{{name: english, datasets: [{{path: '{data}', format: sharegpt, language: en}}]}}]"]) == 0
    record = RunManifest.read(out).phases[1]
    assert record.status == "done" and record.train.tokens > 0


def test_sharegpt_rows_are_checked_like_messages_rows(tmp_path, capsys) -> None:
    from cft_adapters.cli import main

    bad = {"speaker": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Yo"}],
           "order": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Yo"}]}
    expected = {"speaker": "unknown speaker 'robot'", "order": "the last message must be the assistant's answer"}
    for name, turns in bad.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text(json.dumps({"conversations": turns}) + "\n")
        code = main([str(SMOKE), f"output_dir={tmp_path / 'o'}", "--dry-run",
                     f"phases[0].datasets[0]={{path: '{data}', format: sharegpt, language: en}}"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert expected[name] in err and "column 'conversations'" in err and "line 1" in err
