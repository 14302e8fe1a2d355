"""A recipe's own evaluation tasks, in a folder outside the package (eval.include_path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cft_adapters.cli import eval_main, main
from cft_adapters.errors import CftError
from cft_adapters.manifest import RunManifest
from cft_adapters.recipe import load_recipe
from cft_adapters.tasks_path import use_include_paths

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "smoke_my_tasks.yaml"


@pytest.fixture(autouse=True)
def _reset_include_paths():
    yield
    use_include_paths([])


def test_a_task_folder_outside_the_package_is_scored_on_every_phase(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main([str(EXAMPLE), f"output_dir={out}", "training.max_steps=2"]) == 0
    manifest = RunManifest.read(out)
    for record in manifest.phases:
        assert 0 <= record.eval["my_en_mc"]["acc"] <= 1, record.name
        assert "my_en_mc" in record.eval_tasks
    assert "my_en_mc" in (out / "report.md").read_text()
    # cft-eval reads the folder from the run's resolved recipe (an absolute path), from anywhere
    use_include_paths([])
    assert eval_main([str(out), "--tasks", "my_en_mc", "--phases", "1"]) == 0
    assert "my_en_mc" in RunManifest.read(out).phases[1].eval


def test_include_paths_are_relative_to_the_recipe_and_must_exist(tmp_path: Path, capsys) -> None:
    recipe = load_recipe(EXAMPLE)
    assert recipe.eval.include_path == [str(REPO / "docs" / "examples" / "my_tasks")]
    with pytest.raises(CftError, match=r"eval\.include_path: .*no folder at"):
        load_recipe(EXAMPLE, ["eval.include_path=[no_such_folder]"])
    # without the folder the task is unknown, before anything trains
    code = main([str(EXAMPLE), f"output_dir={tmp_path / 'o'}", "eval.include_path=[]", "--dry-run"])
    assert code == 2 and "unknown lm-eval task or group 'my_en_mc'" in capsys.readouterr().err
