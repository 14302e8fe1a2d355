"""`cft <command>`: one entry point over the same code as cft-train, cft-eval, cft-study, cft-analyze."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib.metadata import version

import pytest

from cft_adapters.cli import COMMANDS, cft_main

from conftest import SMOKE


def test_help_lists_every_command(capsys) -> None:
    assert cft_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "eval", "study", "analyze", "tables", "export", "tasks", "fetch", "schema", "validate"):
        assert f"\n  {name} " in out
    assert set(COMMANDS) == {"train", "eval", "study", "analyze", "tables", "export", "tasks", "fetch", "schema", "validate"}


def test_version_and_unknown_commands(capsys) -> None:
    assert cft_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cft {version('cft-adapters')}"
    assert cft_main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert cft_main([]) == 2


def test_schema_and_validate_are_the_train_paths(capsys) -> None:
    assert cft_main(["schema"]) == 0
    assert "phases" in json.loads(capsys.readouterr().out)["properties"]
    assert cft_main(["validate", str(SMOKE)]) == 0
    assert "dry run OK" in capsys.readouterr().out
    assert cft_main(["validate", str(SMOKE), "training.learning_rate=-1"]) == 2
    assert "training.learning_rate" in capsys.readouterr().err


def test_tasks_lists_the_bundled_families(capsys) -> None:
    assert cft_main(["tasks", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"cft_smoke_en", "cft_smoke_ml", "cft_en"} <= set(names)


@pytest.mark.skipif(shutil.which("cft") is None or shutil.which("cft-train") is None, reason="console scripts not installed")
def test_installed_scripts_answer() -> None:
    for cmd in (["cft", "--help"], ["cft-train", "--help"], ["cft-eval", "--help"], ["cft-study", "--help"],
                ["cft-analyze", "--help"]):
        assert subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode == 0, cmd
