"""Data-parallel training through `accelerate launch`: two CPU processes (gloo) train one smoke phase
pair; both ranks end with the same adapter, and only rank 0 writes run.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cft_adapters.manifest import RunManifest
from cft_adapters.modeling import adapter_file_digest

from conftest import SMOKE

pytestmark = pytest.mark.slow

# Runs the real CLI under the launcher, recording which rank renames anything onto run.json.
PROBE = '''
import os, sys
real_replace = os.replace
def logged_replace(src, dst, *a, **k):
    if str(dst).endswith("run.json"):
        with open(os.environ["CFT_PROBE_LOG"], "a") as fh:
            fh.write(os.environ.get("RANK", "?") + "\\n")
    return real_replace(src, dst, *a, **k)
os.replace = logged_replace
from cft_adapters.cli import main
raise SystemExit(main(sys.argv[1:]))
'''


def _can_spawn_two() -> str | None:
    if (os.cpu_count() or 1) < 2:
        return "needs 2 CPU cores for two training processes"
    return None


def _accelerate_launch() -> list[str]:
    """`accelerate launch`, or the same entry point through this interpreter when the script is not on PATH."""
    exe = shutil.which("accelerate")
    return [exe, "launch"] if exe else [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.mark.skipif(_can_spawn_two() is not None, reason=_can_spawn_two() or "")
def test_two_process_ddp_identical_adapters_and_one_writer(tmp_path: Path, tiny_model_path: Path) -> None:
    out = tmp_path / "run"
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    log = tmp_path / "writes.log"
    env = {**os.environ, "CFT_PROBE_LOG": str(log), "OMP_NUM_THREADS": "1"}
    cmd = [*_accelerate_launch(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(probe), str(SMOKE), f"output_dir={out}", "training.max_steps=3",
           "eval.limit=2", "training.save_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    manifest = RunManifest.read(out)
    assert [r.status for r in manifest.phases] == ["done"] * 3
    assert [r.eval_status for r in manifest.phases] == ["done"] * 3  # rank 0 scored every phase
    for rec in manifest.phases[1:]:
        stats = rec.train
        assert stats.world_size == 2
        assert stats.rank_digests == [stats.final_digest, stats.final_digest]  # both ranks, one adapter
        assert adapter_file_digest(out / rec.checkpoint) == stats.final_digest
        assert stats.steps == 3
    writers = log.read_text().split()
    assert writers and set(writers) == {"0"}, writers  # run.json: rank 0 only
    assert not list(out.rglob(".run.json.*"))


def test_launcher_independent_helpers_are_trivial_without_a_launcher(monkeypatch) -> None:
    from cft_adapters import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather("x") == ["x"]
    assert distributed.main_first(lambda: 7, "test") == 7
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main()
    assert json.dumps(distributed.gather(1)) == "[1]"
