"""cft-study's launchers through submitit: cells as jobs on this machine (local executor, for real:
parallel spans, a dependent cell after its donor, a killed driver resumed without retraining), and
the Slurm path as far as it goes without a cluster (sbatch text, dependency wiring, a clear error)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cft_adapters.cli import study_main
from cft_adapters.study_config import LauncherSettings, load_study

from conftest import SMOKE

pytest.importorskip("submitit")


def _study(tmp: Path, name: str, **extra) -> Path:
    """2 conditions x 2 seeds on the tiny model: 'b' shares 'a''s phase 1 (per seed); the seeds share
    only the base's scores, so a/seed_0 and a/seed_1 can run at the same time."""
    data = {
        "description": "tiny launcher study",
        "output_dir": str(tmp / name),
        "seeds": [0, 1],
        "overrides": ["training.num_train_epochs=1", "eval.limit=4", "phases[0].datasets[0].max_examples=16",
                      "phases[1].datasets[0].max_examples=16"],
        "conditions": [
            {"name": "a", "recipe": str(SMOKE)},
            {"name": "b", "recipe": str(SMOKE), "overrides": [
                "phases[1].datasets[0]={path: 'builtin:mini/dissimilar.jsonl', format: alpaca, language_column: lang, "
                "max_examples: 16}"]},
        ],
        **extra,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _spans(out: Path) -> dict[str, dict]:
    cells = json.loads((out / "cells.json").read_text())["cells"]
    return {key: rec["span"] for key, rec in cells.items()}


def _scores(out: Path) -> dict:
    result = json.loads((out / "study.json").read_text())
    return {(c["condition"], c["seed"]): [p["metrics"] for p in c["phases"]] for c in result["cells"]}


# -- without a cluster: settings, plan, sbatch text --------------------------------------------


def test_dependencies_wait_for_trained_phases_only(tmp_path: Path) -> None:
    from cft_adapters.study_cells import load_cells
    from cft_adapters.study_launch import dependencies

    path = _study(tmp_path, "plan")
    deps = dependencies(load_cells(load_study(path), path))
    # b shares a's phase 1 within a seed; seed 1 shares only the base's scores with seed 0: no wait.
    assert deps == {"a/seed_0": None, "b/seed_0": "a/seed_0", "a/seed_1": None, "b/seed_1": "a/seed_1"}


def test_slurm_parameters_render_to_the_sbatch_lines_a_cluster_expects() -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    from cft_adapters.study_launch import slurm_parameters

    settings = LauncherSettings(kind="slurm", partition="gpu", account="lab", gpus_per_job=2, cpus_per_job=8,
                                mem_gb=64, time_min=90, sbatch={"qos": "high", "--constraint": "a100"},
                                setup=["module load cuda"])
    text = _make_sbatch_string(command="python -u -m submitit.core._submit /jobs", folder="/jobs",
                               **slurm_parameters(settings, "cft-x-b-s0", after="4242"))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --time=90", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --dependency=afterok:4242", "#SBATCH --kill-on-invalid-dep=yes",
                 "#SBATCH --job-name=cft-x-b-s0", "module load cuda"):
        assert line in text, line
    donorless = _make_sbatch_string(command="x", folder="/jobs", **slurm_parameters(settings, "cft-x-a-s0"))
    assert "--dependency" not in donorless and "kill-on-invalid-dep" not in donorless


def test_a_multi_gpu_cell_runs_under_accelerate_launch(tmp_path: Path) -> None:
    from cft_adapters.study_cells import load_cells
    from cft_adapters.study_launch import CellJob

    path = _study(tmp_path, "gpu")
    cell = load_cells(load_study(path), path)[0]
    one = CellJob(str(path), "a/seed_0", None, str(tmp_path), str(cell.run_dir), gpus=1).command(cell)
    assert one[1:4] == ["-m", "cft_adapters.cli", str(SMOKE)] and "training.seed=0" in one
    two = CellJob(str(path), "a/seed_0", None, str(tmp_path), str(cell.run_dir), gpus=2,
                  accelerate_config="/cfg/ddp.yaml").command(cell)
    assert two[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "2"] and two[5] == "--main_process_port"
    assert two[7:9] == ["--config_file", "/cfg/ddp.yaml"] and two[9:12] == ["-m", "cft_adapters.cli", str(SMOKE)]


