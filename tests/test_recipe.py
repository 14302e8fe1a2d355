from __future__ import annotations

import json
from pathlib import Path

import pytest

from cft_adapters.cli import main
from cft_adapters.errors import RecipeError
from cft_adapters.recipe import Recipe, deep_merge, load_recipe, parse_override

from conftest import REPO, SMOKE

# recipes/accelerate/ holds launcher configs, not recipes; the mini-study's recipes live with it.
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if not {"accelerate", "studies"} & set(p.parts)) + sorted(
    (REPO / "benchmarks" / "mini_study").glob("*similar.yaml")
)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.phases


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """\
output_dir: {out}
model: {{name_or_path: "builtin:tiny-mistral"}}
phases:
  - name: english
    datasets: [{{path: "builtin:smoke/en_tasks.jsonl", language: en}}]
"""


def _run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"model.quantisation": "nf4"}, "model.quantisation: unknown key; did you mean 'quantization'?"),
        ({"adapter.r": "sixteen"}, "adapter.r: Input should be a valid integer"),
        ({"training.learning_rate": -1}, "training.learning_rate: Input should be greater than 0, got -1"),
        ({"adapter.dropout": 1.5}, "adapter.dropout: Input should be less than 1, got 1.5"),
        ({"phases[0].datasets[0].path": "missing.jsonl"}, "phases[0].datasets[0].path: file not found:"),
    ],
)
def test_malformed_recipe_names_file_and_key_path(tmp_path, capsys, edit, expected) -> None:
    path = _write(tmp_path, BASE.format(out=tmp_path / "out"))
    overrides = [f"{k}={v}" for k, v in edit.items()]
    code, output = _run_cli(capsys, [str(path), *overrides, "--dry-run"])
    assert code == 2
    assert f"{path}: {expected}" in output
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_all_problems_are_reported_at_once(tmp_path, capsys) -> None:
    text = BASE.format(out=tmp_path / "out") + """\
  - name: english
    datasets: [{path: "builtin:smoke/en_tasks.jsonl"}]
adapter: {r: 0, alpha: -1}
"""
    code, output = _run_cli(capsys, [str(_write(tmp_path, text))])
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2
    assert any("adapter.r:" in line for line in lines)
    assert any("adapter.alpha:" in line for line in lines)
    assert any("phases[1].datasets[0]: set exactly one of 'language' and 'language_column'" in line for line in lines)
    assert any("phases[1].name: duplicate phase name 'english' (also phases[0].name)" in line for line in lines)


def test_field_errors_and_source_rules_reported_together(tmp_path, capsys) -> None:
    text = BASE.format(out=tmp_path / "out").replace(
        '[{path: "builtin:smoke/en_tasks.jsonl", language: en}]',
        '[{path: missing.jsonl, language: en, language_column: lang}]',
    )
    code, output = _run_cli(capsys, [str(_write(tmp_path, text))])
    assert code == 2
    assert "phases[0].datasets[0].path: file not found:" in output
    assert "phases[0].datasets[0]: set exactly one of 'language' and 'language_column'" in output
    assert output.count("set exactly one of") == 1


def test_union_field_error_is_one_line(tmp_path, capsys) -> None:
    path = _write(tmp_path, BASE.format(out=tmp_path / "out"))
    code, output = _run_cli(capsys, [str(path), "phases[0].placement={strategy: explicit, layers: {a: 1}}", "--dry-run"])
    assert code == 2
    assert sum("phases[0].placement.layers:" in line for line in output.splitlines()) == 1


def test_slot_rules_for_placement_and_replay(tmp_path) -> None:
    path = _write(tmp_path, BASE.format(out=tmp_path / "out"))
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, ["phases[0].placement={strategy: explicit}", "phases[0].replay={kind: generative, ratio: 0.05}"])
    text = str(exc.value)
    assert "phases[0].placement: strategy 'explicit' needs 'layers'" in text
    assert "phases[0].replay: kind 'generative' needs exactly one of 'prompts'" in text


def test_split_on_local_file_is_refused(tmp_path) -> None:
    path = _write(tmp_path, BASE.format(out=tmp_path / "out"))
    with pytest.raises(RecipeError, match=r"phases\[0\]\.datasets\[0\]: 'split' apply to 'hub' sources only"):
        load_recipe(path, ["phases[0].datasets[0].split=test"])


