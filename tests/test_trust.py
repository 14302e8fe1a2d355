"""A run directory may come from someone else: cft-eval and cft-analyze drift check what its run.json
and recipe.resolved.yaml say before using it, and never write outside it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from cft_adapters.cli import analyze_main, eval_main
from cft_adapters.errors import CftError
from cft_adapters.rundir import inside

EVAL_ARGS = ["--tasks", "cft_smoke_en_mc", "--limit", "2"]


def _copy(smoke_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, symlinks=True)
    return run


def _edit_manifest(run: Path, position: int, **fields) -> None:
    data = json.loads((run / "run.json").read_text())
    data["phases"][position].update(fields)
    (run / "run.json").write_text(json.dumps(data, indent=2))


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file, folder and link under `root` (links not followed), with size and mtime."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _refused(capsys, code: int, expected: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [expected]


def _cli(command: str, run: Path, *extra: str) -> int:
    if command == "eval":
        return eval_main([str(run), *EVAL_ARGS, *extra])
    return analyze_main(["drift", str(run), *extra])


def test_inside_resolves_and_refuses_what_leaves_the_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "phase_1_a").mkdir(parents=True)
    assert inside(run, run / "phase_1_a" / "eval") == (run / "phase_1_a" / "eval").resolve()
    for escape in (run / "x" / ".." / ".." / "b", run / "/etc/passwd", tmp_path / "run2" / "f"):  # run2: a shared prefix
        with pytest.raises(CftError, match="outside the run directory"):
            inside(run, escape)
    (run / "link").symlink_to(tmp_path)
    with pytest.raises(CftError, match="outside the run directory"):
        inside(run, run / "link" / "f")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "drift"])
@pytest.mark.parametrize("name", ["x/../../escaped", "..", "French"])
def test_crafted_phase_name_is_refused_before_anything_is_written(
    smoke_run: Path, tmp_path: Path, capsys, command: str, name: str
) -> None:
    run = _copy(smoke_run, tmp_path)
    _edit_manifest(run, 2, name=name)
    before = _snapshot(tmp_path)
    _refused(capsys, _cli(command, run),
             f"{run}/run.json: phases[2].name: {name!r} is not a valid phase name (lowercase letters, digits, '_' or '-')")
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_phase_index_must_match_its_position(smoke_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy(smoke_run, tmp_path)
    _edit_manifest(run, 1, index=7)
    _refused(capsys, _cli("eval", run), f"{run}/run.json: phases[1].index: expected 1, got 7")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "drift"])
def test_checkpoint_outside_the_run_dir_is_not_loaded(smoke_run: Path, tmp_path: Path, capsys, command: str) -> None:
    run = _copy(smoke_run, tmp_path)
    shutil.copytree(run / "phase_1_english" / "adapter", tmp_path / "elsewhere" / "adapter")
    _edit_manifest(run, 1, checkpoint="../elsewhere/adapter")
    before = _snapshot(tmp_path)
    _refused(capsys, _cli(command, run),
             f"{run}/run.json: phases[1].checkpoint: '../elsewhere/adapter': resolves to "
             f"{(tmp_path / 'elsewhere' / 'adapter').resolve()}, outside the run directory {run.resolve()}")
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_checkpoint_symlinked_out_of_the_run_dir_is_not_loaded(smoke_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy(smoke_run, tmp_path)
    shutil.move(run / "phase_2_french_german" / "adapter", tmp_path / "elsewhere")
    (run / "phase_2_french_german" / "adapter").symlink_to(tmp_path / "elsewhere")
    _refused(capsys, _cli("drift", run),
             f"{run}/run.json: phases[2].checkpoint: 'phase_2_french_german/adapter': resolves to "
             f"{(tmp_path / 'elsewhere').resolve()}, outside the run directory {run.resolve()}")


@pytest.mark.slow
def test_cft_eval_does_not_write_through_a_symlinked_eval_folder(smoke_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy(smoke_run, tmp_path)
    shutil.rmtree(run / "phase_1_english" / "eval")
    (tmp_path / "outside").mkdir()
    (run / "phase_1_english" / "eval").symlink_to(tmp_path / "outside")
    before = _snapshot(tmp_path)
    _refused(capsys, _cli("eval", run), f"{run}/phase_1_english/eval: resolves to {(tmp_path / 'outside').resolve()}, "
             f"outside the run directory {run.resolve()}")
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_drift_does_not_write_through_a_symlinked_analysis_folder(smoke_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy(smoke_run, tmp_path)
    (tmp_path / "outside").mkdir()
    (run / "analysis").symlink_to(tmp_path / "outside")
    before = _snapshot(tmp_path)
    _refused(capsys, _cli("drift", run), f"{run}/analysis/drift.json: resolves to "
             f"{(tmp_path / 'outside' / 'drift.json').resolve()}, outside the run directory {run.resolve()}")
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "drift"])
def test_trust_remote_code_from_a_run_dir_needs_the_flag(smoke_run: Path, tmp_path: Path, capsys, command: str) -> None:
    run = _copy(smoke_run, tmp_path)
    resolved = run / "recipe.resolved.yaml"
    recipe = yaml.safe_load(resolved.read_text())
    recipe["model"]["trust_remote_code"] = True
    resolved.write_text(yaml.safe_dump(recipe))
    before = _snapshot(tmp_path)
    _refused(capsys, _cli(command, run),
             f"{resolved}: model.trust_remote_code is true; this run directory asks to run code from the model "
             f"repository. Pass --trust-remote-code to allow it.")
    assert _snapshot(tmp_path) == before

    # With the flag the user allows it (the builtin tiny model has no code of its own to run).
    extra = ["--phases", "0"] if command == "eval" else []
    assert _cli(command, run, "--trust-remote-code", *extra) == 0, capsys.readouterr().err
    written = {p for p in set(_snapshot(tmp_path)) - set(before)}
    assert written and all(p.startswith("run/") for p in written)


def test_a_dry_run_never_runs_the_model_repositorys_code(tmp_path, capsys) -> None:
    """A dry run is how a recipe from elsewhere is vetted: even with trust_remote_code: true, the
    model folder's own Python (an AutoConfig in auto_map) is not imported."""
    import json

    from cft_adapters.cli import main

    model = tmp_path / "model"
    model.mkdir()
    marker = tmp_path / "ran"
    (model / "config.json").write_text(json.dumps({"model_type": "cft_test_remote", "num_hidden_layers": 4,
                                                   "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    (model / "configuration_x.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\nclass XConfig(PretrainedConfig):\n    model_type = 'cft_test_remote'\n")
    from conftest import SMOKE

    code = main([str(SMOKE), f"output_dir={tmp_path / 'o'}", f"model.name_or_path={model}", "model.trust_remote_code=true",
                 "--dry-run"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert "a dry run does not run the model repository's code" in out
    assert not marker.exists()
