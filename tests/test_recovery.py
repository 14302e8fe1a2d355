"""What a damaged or changed run directory gets: a verified adapter or a clear refusal, a replay pool
rebuilt under new settings, a record that never claims what did not happen. Through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cft_adapters.cli import main
from cft_adapters.manifest import RunManifest

from conftest import REPO, SMOKE

P1, P2 = "phase_1_english", "phase_2_french_german"


def _copy(smoke_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    return run


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_a_finished_adapter_that_was_altered_is_refused(smoke_run, tmp_path, capsys) -> None:
    run = _copy(smoke_run, tmp_path)
    path = run / P1 / "adapter" / "adapter_model.safetensors"
    save_file({k: v * 50 for k, v in load_file(str(path)).items()}, str(path))
    before = (run / "run.json").read_bytes()
    assert main([str(SMOKE), f"output_dir={run}"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"phase 1 'english': its adapter {path} was changed after it was saved" in line
    assert (run / "run.json").read_bytes() == before


@pytest.mark.slow
def test_a_deleted_finished_adapter_is_refused(smoke_run, tmp_path, capsys) -> None:
    run = _copy(smoke_run, tmp_path)
    (run / P1 / "adapter" / "adapter_model.safetensors").unlink()
    assert main([str(SMOKE), f"output_dir={run}", "eval.tasks=[]"]) == 1
    assert "phase 1 'english': its adapter file" in _one_line(capsys.readouterr().err)


@pytest.mark.slow
def test_changed_eval_settings_are_refused_not_recorded(smoke_run, tmp_path, capsys) -> None:
    run = _copy(smoke_run, tmp_path)
    before = {name: (run / name).read_bytes() for name in ("run.json", "recipe.resolved.yaml", "report.md")}
    assert main([str(SMOKE), f"output_dir={run}", "eval.limit=2"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "eval.limit: None -> 2" in line and f"cft-eval {run}" in line
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing claims the new limit
    assert main([str(SMOKE), f"output_dir={run}"]) == 0  # the run's own settings still work


@pytest.mark.slow
def test_a_data_file_edited_in_place_is_another_phase(tmp_path, capsys) -> None:
    data = tmp_path / "fr_de.jsonl"
    shutil.copy(REPO / "cft_adapters/data/smoke/multi_fr_de.jsonl", data)
    run = tmp_path / "run"
    args = [str(SMOKE), f"output_dir={run}", "eval.tasks=[]", f"phases[1].datasets[0].path={data}"]
    assert main(args) == 0
    rows = data.read_text(encoding="utf-8").splitlines()
    row = json.loads(rows[0])
    row["messages"][-1]["content"] += " (corrigé)"
    data.write_text("\n".join([json.dumps(row, ensure_ascii=False), *rows[1:]]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(args) == 1
    line = _one_line(capsys.readouterr().err)
    assert "phase 2 'french_german' is finished there with a different recipe" in line
    assert "the content of a data file it reads has changed" in line


@pytest.mark.slow
def test_a_damaged_run_json_names_the_field_and_deleting_it_recovers(smoke_run, tmp_path, capsys) -> None:
    run = _copy(smoke_run, tmp_path)
    manifest = json.loads((run / "run.json").read_text())
    manifest["phases"][1]["status"] = "finished-ish"
    (run / "run.json").write_text(json.dumps(manifest))
    assert main([str(SMOKE), f"output_dir={run}", "eval.tasks=[]"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "run.json: phases[1].status" in line and "Move it aside and re-run" in line

    (run / "run.json").write_text("{not json")
    assert main([str(SMOKE), f"output_dir={run}", "eval.tasks=[]"]) == 1
    assert "run.json: Invalid JSON" in _one_line(capsys.readouterr().err)

    stamps = {p: (run / p / "adapter/adapter_model.safetensors").stat().st_mtime_ns for p in (P1, P2)}
    (run / "run.json").unlink()
    assert main([str(SMOKE), f"output_dir={run}", "eval.tasks=[]"]) == 0
    assert " ".join(capsys.readouterr().out.split()).count("adapter was already saved; recorded as done") == 2
    recovered, original = RunManifest.read(run), RunManifest.read(smoke_run)
    assert all(p.status == "done" for p in recovered.phases)
    assert stamps == {p: (run / p / "adapter/adapter_model.safetensors").stat().st_mtime_ns for p in (P1, P2)}
    # what run.json said of each phase's data came back from its record.json (the report's seen languages)
    assert [p.data for p in recovered.phases[1:]] == [p.data for p in original.phases[1:]]
    assert recovered.phases[2].data["languages"]


@pytest.mark.slow
def test_a_crafted_phase_name_in_run_json_is_refused(smoke_run, tmp_path, capsys) -> None:
    run = _copy(smoke_run, tmp_path)
    manifest = json.loads((run / "run.json").read_text())
    manifest["phases"][2]["name"] = "../../escaped"
    (run / "run.json").write_text(json.dumps(manifest))
    assert main([str(SMOKE), f"output_dir={run}"]) == 1
    assert "run.json: phases[2].name" in _one_line(capsys.readouterr().err)
    assert not (tmp_path.parent / "escaped").exists()


@pytest.mark.slow
def test_written_files_follow_the_umask(smoke_run) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for name in ("run.json", "recipe.resolved.yaml", f"{P1}/train.json", f"{P1}/adapter/adapter_model.safetensors"):
        assert (smoke_run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert (smoke_run / P1 / "adapter").stat().st_mode & 0o777 == 0o777 & ~mask


def _fault(point: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tests/fault_inject.py"), point, *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.slow
def test_a_stale_replay_pool_is_moved_aside_when_the_replay_settings_change(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    gr5 = [str(SMOKE.parent / "smoke_gr5.yaml"), f"output_dir={run}", "eval.tasks=[]"]
    assert _fault("checkpoint:2:8", gr5).returncode == -9
    old_pool = (run / P2 / "replay.jsonl").read_text()
    assert len(old_pool.splitlines()) == 4  # ceil(5% of 64)

    assert main([*gr5, "phases[1].replay.ratio=0.1"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "settings changed; what its unfinished attempt left was moved to" in out
    aside = list((run / P2).glob("stale-*"))
    assert len(aside) == 1 and (aside[0] / "replay.jsonl").read_text() == old_pool
    assert (aside[0] / "trainer" / "checkpoint-8").is_dir()  # moved, not deleted
    record = RunManifest.read(run).phases[2]
    assert record.replay["pool_examples"] == 7 and record.replay["pool_reused"] is False  # ceil(10% of 64)
    assert record.train.resumed_from is None


@pytest.mark.slow
def test_a_replay_pool_that_cannot_be_read_back_is_moved_aside_and_rebuilt(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    gr5 = [str(SMOKE.parent / "smoke_gr5.yaml"), f"output_dir={run}", "eval.tasks=[]"]
    assert _fault("checkpoint:2:8", gr5).returncode == -9
    pool = run / P2 / "replay.jsonl"
    cut = pool.read_text()[:-20]  # a pool cut short
    pool.write_text(cut)
    assert main(gr5) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "cannot be read back" in out and "line 4: not valid JSON" in out and "moved aside" in out
    [aside] = (run / P2).glob("replay.jsonl.damaged-*")
    assert aside.read_text() == cut  # kept, not deleted
    record = RunManifest.read(run).phases[2]
    assert record.status == "done" and record.replay["pool_reused"] is False and record.replay["pool_examples"] == 4


@pytest.mark.slow
def test_a_replay_pool_built_for_another_adapter_is_not_reused(tmp_path, capsys) -> None:
    """The same phase-2 settings, but phase 1 (the model that answers) was retrained differently."""
    run = tmp_path / "run"
    gr5 = [str(SMOKE.parent / "smoke_gr5.yaml"), f"output_dir={run}", "eval.tasks=[]"]
    assert _fault("checkpoint:2:8", gr5).returncode == -9
    meta = json.loads((run / P2 / "replay_meta.json").read_text())
    meta["key"]["answering_adapter"] = "0" * 64
    (run / P2 / "replay_meta.json").write_text(json.dumps(meta))
    assert main(gr5) == 0
    assert "was built under other settings; moved aside" in " ".join(capsys.readouterr().out.split())
    assert list((run / P2).glob("replay.jsonl.stale-*"))
    assert RunManifest.read(run).phases[2].replay["pool_reused"] is False


@pytest.mark.slow
def test_disk_full_fails_the_phase_in_one_line_and_the_rerun_finishes(tmp_path) -> None:
    run = tmp_path / "run"
    args = [str(SMOKE), f"output_dir={run}", "eval.tasks=[]"]
    done = _fault("enospc:2:16", args)
    assert done.returncode == 1, done.stderr[-2000:]
    line = _one_line(done.stderr)
    assert "phase 2 'french_german'" in line and "checkpoint-16/optimizer.pt: No space left on device" in line
    record = RunManifest.read(run).phases[2]
    assert record.status == "failed" and "No space left on device" in record.error
    assert main(args) == 0
    assert RunManifest.read(run).phases[2].train.resumed_from.endswith("checkpoint-8")


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_passed_over(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    args = [str(SMOKE), f"output_dir={run}", "eval.tasks=[]"]
    assert _fault("checkpoint:1:16", args).returncode == -9
    trainer = run / P1 / "trainer"
    (trainer / "checkpoint-16" / "optimizer.pt").write_bytes(b"garbage")
    ckpt8 = trainer / "checkpoint-8" / "adapter_model.safetensors"
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "checkpoint-16: not resumable, optimizer.pt cannot be loaded" in out
    assert RunManifest.read(run).phases[1].train.resumed_from.endswith("checkpoint-8")
    assert not ckpt8.exists()  # the phase finished: its checkpoints are gone
    damaged = list((run / P1).glob("damaged-checkpoint-16-*"))  # moved out of the trainer's way, kept
    assert len(damaged) == 1 and (damaged[0] / "optimizer.pt").read_bytes() == b"garbage"


@pytest.mark.slow
def test_checkpoints_of_an_unknown_attempt_are_not_resumed_under_new_settings(tmp_path, capsys) -> None:
    """run.json moved aside (as its error message suggests), then the recipe changed: the trainer
    checkpoints on disk carry no settings, so attempt.json decides, and they are set aside."""
    run = tmp_path / "run"
    args = [str(SMOKE), f"output_dir={run}", "eval.tasks=[]"]
    assert _fault("checkpoint:2:8", args).returncode == -9
    (run / "run.json").rename(tmp_path / "run.json.old")
    assert main([*args, "phases[1].training.learning_rate=1e-3"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "what an attempt under other (or unknown) settings left was moved to" in out
    assert RunManifest.read(run).phases[2].train.resumed_from is None
    assert list((run / P2).glob("stale-*/trainer/checkpoint-8"))


@pytest.mark.slow
def test_a_checkpoint_holding_nan_is_never_the_last_good_one(tmp_path) -> None:
    from cft_adapters.rundir import last_good_checkpoint

    run = tmp_path / "run"
    assert _fault("checkpoint:1:16", [str(SMOKE), f"output_dir={run}", "eval.tasks=[]"]).returncode == -9
    trainer = run / P1 / "trainer"
    assert last_good_checkpoint(trainer).endswith("checkpoint-16")
    path = trainer / "checkpoint-16" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(path))
    assert last_good_checkpoint(trainer).endswith("checkpoint-8")


def test_an_unwritable_output_dir_is_one_line(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    # Root ignores permission bits, so the folder is made immutable (root cannot write there either).
    if subprocess.run(["chattr", "+i", str(run)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        assert main([str(SMOKE), f"output_dir={run}"]) == 2
    finally:
        subprocess.run(["chattr", "-i", str(run)], check=True)
    line = _one_line(capsys.readouterr().err)
    assert f"output_dir: the run directory '{run}' is not writable" in line


def test_a_changed_base_moves_its_scores_aside_unless_a_phase_was_finished(tmp_path) -> None:
    """The base's scores are the model section's: another model's are never the new run's phase 0."""
    from rich.console import Console

    from cft_adapters.errors import RunError
    from cft_adapters.manifest import PhaseRecord, RunManifest
    from cft_adapters.recipe import load_recipe
    from cft_adapters.reconcile import base_config_digest, phase_config_digest, phase_records
    from cft_adapters.rundir import RunDirectory

    run = tmp_path / "run"
    before = load_recipe(SMOKE, [f"output_dir={run}"])
    after = load_recipe(SMOKE, [f"output_dir={run}", "model.attn_implementation=eager"])
    assert base_config_digest(before) != base_config_digest(after)
    scores = run / "phase_0_base" / "eval" / "results_x.json"
    scores.parent.mkdir(parents=True)
    scores.write_text("{}")
    base = PhaseRecord(index=0, name="base", status="done", config_digest=base_config_digest(before),
                       eval={"cft_smoke_en_mc": {"acc": 0.5}}, eval_status="done")
    phase_1 = PhaseRecord(index=1, name="english", status="running", config_digest=phase_config_digest(before, 1))
    old = RunManifest(recipe=str(SMOKE), base_model="m", seed=0, versions={}, phases=[base, phase_1])
    console = Console(quiet=True)

    # the same base: its record goes on
    assert phase_records(before, old, RunDirectory(run, console), console)[0] is base
    # a finished phase 1 under the old base: refused, and nothing moved
    finished = old.model_copy(update={"phases": [base, phase_1.model_copy(update={"status": "done"})]})
    with pytest.raises(RunError):
        phase_records(after, finished, RunDirectory(run, console), console)
    assert scores.is_file()
    # nothing finished after it: the old base's scores are moved aside, the new base is to be scored
    records = phase_records(after, old, RunDirectory(run, console), console)
    assert records[0].config_digest == base_config_digest(after)
    assert (records[0].eval, records[0].eval_status) == ({}, "pending")
    assert not scores.exists()
    assert [p.name for p in (run / "phase_0_base").glob("stale-*/eval/results_x.json")] == ["results_x.json"]