def test_launcher_flags_override_the_study_file_and_bad_values_name_the_key(tmp_path: Path, capsys) -> None:
    from cft_adapters.cli import _launcher_settings, _study_parser

    path = _study(tmp_path, "flags", launcher={"kind": "slurm", "partition": "cpu", "max_parallel": 4})
    args = _study_parser().parse_args([str(path), "--max-parallel", "2", "--sbatch", "qos=low"])
    settings = _launcher_settings(args, str(path))
    assert (settings.kind, settings.partition, settings.max_parallel, settings.sbatch) == ("slurm", "cpu", 2, {"qos": "low"})
    assert study_main([str(path), "--max-parallel", "0"]) == 2
    err = capsys.readouterr().err
    assert "launcher.max_parallel" in err and "Traceback" not in err
    assert study_main([str(path), "--sbatch", "qos="]) == 2
    assert "expected KEY=VALUE, or KEY alone for a flag" in capsys.readouterr().err
    flag = _launcher_settings(_study_parser().parse_args([str(path), "--sbatch", "exclusive"]), str(path))
    assert flag.sbatch == {"exclusive": True}
    bad = _study(tmp_path, "bad", launcher={"kind": "cluster"})
    assert study_main([str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "launcher.kind" in err and "Traceback" not in err


@pytest.mark.slow
def test_slurm_without_a_cluster_fails_each_cell_with_a_clear_error(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no srun, no sbatch
    path = _study(tmp_path, "noslurm")
    assert study_main([str(path), "--launcher", "slurm", "--poll", "0.2"]) == 1
    out = capsys.readouterr().out
    assert "a/seed_0 failed" in out and "could not submit the job to slurm" in out and "srun" in out
    assert "not run, its donor a/seed_0 failed" in out
    cells = json.loads((tmp_path / "noslurm" / "cells.json").read_text())["cells"]
    assert cells["b/seed_0"]["error"].startswith("not run: the cell it shares phases with (a/seed_0) failed")
    summary = {(c["condition"], c["seed"]): c for c in json.loads((tmp_path / "noslurm" / "study.json").read_text())["cells"]}
    assert "could not submit the job to slurm" in summary[("a", 0)]["error"]  # the error reaches the summary
    md = (tmp_path / "noslurm" / "study.md").read_text()
    assert "## Failed cells" in md and "- b / seed 0: not run: the cell it shares phases with (a/seed_0) failed" in md


# -- the local executor, for real ----------------------------------------------------------------


@pytest.fixture(scope="module")
def local_study(tmp_path_factory, tiny_model_path) -> dict:
    """The tiny study through the local executor, 2 at a time; its driver is killed (SIGKILL: no
    cleanup, its jobs keep running, as after a lost login) once a cell has finished, and rerun."""
    tmp = tmp_path_factory.mktemp("launch")
    path = _study(tmp, "local")
    out = tmp / "local"
    args = [str(path), "--launcher", "local", "--max-parallel", "2", "--poll", "0.5"]
    driver = subprocess.Popen([sys.executable, "-c", f"import sys; from cft_adapters.cli import study_main; "
                               f"sys.exit(study_main({args!r}))"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and driver.poll() is None:
            state = json.loads((out / "cells.json").read_text()) if (out / "cells.json").is_file() else {}
            if any(c.get("status") == "done" for c in state.get("cells", {}).values()):
                break
            time.sleep(0.5)
        assert driver.poll() is None, "the driver ended before any cell finished"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    state = json.loads((out / "cells.json").read_text())
    done = [k for k, c in state["cells"].items() if c.get("status") == "done"]
    adapters = {k: _adapter(out, k).stat().st_mtime_ns for k in done}
    from cft_adapters.study_launch import _lock_held

    live = [k for k in KEYS if _lock_held(out / "cells" / f"{k}.job")]  # jobs the killed driver left at work
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = study_main(args)
    return {"path": path, "out": out, "rc": rc, "printed": buf.getvalue(), "done_before": done, "adapters": adapters,
            "live": live}


def _adapter(out: Path, key: str) -> Path:
    return out / "cells" / key / "phase_1_english" / "adapter" / "adapter_model.safetensors"


KEYS = ("a/seed_0", "b/seed_0", "a/seed_1", "b/seed_1")


@pytest.mark.slow
def test_local_jobs_run_in_parallel_and_a_dependent_cell_waits_for_its_donor(local_study) -> None:
    out = local_study["out"]
    assert local_study["rc"] == 0
    spans = {k: json.loads((out / "cells" / f"{k}.job" / "span.json").read_text()) for k in KEYS}
    a0, b0, a1, b1 = spans["a/seed_0"], spans["b/seed_0"], spans["a/seed_1"], spans["b/seed_1"]
    assert a0["started"] < a1["ended"] and a1["started"] < a0["ended"], "the two seeds' first cells did not overlap"
    assert b0["started"] >= a0["ended"] and b1["started"] >= a1["ended"], "a dependent cell started before its donor ended"
    assert len({s["pid"] for s in spans.values()}) == 4  # each cell its own job process
    for key in KEYS:
        assert list((out / "cells" / f"{key}.job").glob("*_log.err")), key  # the job's log beside the run directory
    cells = json.loads((out / "study.json").read_text())["cells"]
    assert {c["status"] for c in cells} == {"done"}
    b = next(c for c in cells if (c["condition"], c["seed"]) == ("b", 0))
    assert b["shared_phases"] == ["phase_0_base", "phase_1_english"]


@pytest.mark.slow
def test_a_killed_driver_is_resumed_without_a_second_job_for_any_cell(local_study) -> None:
    out, printed = local_study["out"], local_study["printed"]
    assert local_study["done_before"]
    for key in local_study["done_before"]:
        assert f"{key}: finished, skipped" in printed
    assert {k: _adapter(out, k).stat().st_mtime_ns for k in local_study["done_before"]} == local_study["adapters"]
    for key in local_study["live"]:  # at work when the driver died: waited for, or finished before the rerun looked
        assert f"{key}: a job of an earlier driver is still at work" in printed or f"{key}: finished, skipped" in printed
    for key in KEYS:  # one job per cell, ever: a job the killed driver left running was waited for, not resubmitted
        assert len(list((out / "cells" / f"{key}.job").glob("*_submitted.pkl"))) == 1, key


@pytest.mark.slow
def test_local_jobs_score_what_the_sequential_run_scores(local_study, tmp_path: Path) -> None:
    raw = yaml.safe_load(local_study["path"].read_text())
    seq = tmp_path / "seq.yaml"
    seq.write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / "seq")}, sort_keys=False), encoding="utf-8")
    assert study_main([str(seq)]) == 0
    assert _scores(tmp_path / "seq") == _scores(local_study["out"])


def test_local_gpu_slots_come_from_the_drivers_visible_devices(monkeypatch) -> None:
    from cft_adapters.errors import CftError
    from cft_adapters.study_launch import _device_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert _device_slots(LauncherSettings(kind="local", max_parallel=2, gpus_per_job=2)) == [(3, 5), (6, 7)]
    assert _device_slots(LauncherSettings(kind="local", max_parallel=2)) == [(), ()]  # gpus_per_job 0: the job keeps the driver's view
    with pytest.raises(CftError, match="needs 6 GPUs; this machine shows 4"):
        _device_slots(LauncherSettings(kind="local", max_parallel=3, gpus_per_job=2))


def test_a_failed_jobs_error_is_the_exception_line_of_its_traceback() -> None:
    from cft_adapters.study_launch import _exception_line

    text = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call last):\n"
            '  File "x.py", line 1, in <module>\ncft_adapters.errors.RecipeError: recipe.yaml: training.lr: expected a number\n'
            "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - /x_log.err\n")
    assert _exception_line(text) == "cft_adapters.errors.RecipeError: recipe.yaml: training.lr: expected a number"


