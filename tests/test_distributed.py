"""Data-parallel training: two CPU processes (torchrun, gloo; ACCELERATE_USE_CPU makes accelerate's
state MULTI_CPU, a real process group) train the smoke phases; both ranks end with the same adapter,
only rank 0 writes run.json, and a run killed mid-phase resumes to the adapters of an uninterrupted
one. (`accelerate launch --multi_gpu` on a machine without GPUs starts two processes that do not
form a group: each trains alone, which proves nothing.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cft_adapters.manifest import RunManifest
from cft_adapters.modeling import adapter_file_digest

from conftest import SMOKE

pytestmark = pytest.mark.slow

# Runs the real CLI under the launcher, recording which rank renames anything onto run.json and the
# world size each Trainer trains with.
PROBE = '''
import os, sys
import transformers
real_train = transformers.Trainer.train
def logged_train(self, *a, **k):
    with open(os.environ["CFT_PROBE_LOG"] + ".world", "a") as fh:
        fh.write(f"{self.args.world_size}\\n")
    return real_train(self, *a, **k)
transformers.Trainer.train = logged_train
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


def _torchrun(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd,
                          env={**env, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(_can_spawn_two() is not None, reason=_can_spawn_two() or "")
def test_two_process_ddp_identical_adapters_and_one_writer(tmp_path: Path, tiny_model_path: Path) -> None:
    out = tmp_path / "run"
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    log = tmp_path / "writes.log"
    proc = _torchrun(str(probe), str(SMOKE), f"output_dir={out}", "training.max_steps=3", "eval.limit=2",
                     "training.save_steps=2", env={**os.environ, "CFT_PROBE_LOG": str(log)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert set(Path(f"{log}.world").read_text().split()) == {"2"}  # a real two-process group trained

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


@pytest.mark.skipif(_can_spawn_two() is not None, reason=_can_spawn_two() or "")
def test_ddp_killed_mid_phase_resumes_to_the_uninterrupted_adapters(tmp_path: Path, tiny_model_path: Path) -> None:
    """Generative replay, batches of 3 per rank: the checkpoint has one RNG file per rank, the
    adapter is reloaded before the model is wrapped, the replay schedule follows the global slot."""
    from conftest import REPO

    args = [str(SMOKE.parent / "smoke_gr10.yaml"), "training.max_steps=6", "training.save_steps=2", "eval.tasks=[]",
            "training.per_device_train_batch_size=3"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _torchrun("-m", "cft_adapters.cli", *args, f"output_dir={ref}", env=dict(os.environ), cwd=tmp_path).returncode == 0
    killed = _torchrun(str(REPO / "tests" / "fault_inject.py"), "checkpoint:2:4", *args, f"output_dir={run}",
                       env=dict(os.environ), cwd=tmp_path)
    assert killed.returncode != 0 and (run / "phase_2_french_german/trainer/checkpoint-4/rng_state_1.pth").is_file()
    resumed = _torchrun("-m", "cft_adapters.cli", *args, f"output_dir={run}", env=dict(os.environ), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for mine, theirs in zip(RunManifest.read(run).phases[1:], RunManifest.read(ref).phases[1:]):
        assert mine.train.final_digest == theirs.train.final_digest
        assert mine.train.rank_digests == [mine.train.final_digest] * 2
    last, ref_last = RunManifest.read(run).phases[2], RunManifest.read(ref).phases[2]
    assert last.train.resumed_from.endswith("checkpoint-4")
    assert {k: last.replay[k] for k in ("replayed_examples", "stream_examples", "replay_tokens")} == \
        {k: ref_last.replay[k] for k in ("replayed_examples", "stream_examples", "replay_tokens")}


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