def test_revision_on_builtin_model_is_refused(tmp_path) -> None:
    path = _write(tmp_path, BASE.format(out=tmp_path / "out"))
    with pytest.raises(RecipeError, match="model: 'revision' applies to hub models"):
        load_recipe(path, ["model.revision=main"])


def test_extends_resolves_each_files_paths_against_its_own_folder(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    _write(tmp_path, BASE.format(out=tmp_path / "out").replace('"builtin:smoke/en_tasks.jsonl"', "data/a.jsonl"), "base.yaml")
    (tmp_path / "variants").mkdir()
    child = _write(tmp_path / "variants", "extends: ../base.yaml\ntraining: {learning_rate: 1.0e-3}\n", "child.yaml")
    recipe = load_recipe(child)
    assert recipe.phases[0].datasets[0].path == str((tmp_path / "data" / "a.jsonl").resolve())


def test_successful_dry_run_prints_the_plan_and_loads_no_model(tmp_path, capsys, monkeypatch) -> None:
    import cft_adapters.modeling as modeling

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run must not load a model")

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(modeling, "load_base_model", refuse)
    monkeypatch.setattr(modeling, "resolve_model_path", refuse)
    code, output = _run_cli(capsys, [str(SMOKE), f"output_dir={tmp_path / 'out'}", "--dry-run"])
    assert code == 0, output
    assert "phase plan" in output and "french_german" in output and "dry run OK" in output
    assert "cft_smoke_en, cft_smoke_alpacaeval, cft_smoke_ml" in output
    assert not (tmp_path / "out").exists()


def test_overrides_may_follow_flags(tmp_path, capsys) -> None:
    code, output = _run_cli(capsys, [str(SMOKE), "--dry-run", f"output_dir={tmp_path / 'o'}", "training.max_steps=1"])
    assert code == 0, output


def test_cli_subprocess_bad_recipe_exits_2_without_traceback(tmp_path) -> None:
    import subprocess
    import sys

    path = _write(tmp_path, BASE.format(out=tmp_path / "out") + "adapter: {r: zero}\n")
    proc = subprocess.run([sys.executable, "-m", "cft_adapters.cli", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{path}: adapter.r: Input should be a valid integer" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_output_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys) -> None:
    (tmp_path / "taken").write_text("x")
    code, output = _run_cli(capsys, [str(SMOKE), f"output_dir={tmp_path / 'taken'}", "eval.tasks=[]"])
    assert code == 2
    assert f"{SMOKE}: output_dir: " in output and str(tmp_path / "taken") in output  # the key and the path
    assert "Traceback" not in output


def test_duplicate_phase_name(tmp_path, capsys) -> None:
    text = BASE.format(out=tmp_path / "out") + """\
  - name: english
    datasets: [{path: "builtin:smoke/en_tasks.jsonl", language: en}]
"""
    code, output = _run_cli(capsys, [str(_write(tmp_path, text)), "--dry-run"])
    assert code == 2
    assert "phases[1].name: duplicate phase name 'english' (also phases[0].name)" in output


def test_missing_column_fails_at_dry_run(tmp_path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "answer": "hello"}) + "\n")
    text = BASE.format(out=tmp_path / "out").replace('"builtin:smoke/en_tasks.jsonl"', "d.jsonl")
    code, output = _run_cli(capsys, [str(_write(tmp_path, text)), "--dry-run"])
    assert code == 2
    assert "phases[0].datasets[0]:" in output and "missing column 'output' for format 'alpaca'" in output
    assert "(found: instruction, answer)" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.learning_rate", "expected key.path=value"),
        ("phases[0]name=x", "expected key.path=value"),
        ("phases[4].name=x", "phases[4]: index out of range (the list has 1 items)"),
        ("training.learning_rate=[", "value is not valid YAML"),
    ],
)
def test_bad_override_syntax(tmp_path, capsys, override, expected) -> None:
    path = _write(tmp_path, BASE.format(out=tmp_path / "out"))
    code, output = _run_cli(capsys, [str(path), override, "--dry-run"])
    assert code == 2
    assert f"{path}: override '{override}': {expected}" in output


def test_unknown_flag_is_an_error(tmp_path, capsys) -> None:
    path = _write(tmp_path, BASE.format(out=tmp_path / "out"))
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--frobnicate"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_overrides_are_revalidated(tmp_path) -> None:
    path = _write(tmp_path, BASE.format(out=tmp_path / "out"))
    recipe = load_recipe(path, ["training.learning_rate=1e-4", "phases[0].training.max_steps=3"])
    assert recipe.training.learning_rate == pytest.approx(1e-4)
    assert recipe.phase_training(0).max_steps == 3
    assert recipe.phase_training(0).learning_rate == pytest.approx(1e-4)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, ["phases[0].training.max_steps=0"])
    assert "phases[0].training.max_steps: Input should be greater than or equal to 1, got 0" in str(exc.value)


