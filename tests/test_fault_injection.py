"""Fault injection: a run killed (SIGKILL, SIGTERM) at chosen moments, then re-run, ends with the
adapters of an uninterrupted run, bitwise, on the CPU; and one process owns a run directory.

Every run here is a separate process (`tests/fault_inject.py` kills itself at the named point), so
a resumed phase really starts from what is on disk.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SMOKE

pytestmark = pytest.mark.slow

GR10 = SMOKE.parent / "smoke_gr10.yaml"
# Batches of 6 over 64 examples: every epoch ends with a short batch, which is where the replay
# schedule of a resumed phase used to slip.
RECIPES = {
    "smoke": [str(SMOKE), "eval.tasks=[]"],
    "gr10": [str(GR10), "eval.tasks=[]", "training.per_device_train_batch_size=6"],
    # Length-grouped batches: the order of a resumed epoch must not depend on when the run stopped.
    "grouped": [str(SMOKE), "eval.tasks=[]", "training.group_by_length=true", "training.save_steps=4"],
}
FAULTS = [
    ("smoke", "checkpoint:1:16"),   # phase 1 resumes from its step-16 checkpoint
    ("smoke", "checkpoint:2:8"),    # phase 2 resumes, phase 1 is finished
    ("gr10", "generation:2"),       # the replay pool is half generated
    ("gr10", "checkpoint:2:16"),    # replay resumes mid-phase, after a short batch
    # The two points below are the same for a phase without replay; the replay recipe covers both
    # paths and the replay record's own (a plain phase at these points was a case of its own until
    # the suite's time had to be cut).
    ("gr10", "adapter-save:2"),     # nothing left to train: the resumed phase only saves; the pool is reused
    ("gr10", "before-record:2"),    # the adapter is saved with its record.json, run.json does not say so yet
    ("grouped", "checkpoint:1:12"),  # mid-epoch in the second epoch
    ("grouped", "checkpoint:1:8"),   # exactly at an epoch boundary
]


def _run(args: list[str], *, fault: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tests" / "fault_inject.py"), fault, *args] if fault else \
        [sys.executable, "-m", "cft_adapters.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _adapters(run: Path) -> dict[str, str]:
    return {p.parent.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.glob("phase_*/adapter/adapter_model.safetensors"))}


def _replay(run: Path) -> dict | None:
    record = json.loads((run / "run.json").read_text())["phases"][-1].get("replay")
    return None if record is None else {k: record[k] for k in ("replayed_examples", "stream_examples", "replay_tokens",
                                                                "pool_examples")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per recipe, in its own process like the faulted ones."""
    out = {}
    for name, args in RECIPES.items():
        run = tmp_path_factory.mktemp(f"ref-{name}") / "run"
        done = _run([*args, f"output_dir={run}"])
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = run
    return out


@pytest.mark.parametrize(("recipe", "fault"), FAULTS, ids=[f"{r}-{f}" for r, f in FAULTS])
def test_killed_then_resumed_equals_uninterrupted(recipe: str, fault: str, reference, tmp_path) -> None:
    run = tmp_path / "run"
    args = [*RECIPES[recipe], f"output_dir={run}"]
    killed = _run(args, fault=fault)
    assert killed.returncode == -signal.SIGKILL, f"the fault point was never reached: {killed.stderr[-2000:]}"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["phases"][-1]["status"] != "done"  # the kill left the last phase unfinished on record

    resumed = _run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _adapters(run) == _adapters(reference[recipe]) and len(_adapters(run)) == 2
    ref_manifest = json.loads((reference[recipe] / "run.json").read_text())
    manifest = json.loads((run / "run.json").read_text())
    for mine, ref in zip(manifest["phases"][1:], ref_manifest["phases"][1:]):
        assert mine["status"] == "done"
        for key in ("steps", "tokens", "init_digest", "final_digest"):
            assert mine["train"][key] == ref["train"][key], key
        assert (mine["data"], mine["placement"]) == (ref["data"], ref["placement"])  # the record is whole
    assert _replay(run) == _replay(reference[recipe])
    if fault.startswith("checkpoint:"):
        phase = int(fault.split(":")[1])
        assert manifest["phases"][phase]["train"]["resumed_from"].endswith(f"checkpoint-{fault.split(':')[2]}")
    assert not list(run.rglob(".adapter.tmp-*")) and not list(run.rglob("trainer"))


def test_sigterm_stops_cleanly_and_the_rerun_resumes(reference, tmp_path) -> None:
    run = tmp_path / "run"
    args = [*RECIPES["smoke"], f"output_dir={run}"]
    proc = subprocess.Popen([sys.executable, "-m", "cft_adapters.cli", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = run / "phase_2_french_german" / "trainer" / "checkpoint-8" / "trainer_state.json"
    try:
        _wait_for(lambda: checkpoint.is_file() or proc.poll() is not None, 300, "phase 2's first checkpoint")
        assert proc.poll() is None, "the run ended before it could be terminated"
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM): re-run the same command to resume" in err and "Traceback" not in err
    record = json.loads((run / "run.json").read_text())["phases"][2]
    assert record["status"] == "failed" and record["error"] == "terminated (SIGTERM)"

    assert _run(args).returncode == 0
    assert _adapters(run) == _adapters(reference["smoke"])


def test_a_second_run_on_the_same_directory_is_refused_at_once(reference, tmp_path, capsys) -> None:
    from cft_adapters.cli import main

    run = tmp_path / "run"
    args = [*RECIPES["smoke"], f"output_dir={run}"]
    first = subprocess.Popen([sys.executable, "-m", "cft_adapters.cli", *args], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run / ".cft.lock.json").is_file() or first.poll() is not None, 300, "the first run's lock")
        assert first.poll() is None, "the first run ended before the second started"
        started = time.monotonic()
        code = main(args)  # in this process: the clock measures the answer, not an interpreter start
        elapsed = time.monotonic() - started
        first_err = first.communicate(timeout=600)[1]
    finally:
        first.kill()
    line = capsys.readouterr().err.strip()
    assert code == 2, line
    assert elapsed < 10, elapsed
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert f"{run}: in use by pid {first.pid}" in line and ".cft.lock" in line
    assert first.returncode == 0, first_err[-2000:]
    assert _adapters(run) == _adapters(reference["smoke"])
    assert not (run / ".cft.lock.json").exists()  # released at the end


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.05)
