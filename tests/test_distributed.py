"""Data-parallel training: two CPU processes (torchrun, gloo; ACCELERATE_USE_CPU makes accelerate's
state MULTI_CPU, a real process group) train the smoke phases; both ranks end with the same adapter,
only rank 0 writes run.json, and a run killed mid-phase resumes to the adapters of an uninterrupted
one. (`accelerate launch --multi_gpu` on a machine without GPUs starts two processes that do not
form a group: each trains alone, which proves nothing.) The helpers in cft_adapters.distributed are
checked in a real two-process gloo group, and the shipped accelerate config through accelerate's own
launch logic."""

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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert distributed.main_first(lambda: 7, "test") == 7
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main()


# Each rank gathers what only it knows (its pid), runs main_first where rank 0 writes a file that the
# other rank reads, then main_first where rank 0 fails; it writes what it saw to OUT.<rank>.
GATHER = '''
import json, os, sys
from pathlib import Path
import torch.distributed as dist
from cft_adapters import distributed
from cft_adapters.errors import RunError
rendezvous, shared, out = sys.argv[1:4]
dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=distributed.rank(),
                        world_size=distributed.world_size())
seen = {"gather": distributed.gather({"rank": distributed.rank(), "pid": os.getpid()})}
def write():
    Path(shared).write_text("written by rank 0")
    return "rank 0 wrote"
seen["main_first"] = distributed.main_first(write, "the write", others=lambda: Path(shared).read_text())
def fail():
    raise ValueError("rank 0 broke")
try:
    distributed.main_first(fail, "the failing step")
except (RunError, ValueError) as exc:
    seen["failure"] = f"{type(exc).__name__}: {exc}"
dist.destroy_process_group()
Path(f"{out}.{distributed.rank()}").write_text(json.dumps(seen))
'''


def test_gather_and_main_first_across_two_real_processes(tmp_path: Path) -> None:
    """Two processes in a gloo group: gather returns every rank's value in rank order (rank 1 sees
    rank 0's pid, which it cannot know by itself); main_first runs rank 0 first, so rank 1 reads
    what rank 0 wrote; a failure on rank 0 stops rank 1 with a RunError instead of a hang."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    out = tmp_path / "seen"
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "rendezvous"), str(tmp_path / "shared.txt"),
                               str(out)], env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    seen = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    expected = [{"rank": 0, "pid": procs[0].pid}, {"rank": 1, "pid": procs[1].pid}]
    assert seen[0]["gather"] == seen[1]["gather"] == expected
    assert seen[0]["main_first"] == "rank 0 wrote" and seen[1]["main_first"] == "written by rank 0"
    assert seen[0]["failure"] == "ValueError: rank 0 broke"
    assert seen[1]["failure"] == "RunError: rank 1: stopped because rank 0 failed during the failing step (its error is above)"


def _launch(config: Path) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file CONFIG` decides: its arguments, and the environment it
    gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "cft_adapters.cli", "r.yaml"])
    args = _validate_launch_command(args)[0]
    return args, prepare_multi_gpu_env(args)


def test_shipped_accelerate_config_launches_ddp_that_the_runner_accepts(tmp_path: Path, monkeypatch) -> None:
    """accelerate itself reads recipes/accelerate/ddp.yaml: several processes, plain multi-GPU data
    parallelism, and an environment the runner's engine check lets through. The same file switched to
    FSDP gets an environment the check refuses, so the check does look at what the launcher sets."""
    from cft_adapters.distributed import check_engine
    from cft_adapters.errors import CftError

    from conftest import REPO

    config = REPO / "recipes" / "accelerate" / "ddp.yaml"
    args, env = _launch(config)
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed and not args.cpu
    assert args.num_processes >= 2
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    check_engine()

    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text(config.read_text().replace("distributed_type: MULTI_GPU", "distributed_type: FSDP"))
    args, env = _launch(fsdp)
    assert args.use_fsdp
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(CftError, match="FSDP: cft-train runs data-parallel"):
        check_engine()