def test_a_flag_only_sbatch_option_is_written_bare() -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    from cft_adapters.study_launch import slurm_parameters

    settings = LauncherSettings(kind="slurm", sbatch={"exclusive": True, "qos": "high", "nice": 10})
    assert settings.sbatch == {"exclusive": True, "qos": "high", "nice": 10}
    text = _make_sbatch_string(command="x", folder="/jobs", **slurm_parameters(settings, "cft-x"))
    assert "#SBATCH --exclusive\n" in text and "#SBATCH --qos=high" in text and "#SBATCH --nice=10" in text


def test_a_slurm_job_keeps_the_devices_slurm_gave_it_and_a_local_one_the_drivers(monkeypatch) -> None:
    from cft_adapters.study_launch import CellJob

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what the local executor sets for a job with no GPU
    local = CellJob("s.yaml", "a/seed_0", None, ".", "r", visible_devices="2", launcher="local")
    assert local.environment()["CUDA_VISIBLE_DEVICES"] == "2"
    assert "CUDA_VISIBLE_DEVICES" not in CellJob("s.yaml", "a/seed_0", None, ".", "r", launcher="local").environment()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what Slurm set on the compute node
    slurm = CellJob("s.yaml", "a/seed_0", None, ".", "r", visible_devices=None, launcher="slurm")
    assert slurm.environment()["CUDA_VISIBLE_DEVICES"] == "0"


