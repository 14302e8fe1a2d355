"""A corpus of bad inputs, each run through the real CLI: exit code 2, one line naming the file, the
key path or the line, and what was expected; no traceback, and nothing trained.

Every case's bad data sits in phase 2 (phase 1's data is fine), so a case that is not caught before
training would train phase 1 first: the real (not dry) runs check that no phase directory appears.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cft_adapters.cli import main

# Line numbers below refer to this text.
BASE = """\
output_dir: {out}
model: {{name_or_path: "builtin:tiny-mistral"}}
training:
  max_steps: 1
  max_length: 64
phases:
  - name: english
    datasets: [{{path: good.jsonl, language: en}}]
  - name: second
    datasets: [{source}]
"""
SOURCE = "{path: d.jsonl, language: en}"
GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


def _lines(rows: list[object]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def _parquet(tmp_path: Path, name: str, columns: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), tmp_path / name)


CASES = [
    # -- the recipe file -----------------------------------------------------------------------
    pytest.param(dict(append=b"description: caf\xe9\n"),
                 ["{recipe}: not UTF-8 text (byte 0xe9 at line 11, column 17)"], id="recipe-latin1"),
    pytest.param(dict(append=b"description: a\x00b\n"),
                 ["{recipe}: not valid YAML (line 11): character #x0000 is not allowed"], id="recipe-nul-byte"),
    pytest.param(dict(append=b"training: {seed: 1}\n"),
                 ["{recipe}: training: key written twice (lines 3 and 11)"], id="duplicate-top-level-key"),
    pytest.param(dict(replace=("  max_steps: 1\n", "  max_steps: 1\n  max_steps: 2\n")),
                 ["{recipe}: training.max_steps: key written twice (lines 4 and 5)"], id="duplicate-nested-key"),
    pytest.param(dict(source="{path: d.jsonl, language: en, language: fr}"),
                 ["{recipe}: phases[1].datasets[0].language: key written twice (both on line 10)"],
                 id="duplicate-key-in-flow-mapping"),
    pytest.param(dict(extends=("  max_steps: 1\n", "  max_steps: 1\n  max_steps: 2\n")),
                 ["{tmp}/parent.yaml: training.max_steps: key written twice (lines 4 and 5)"],
                 id="duplicate-key-in-extended-file"),
    pytest.param(dict(append=b"eval:\n  <<: {batch_size: 1,\n        batch_size: 2}\n"),
                 ["{recipe}: eval.batch_size: key written twice (lines 12 and 13)"], id="duplicate-key-in-merged-mapping"),
    pytest.param(dict(overrides=["training={seed: 1, seed: 2}"]),
                 ["{recipe}: override 'training={seed: 1, seed: 2}': the value writes 'seed' twice"],
                 id="duplicate-key-in-override"),
    pytest.param(dict(overrides=["training.seed=-1"]),
                 ["{recipe}: training.seed: must be in 0 .. 4294967295", "got -1"], id="seed-negative"),
    pytest.param(dict(overrides=[f"training.seed={2**70}"]),
                 ["{recipe}: training.seed: must be in 0 .. 4294967295", f"got {2**70}"], id="seed-too-large"),
    pytest.param(dict(overrides=[f"phases[1].training.seed={2**32}"]),
                 ["{recipe}: phases[1].training.seed: must be in 0 .. 4294967295"], id="phase-seed-too-large"),
    pytest.param(dict(overrides=["training.learning_rate=.inf"]),
                 ["{recipe}: training.learning_rate: Input should be a finite number, got inf"], id="lr-inf"),
    pytest.param(dict(overrides=["training.learning_rate=.nan"]),
                 ["{recipe}: training.learning_rate: Input should be a finite number, got nan"], id="lr-nan"),
    pytest.param(dict(overrides=["phases[0].training.learning_rate=.inf"]),
                 ["{recipe}: phases[0].training.learning_rate: Input should be a finite number, got inf"],
                 id="phase-lr-inf"),
    pytest.param(dict(overrides=["training.warmup_ratio=.nan"]),
                 ["{recipe}: training.warmup_ratio: Input should be a finite number, got nan"], id="warmup-nan"),
    pytest.param(dict(overrides=["training.weight_decay=.inf"]),
                 ["{recipe}: training.weight_decay: Input should be a finite number, got inf"], id="weight-decay-inf"),
    pytest.param(dict(overrides=["training.max_grad_norm=.inf"]),
                 ["{recipe}: training.max_grad_norm: Input should be a finite number, got inf"], id="grad-norm-inf"),
    pytest.param(dict(overrides=["training.num_train_epochs=.inf"]),
                 ["{recipe}: training.num_train_epochs: Input should be a finite number, got inf"], id="epochs-inf"),
    pytest.param(dict(overrides=["phases[1].replay={kind: real, ratio: .nan}"]),
                 ["{recipe}: phases[1].replay.ratio: Input should be a finite number, got nan"], id="replay-ratio-nan"),
    pytest.param(dict(source='{path: "builtin:../recipe.py", language: en}'),
                 ["{recipe}: phases[1].datasets[0].path: 'builtin:../recipe.py' points outside the bundled data folder"],
                 id="builtin-escapes-package"),
    pytest.param(dict(source='{path: "builtin:/etc/hostname", language: en}'),
                 ["{recipe}: phases[1].datasets[0].path: 'builtin:/etc/hostname' points outside the bundled data folder"],
                 id="builtin-absolute"),
    pytest.param(dict(source='{path: "builtin:smoke", language: en}'),
                 ["{recipe}: phases[1].datasets[0].path: expected a .json, .jsonl, .parquet or .csv file, got 'builtin:smoke'"],
                 id="builtin-not-a-data-file"),
    pytest.param(dict(overrides=['phases[1].replay={kind: generative, ratio: 0.1, prompts: {path: "builtin:../../x.jsonl", language: en}}']),
                 ["{recipe}: phases[1].replay.prompts.path: 'builtin:../../x.jsonl' points outside the bundled data folder"],
                 id="builtin-replay-prompts-escapes"),
    # -- paths, nesting and keys that would otherwise have raised or been ignored -------------------
    pytest.param(dict(source='{path: "~nosuchuser_cft/d.jsonl", language: en}'),
                 ["{recipe}: phases[1].datasets[0].path: cannot expand '~nosuchuser_cft': no such user's home directory"],
                 id="path-home-of-no-user"),
    pytest.param(dict(source='{path: "d\\0x.jsonl", language: en}'),
                 ["{recipe}: phases[1].datasets[0].path: a path cannot hold a NUL character"], id="path-nul"),
    pytest.param(dict(overrides=["output_dir=''"]),
                 ["{recipe}: output_dir: expected a folder for the run, got an empty string"], id="output-dir-empty"),
    pytest.param(dict(append=b"description: " + b"[" * 3000 + b"]" * 3000 + b"\n"),
                 ["{recipe}: not a recipe: its values are nested too deeply to read"], id="recipe-nested-too-deeply"),
    pytest.param(dict(overrides=["description=" + "[" * 3000 + "]" * 3000]),
                 ["the value is nested too deeply to read"], id="override-nested-too-deeply"),
    pytest.param(dict(extends=("- name: english", "- name: english"), append=b"phases: [{name: [english], datasets: [{path: good.jsonl, language: en}]}]\n"),
                 ["{recipe}: phases[0].name: Input should be a valid string"], id="extends-phase-name-not-text"),
    pytest.param(dict(overrides=["phases[1].placement={strategy: most_changed, count: 1, reference_phase: [english]}"]),
                 ["{recipe}: phases[1].placement.reference_phase: Input should be a valid string"],
                 id="reference-phase-not-text"),
    pytest.param(dict(overrides=["mixed_baseline=1", "phases[1].training={learning_rate: 0.5}"]),
                 ["{recipe}: phases[1].training: not used with mixed_baseline"], id="mixed-baseline-as-1"),
    pytest.param(dict(overrides=["phases[1].placement={strategy: explicit, layers: '0', fraction: 0.5}"]),
                 ["{recipe}: phases[1].placement: fraction: not used by strategy 'explicit' (it reads layers, modules)"],
                 id="placement-key-the-strategy-ignores"),
    pytest.param(dict(overrides=["phases[1].placement={strategy: random, count: 1, modules: [no_such_proj]}"]),
                 ["{recipe}: phases[1].placement.modules: no_such_proj: not among adapter.target_modules"],
                 id="placement-modules-without-adapters"),
    pytest.param(dict(overrides=["phases[1].replay={kind: real, ratio: 0.1, pool_size: -5}"]),
                 ["{recipe}: phases[1].replay.pool_size: expected 'auto' or a number of examples of at least 1, got -5"],
                 id="replay-pool-size-negative"),
    pytest.param(dict(overrides=["eval.limit=1.5"]),
                 ["{recipe}: eval.limit: expected a whole number of examples or a fraction below 1, got 1.5"],
                 id="eval-limit-not-whole"),
    pytest.param(dict(files={"m.json": b'{"slope": -0.5}'}, overrides=["analysis.forgetting_model=m.json"]),
                 ["{recipe}: analysis.forgetting_model: {dir}/m.json: not a forgetting model"],
                 id="forgetting-model-incomplete"),
    pytest.param(dict(files={"p.jsonl": b'{"text": "Say hi."}\n'}, overrides=["analysis.drift=true", "analysis.drift_probe=p.jsonl"]),
                 ["{recipe}: analysis.drift_probe: {dir}/p.jsonl: expected JSON Lines with a 'prompt' field"],
                 id="drift-probe-without-prompts"),
    pytest.param(dict(overrides=["model.name_or_path=builtin:tiny-mistrall"]),
                 ["{recipe}: model.name_or_path: unknown builtin model 'builtin:tiny-mistrall' (available: builtin:tiny-mistral"],
                 id="builtin-model-typo"),
    pytest.param(dict(overrides=["phases[1].placement={strategy: explicit, layers: '0-700000000'}"]),
                 ["{recipe}: phases[1].placement.layers: layer range '0-700000000' goes past 9,999"],
                 id="layer-range-beyond-any-model"),
    # -- JSON Lines data --------------------------------------------------------------------------
    pytest.param(dict(files={"d.jsonl": _lines([b'{"instruction": "a" "output": "b"}', GOOD])}),
                 ["{recipe}: phases[1].datasets[0]: {dir}/d.jsonl line 1: not valid JSON: Expecting ',' delimiter (column 21)"],
                 id="jsonl-malformed-first-row"),
    pytest.param(dict(files={"d.jsonl": _lines([GOOD] * 39 + [b'{"instruction": "a", "output": "b"'])}),
                 ["{dir}/d.jsonl line 40: not valid JSON: Expecting ',' delimiter (column 35)"], id="jsonl-malformed-late-row"),
    pytest.param(dict(files={"d.jsonl": _lines([GOOD] * 29 + ['{"instruction": "caf\xe9", "output": "b"}'.encode("latin-1")])}),
                 ["{dir}/d.jsonl line 30: not UTF-8 text (byte 0xe9 at column 21)"], id="jsonl-latin1-late-row"),
    pytest.param(dict(files={"d.jsonl": _lines([GOOD] * 4 + [[GOOD]])}),
                 ["{dir}/d.jsonl line 5: expected a JSON object, got an array"], id="jsonl-row-not-an-object"),
    pytest.param(dict(files={"d.jsonl": _lines([GOOD] * 11 + [{"instruction": "q", "answer": "a"}])}),
                 ["{dir}/d.jsonl line 12: missing column 'output' for format 'alpaca' (found: instruction, answer)"],
                 id="jsonl-missing-column-late-row"),
    pytest.param(dict(files={"d.jsonl": _lines([GOOD] * 8 + [{"instruction": "q", "output": 5}])}),
                 ["{dir}/d.jsonl line 9: column 'output': expected text, got int (5)"], id="jsonl-wrong-type"),
    pytest.param(dict(files={"d.jsonl": _lines([GOOD, {"instruction": None, "output": "a"}, GOOD, {"instruction": "q"}])}),
                 ["{dir}/d.jsonl line 2: column 'instruction': expected text, got NoneType",
                  "(and 1 more bad line: line 4)"], id="jsonl-several-bad-rows-one-line"),
    pytest.param(dict(source="{path: d.jsonl, format: messages, language: fr}",
                      files={"d.jsonl": _lines([{"messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "a"}]}] * 3 + [{"messages": []}])}),
                 ["{dir}/d.jsonl line 4: column 'messages': expected a list of at least 2 chat messages, got []"],
                 id="messages-empty"),
    pytest.param(dict(source="{path: d.jsonl, language_column: lang}",
                      files={"d.jsonl": _lines([{**GOOD, "lang": "en"}] * 2 + [{**GOOD, "lang": 3}])}),
                 ["{dir}/d.jsonl line 3: column 'lang': expected text, got int (3)"], id="language-column-not-text"),
    pytest.param(dict(files={"d.jsonl": b"\n  \n"}), ["{dir}/d.jsonl: the dataset is empty"], id="jsonl-empty"),
    # -- a JSON array -------------------------------------------------------------------------------
    pytest.param(dict(source="{path: d.json, language: en}",
                      files={"d.json": b"[\n" + b",\n".join([json.dumps(GOOD).encode()] * 5) + b"\n  {\"output\": }\n]\n"}),
                 ["{dir}/d.json line 7: not valid JSON: expected ',' or ']' after element 5 of the array (column 3)"],
                 id="json-array-missing-comma"),
    pytest.param(dict(source="{path: d.json, language: en}",
                      files={"d.json": b"[\n" + b",\n".join([json.dumps(GOOD).encode()] * 5) + b",\n  {\"output\": }\n]\n"}),
                 ["{dir}/d.json line 7: not valid JSON: Expecting value (column 14)"], id="json-array-malformed-element"),
    pytest.param(dict(source="{path: d.json, language: en}",
                      files={"d.json": b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "\xe9", "output": "b"}\n]'}),
                 ["{dir}/d.json line 3: not UTF-8 text (byte 0xe9 at column 18)"], id="json-array-latin1"),
    pytest.param(dict(source="{path: d.json, language: en}", files={"d.json": b'[{"instruction": "a", "output": "b"},\n'}),
                 ["{dir}/d.json line 2: not valid JSON: the array is not closed with ']'"], id="json-array-not-closed"),
    pytest.param(dict(source="{path: d.json, language: en}", files={"d.json": b'{\n  "rows": []\n}\n'}),
                 ["{dir}/d.json line 1: not valid JSON", "one JSON object per line, or one JSON array of objects"],
                 id="json-single-object"),
    # -- CSV and parquet ----------------------------------------------------------------------------
    pytest.param(dict(source="{path: d.csv, language: en}",
                      files={"d.csv": b"instruction,output\nq,a\nq,a\nq,caf\xe9\n"}),
                 ["{dir}/d.csv line 4: not UTF-8 text (byte 0xe9 at column 6)"], id="csv-latin1"),
    pytest.param(dict(source="{path: d.csv, language: en}",
                      files={"d.csv": b'instruction,output\nq,a\n"multi\nline",a\nq,a,extra\n'}),
                 ["{dir}/d.csv line 5: 3 fields, but the header has 2"], id="csv-extra-field"),
    pytest.param(dict(source="{path: d.csv, language: en}", files={"d.csv": b"instruction,answer\nq,a\n"}),
                 ["{dir}/d.csv line 2: missing column 'output' for format 'alpaca' (found: instruction, answer)"],
                 id="csv-missing-column"),
    pytest.param(dict(source="{path: d.parquet, language: en}", files={"d.parquet": b"PAR1 not really parquet"}),
                 ["{dir}/d.parquet: not a readable parquet file"], id="parquet-corrupt"),
    pytest.param(dict(source="{path: d.parquet, language: en}",
                      parquet={"instruction": ["a", "b", None], "output": ["x", "y", "z"]}),
                 ["{dir}/d.parquet row 3: column 'instruction': expected text, got NoneType"], id="parquet-null-text"),
    # -- replay sources are checked the same way ----------------------------------------------------
    pytest.param(dict(overrides=["phases[1].replay={kind: real, ratio: 0.1, source: {path: d.jsonl, language: en}}"],
                      source="{path: good.jsonl, language: en}",
                      files={"d.jsonl": _lines([GOOD] * 5 + [b"{oops}"])}),
                 ["{recipe}: phases[1].replay.source: {dir}/d.jsonl line 6: not valid JSON"], id="replay-source-bad-row"),
    pytest.param(dict(overrides=["phases[1].replay={kind: generative, ratio: 0.1, prompts: {path: d.jsonl, language: en}}"],
                      source="{path: good.jsonl, language: en}",
                      files={"d.jsonl": _lines([{"instruction": "q"}] * 5 + [{"instruction": ["q"]}])}),
                 ["{recipe}: phases[1].replay.prompts: {dir}/d.jsonl line 6: column 'instruction': expected text, got list"],
                 id="replay-prompts-bad-row"),
]


def _setup(tmp_path: Path, case: dict) -> list[str]:
    (tmp_path / "good.jsonl").write_bytes(_lines([GOOD] * 3))
    (tmp_path / "d.jsonl").write_bytes(_lines([GOOD] * 3))
    for name, data in case.get("files", {}).items():
        (tmp_path / name).write_bytes(data)
    if "parquet" in case:
        _parquet(tmp_path, "d.parquet", case["parquet"])
    text = BASE.format(out=tmp_path / "out", source=case.get("source", SOURCE))
    if "replace" in case:
        text = text.replace(*case["replace"])
    recipe = tmp_path / "r.yaml"
    if "extends" in case:
        (tmp_path / "parent.yaml").write_text(text.replace(*case["extends"]), encoding="utf-8")
        text = "extends: parent.yaml\n"
    recipe.write_bytes(text.encode("utf-8") + case.get("append", b""))
    return [str(recipe), *case.get("overrides", [])]


@pytest.mark.parametrize("mode", ["dry-run", "run"])
@pytest.mark.parametrize(("case", "expected"), CASES)
def test_bad_input_is_one_clear_line(tmp_path, capsys, case, expected, mode) -> None:
    argv = _setup(tmp_path, case)
    code = main([*argv, "--dry-run"] if mode == "dry-run" else [*argv, "eval.tasks=[]"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err
    assert len(lines) == 1, captured.err
    for text in expected:
        for name, value in {"{recipe}": argv[0], "{tmp}": str(tmp_path), "{dir}": str(tmp_path.resolve())}.items():
            text = text.replace(name, value)
        assert text in lines[0]
    assert not list((tmp_path / "out").glob("phase_*")), "a phase ran before the bad input was reported"


def test_problems_in_several_sources_are_reported_together(tmp_path, capsys) -> None:
    argv = _setup(tmp_path, {"source": "{path: d.jsonl, language: en}", "files": {"d.jsonl": _lines([GOOD, b"{"])}})
    (tmp_path / "good.jsonl").write_bytes(_lines([GOOD, {"instruction": 1, "output": "a"}]))
    code = main([*argv, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert [line.split(": ")[1] for line in err.splitlines() if line.strip()] == ["phases[0].datasets[0]", "phases[1].datasets[0]"]
    assert "good.jsonl line 2: column 'instruction': expected text, got int" in err
    assert "d.jsonl line 2: not valid JSON" in err


def test_empty_answers_are_one_warning_per_source(tmp_path, capsys) -> None:
    rows = [GOOD, GOOD, {"instruction": "q", "output": ""}, GOOD, GOOD, GOOD, {"instruction": "q", "output": "  "}]
    argv = _setup(tmp_path, {"files": {"d.jsonl": _lines(rows)}})
    code = main([*argv, "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, captured.err
    assert f"phases[1].datasets[0]: {tmp_path.resolve()}/d.jsonl: 2 row(s) with an empty answer (line 3, line 7)" in warnings[0]
    assert "dry run OK" in captured.out


def test_a_single_line_json_array_larger_than_a_read_block(tmp_path, capsys) -> None:
    """One 3 MiB line: elements and a multi-byte character cross the 1 MiB read blocks; the error
    at its end still names line 1 and the right column."""
    long_answer = "é" * (600 * 1024)  # 1.2 MB of UTF-8 in one string
    elements = [json.dumps({"instruction": "q", "output": long_answer}, ensure_ascii=False)] * 2 + [json.dumps(GOOD)]
    text = "[" + ", ".join(elements) + ", {\"instruction\": \"q\" \"output\": \"a\"}]"
    argv = _setup(tmp_path, {"source": "{path: d.json, language: en}", "files": {"d.json": text.encode("utf-8")}})
    code = main([*argv, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    column = text.rindex('"output"') + 1  # in characters, not bytes
    assert f"{tmp_path.resolve()}/d.json line 1: not valid JSON: Expecting ',' delimiter (column {column})" in err

    (tmp_path / "d.json").write_text(text[: text.rindex(", {")] + "]", encoding="utf-8")
    code = main([*argv, "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err


def test_a_task_yaml_lm_eval_cannot_read_is_one_line_naming_it(tmp_path, capsys) -> None:
    argv = _setup(tmp_path, {})
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "bad.yaml").write_text("task: x\n  bad: : :\n", encoding="utf-8")
    assert main([*argv, f"eval.include_path=[{tasks}]", "eval.tasks=[cft_smoke_en]", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{tasks}/bad.yaml: not a task YAML lm-eval can read (line 2, column 6)" in " ".join(err.split())


def test_tilde_in_paths_is_the_home_directory(tmp_path, monkeypatch) -> None:
    from cft_adapters.recipe import load_recipe

    home = tmp_path / "home"
    home.mkdir()
    (home / "d.jsonl").write_bytes(_lines([GOOD] * 3))
    monkeypatch.setenv("HOME", str(home))
    argv = _setup(tmp_path, {"source": "{path: ~/d.jsonl, language: en}"})
    recipe = load_recipe(argv[0], ["output_dir=~/runs/x"])
    assert recipe.phases[1].datasets[0].path == str(home / "d.jsonl") and recipe.output_dir == str(home / "runs" / "x")