def test_extends_deep_merges_and_merges_phases_by_name(tmp_path) -> None:
    _write(tmp_path, BASE.format(out=tmp_path / "out") + """\
  - name: french
    datasets: [{path: "builtin:smoke/multi_fr_de.jsonl", format: messages, language_column: lang}]
training: {learning_rate: 1.0e-3, max_length: 128}
""", "base.yaml")
    child = _write(tmp_path, """\
extends: base.yaml
training: {learning_rate: 5.0e-4}
phases:
  - name: french
    training: {num_train_epochs: 2}
""", "child.yaml")
    recipe = load_recipe(child)
    assert recipe.training.learning_rate == pytest.approx(5e-4)
    assert recipe.training.max_length == 128
    assert [p.name for p in recipe.phases] == ["english", "french"]
    assert recipe.phase_training(1).num_train_epochs == 2
    assert recipe.phases[1].datasets[0].format == "messages"


def test_extends_cycle_is_reported(tmp_path) -> None:
    _write(tmp_path, "extends: b.yaml\n", "a.yaml")
    _write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(RecipeError, match="extends: cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_default_output_dir_is_runs_stem(tmp_path) -> None:
    text = BASE.format(out="x").replace("output_dir: x\n", "")
    assert load_recipe(_write(tmp_path, text, "my_recipe.yaml")).output_dir == str(Path("runs") / "my_recipe")


def test_schema_export(capsys) -> None:
    assert main(["--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert {"model", "adapter", "training", "eval", "phases"} <= set(schema["properties"])
    for name, model in schema["$defs"].items():
        for field, spec in model.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{field} has no description"


def test_parse_override_types() -> None:
    assert parse_override("phases[1].training.learning_rate=1e-4") == (["phases", 1, "training", "learning_rate"], "1e-4")
    assert parse_override("adapter.target_modules=[q_proj, v_proj]")[1] == ["q_proj", "v_proj"]


def test_deep_merge_replaces_plain_lists() -> None:
    assert deep_merge({"a": [1, 2], "b": {"c": 1}}, {"a": [3], "b": {"d": 2}}) == {"a": [3], "b": {"c": 1, "d": 2}}


def test_smoke_recipe_loads_with_builtin_paths() -> None:
    recipe = load_recipe(SMOKE)
    assert recipe.model.name_or_path == "builtin:tiny-mistral"
    assert recipe.model.trust_remote_code is False



def test_paper_recipe_dry_run_offline_prints_the_plan_and_names_hub_sources(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, output = _run_cli(capsys, [str(REPO / "recipes" / "mistral_dissimilar_lf_h2.yaml"), "--dry-run"])
    assert code == 0, output
    assert "phase plan" in output and "most_changed" in output
    assert "not checked: phases[0].datasets[0]: cannot read Open-Orca/OpenOrca" in output
    assert "hub source(s) that need the network" in output
    assert "cft_en, cft_alpacaeval, cft_ml" in output and "multilingual" in output
    assert "evaluation cost of one checkpoint" in output and "cft_alpacaeval skipped" in output


def test_yaml_merge_key_override_and_aliases_load(tmp_path) -> None:
    """Duplicate keys are refused, but a key after `<<:` overrides the merged one, as YAML intends;
    an alias repeats a mapping without repeating its keys; a UTF-8 byte order mark is fine."""
    text = "\ufeff" + BASE.format(out=tmp_path / "out").replace("[{path", "[&en {path") + """\
  - name: again
    datasets: [*en]
training:
  <<: {learning_rate: 1.0e-3, max_steps: 2}
  max_steps: 5
"""
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe.training.learning_rate == pytest.approx(1e-3)
    assert recipe.training.max_steps == 5
    assert recipe.phases[1].datasets[0] == recipe.phases[0].datasets[0]


def test_a_mixed_baseline_run_s_resolved_recipe_loads_again(tmp_path) -> None:
    """recipe.resolved.yaml lists each phase's (all-null) training overrides: reloading it is no error,
    while a real per-phase setting under mixed_baseline still is."""
    from cft_adapters.recipe import dump_recipe

    recipe = load_recipe(SMOKE, ["mixed_baseline=true"])
    saved = tmp_path / "recipe.resolved.yaml"
    saved.write_text(dump_recipe(recipe), encoding="utf-8")
    assert load_recipe(saved).mixed_baseline is True
    with pytest.raises(RecipeError, match=r"phases\[1\]\.training: not used with mixed_baseline"):
        load_recipe(saved, ["phases[1].training.learning_rate=0.1"])


# The paper's matrix (arXiv 2410.16006, 2026 version): each shipped recipe and the row `cft tables`
# files it under (pair from the recipe's name or mixed_baseline, mitigation from what it does, model
# from the base id). The Instruct pair starts from the vendor's Instruct model and trains one phase.
PAPER_MATRIX = [
    (f"{stem}{suffix}.yaml", model, setting, condition)
    for stem, model in (("mistral", "mistral-7b"), ("llama3", "llama-3-8b"))
    for suffix, setting, condition in (
        ("_similar", "similar", "none"), ("_mixed", "mixed", "none"),
        ("_instruct_dissimilar", "dissimilar", "none"), ("_instruct_dissimilar_gr5", "dissimilar", "GR_5"),
        ("_instruct_dissimilar_gr10", "dissimilar", "GR_10"), ("_instruct_dissimilar_er10", "dissimilar", "ER_10"),
        ("_instruct_dissimilar_lf_h1", "dissimilar", "LF_H1"), ("_instruct_dissimilar_lf_h2", "dissimilar", "LF_H2"),
        ("_instruct_dissimilar_spectrum", "dissimilar", "Spectrum"),
    )
]


@pytest.mark.parametrize(("name", "model", "setting", "condition"), PAPER_MATRIX, ids=[m[0] for m in PAPER_MATRIX])
def test_shipped_paper_matrix_recipe_maps_to_its_paper_row(name: str, model: str, setting: str, condition: str) -> None:
    from cft_adapters.paper_numbers import paper_numbers
    from cft_adapters.paper_tables import RecipeFacts, condition_of, setting_of

    path = REPO / "recipes" / name
    recipe = load_recipe(path)
    assert path.read_text(encoding="utf-8").startswith("#"), "a paper recipe opens with what it reproduces"
    phases = recipe.model_dump(exclude_none=True)["phases"]
    facts = RecipeFacts(description=recipe.description, model=recipe.model, adapter=recipe.adapter, eval=recipe.eval,
                        mixed_baseline=recipe.mixed_baseline, condition=condition_of(phases))
    assert setting_of(facts, path.stem, None, None)[0] == setting
    assert facts.condition == condition
    assert paper_numbers().model_for(recipe.model.name_or_path) == model
    if setting == "dissimilar":  # phase 1 is the vendor's instruction tuning: the Instruct model, one phase
        assert recipe.model.name_or_path.endswith("Instruct-v0.1" if model == "mistral-7b" else "8B-Instruct")
        assert len(recipe.phases) == 1
    if condition == "LF_H2":
        assert recipe.phases[0].placement.reference.tuned == recipe.model.name_or_path


def test_fields_added_later_leave_old_digests_and_keys_alone_while_at_their_default() -> None:
    """Runs, study cells and cached base scores made before a field existed keep their keys: a new
    field at its default is left out of the digest payloads; set, it is part of them."""
    from cft_adapters.reconcile import _without_new_defaults, phase_config_digest

    recipe = load_recipe(SMOKE, ["phases[1].replay={kind: real, ratio: 0.1}"])
    dump = _without_new_defaults(recipe.phases[1].model_dump(mode="json", exclude={"training"}))
    assert "conversations_column" not in dump["datasets"][0] and "translate" not in dump["replay"]
    assert not {"limits", "judge", "include_path"} & set(load_recipe(SMOKE, ["eval.judge=null"]).eval.keyed_dump())
    assert recipe.eval.keyed_dump()["judge"]["model"] == "builtin:tiny-mistral"  # set: keyed
    changed = load_recipe(SMOKE, ["phases[1].replay={kind: real, ratio: 0.1}",
                                  "phases[1].datasets[0].conversations_column=turns"])
    assert phase_config_digest(changed, 2) != phase_config_digest(recipe, 2)
    limited = load_recipe(SMOKE, ["eval.limits={cft_smoke_en: 5}"])
    assert limited.eval.keyed_dump()["limits"] == {"cft_smoke_en": 5}