def test_a_job_that_left_no_result_is_said_at_once_with_its_state_and_last_log_line(tmp_path: Path, monkeypatch) -> None:
    import submitit
    from submitit.core.utils import cloudpickle_dump

    from cft_adapters.study_cells import load_cells
    from cft_adapters.study_launch import _Running

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no sacct, no squeue: submitit's own wait never ends
    path = _study(tmp_path, "noresult")
    cell = load_cells(load_study(path), path)[0]
    job = submitit.SlurmJob(folder=tmp_path / "jobs", job_id="4242")
    job.paths.stderr.parent.mkdir(parents=True)
    job.paths.stderr.write_text("loading the base\nslurmstepd: error: *** JOB 4242 CANCELLED AT 2026-12-02 ***\n\n")
    started = time.monotonic()
    error = _Running(cell, job=job, kind="slurm").error()
    assert time.monotonic() - started < 10
    assert error.startswith("the job ended without a result (state UNKNOWN): slurmstepd: error: *** JOB 4242 CANCELLED")
    # a result file with a traceback: its exception line
    cloudpickle_dump(("error", "Traceback (most recent call last):\n  File \"x\", line 1\nCftError: boom\n"), job.paths.result_pickle)
    assert _Running(cell, job=job, kind="slurm").error() == "CftError: boom"
    cloudpickle_dump(("success", {}), job.paths.result_pickle)
    assert _Running(cell, job=job, kind="slurm").error() is None
    job.paths.result_pickle.write_bytes(b"\x80\x04trunc")
    assert "could not be read" in _Running(cell, job=job, kind="slurm").error()


def test_a_damaged_study_state_is_an_error_that_names_the_file(tmp_path: Path, capsys) -> None:
    path = _study(tmp_path, "damaged")
    state = tmp_path / "damaged" / "cells.json"
    state.parent.mkdir(parents=True)
    for text in ('{"cells": {"a/seed_0": {"status": "do', '[1, 2]', '{"cells": {"a/seed_0": "done"}}',
                 '{"cells": {}, "token_budgets": {"zero": {}}}'):
        state.write_text(text)
        assert study_main([str(path)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{state}: the study's state is unreadable" in err and "Traceback" not in err, err
        assert state.read_text() == text  # never rewritten


def test_the_sequential_launcher_leaves_a_cell_alone_while_its_recorded_job_lives(tmp_path: Path, capsys,
                                                                                  monkeypatch) -> None:
    from cft_adapters.study_cells import load_cells
    from cft_adapters.study_launch import live_job

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no sacct, no squeue
    path = _study(tmp_path, "live", seeds=[0], conditions=[{"name": "a", "recipe": str(SMOKE)}])
    cell = load_cells(load_study(path), path)[0]
    # a local job's controller (submitit's, by its command line) still running
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "submitit"])
    try:
        state = {"cells": {"a/seed_0": {"job": {"launcher": "local", "id": str(controller.pid)}}}}
        assert live_job(cell, state) == f"local job {controller.pid}"
        out = tmp_path / "live"
        out.mkdir()
        (out / "cells.json").write_text(json.dumps(state))
        assert study_main([str(path)]) == 1  # sequential: the cell is left to its job, nothing trains here
        printed = " ".join(capsys.readouterr().out.split())
        assert f"local job {controller.pid} is at work on it" in printed
        assert not (cell.run_dir / "run.json").exists()
    finally:
        controller.kill()
        controller.wait()
    assert live_job(cell, state) is None
    # a Slurm job that neither sacct nor squeue can be asked about, with no result file: counted as alive
    assert live_job(cell, {"cells": {"a/seed_0": {"job": {"launcher": "slurm", "id": "4242"}}}}) == "Slurm job 4242 (UNKNOWN)"
