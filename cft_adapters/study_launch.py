"""cft-study's launchers: every cell one submitit job, on this machine (`local`) or on Slurm.

`sequential` (study.py) runs the cells one after another in the driver's own process. With
`local` or `slurm` the driver submits each cell as a job through submitit and waits for them:

- **A job is the ordinary cft-train path.** It copies the donor cell's finished phases in (as the
  sequential runner does), then runs `python -m cft_adapters.cli RECIPE OVERRIDES...` (`accelerate
  launch ...` when the cell has more than one GPU) into the cell's own run directory. Its logs and
  submitit's files land beside the run directory, in `cells/<condition>/seed_<s>.job/`.
- **Dependencies.** A cell that reuses another's trained phases (phase 1 shared per seed) waits for
  that cell: locally it is submitted once the donor finished; on Slurm it is submitted with
  `--dependency=afterok:<donor job>` (and `--kill-on-invalid-dep=yes`, so a failed donor cancels
  it). Sharing only the base's scores is no dependency (the phase-0 score cache serves them).
- **At most `max_parallel`** cells are running (or queued on Slurm) at once.
- **Idempotent and resumable.** Before a job is submitted the cell's phase keys and job id are
  recorded in `cells.json`. A rerun skips finished cells, waits for a job of an earlier driver that
  is still alive (locally: the job's lock is held; on Slurm: the recorded job is pending or
  running), and submits only what is missing. A job takes the cell's lock (`seed_<s>.job/.cell.lock`)
  before anything else, and cft-train takes the run directory's, so one cell never has two jobs
  working on it.
- A failed job's error (its last lines of stderr) reaches `cells.json` and the study summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cft_adapters.errors import CftError
from cft_adapters.study_cells import (
    Cell,
    _stale,
    _state_key,
    cell_finished,
    phase_keys,
    planned_donor,
    read_state,
    share_into,
    write_state,
)
from cft_adapters.study_config import LauncherSettings, Study
from cft_adapters.util.fs import write_atomic

CELL_LOCK = ".cell.lock"
ANOTHER_JOB = "another job is working on this cell"
SPAN = "span.json"
ERROR_LINES = 12


def job_dir(run_dir: Path) -> Path:
    """Where a cell's job files go: beside its run directory."""
    return run_dir.with_name(run_dir.name + ".job")


def dependencies(cells: list[Cell]) -> dict[str, str | None]:
    """cell key -> the key of the cell it must wait for: the donor of its trained phases (sharing
    only phase 0, the base's scores, is not waited for)."""
    out: dict[str, str | None] = {}
    for i, cell in enumerate(cells):
        donor, n = planned_donor(cell, cells[:i])
        out[_state_key(cell)] = _state_key(donor) if donor is not None and n >= 2 else None
    return out


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------


@dataclass
class CellJob:
    """What one submitit job runs (pickled to the job's folder; module-level so it unpickles)."""

    study_path: str
    key: str
    donor: str | None
    cwd: str
    run_dir: str
    gpus: int = 0
    accelerate_config: str | None = None
    visible_devices: str | None = None  # with gpus 0: the driver's CUDA_VISIBLE_DEVICES (submitit blanks it)
    launcher: str = "local"  # on Slurm the job keeps the devices Slurm gave it

    def __call__(self) -> dict[str, Any]:
        from filelock import FileLock, Timeout

        os.chdir(self.cwd)
        folder = job_dir(Path(self.run_dir))
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / CELL_LOCK), timeout=0)
        try:  # first of all: a second job for this cell stops here
            lock.acquire()
        except Timeout:
            raise CftError(f"{self.key}: {ANOTHER_JOB} (lock {folder / CELL_LOCK})") from None
        try:
            started = time.time()
            write_atomic(folder / SPAN, json.dumps({"started": started, "pid": os.getpid(), "job": _job_id()}) + "\n")
            cell, donor, state = self._cells()
            shared = share_into(cell, [donor], state) if donor is not None else []
            rc, tail = _run_streaming(self.command(cell), self.environment())
            span = {"started": started, "ended": time.time(), "pid": os.getpid(), "job": _job_id(),
                    "shared": shared, "returncode": rc}
            if rc != 0:
                span["error"] = tail
            write_atomic(folder / SPAN, json.dumps(span, indent=2) + "\n")
            if rc != 0:
                raise CftError(f"{self.key}: cft-train exited with status {rc}: {' | '.join(tail[-3:]) or '(no output)'}")
            return span
        finally:
            lock.release()

    def environment(self) -> dict[str, str]:
        """cft-train's environment: the job's own, except that a local job with no GPUs of its own
        gets the driver's CUDA_VISIBLE_DEVICES back (submitit's local executor blanks it). A Slurm
        job keeps what Slurm set on its node."""
        env = dict(os.environ)
        if self.gpus == 0 and self.launcher == "local":
            if self.visible_devices is None:
                env.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                env["CUDA_VISIBLE_DEVICES"] = self.visible_devices
        return env

    def _cells(self) -> tuple[Cell, Cell | None, dict[str, Any]]:
        """This cell and its donor, as the driver planned them (budgets from cells.json). A study
        edited since the job was submitted is refused: the job would run other settings than recorded."""
        from cft_adapters.study_cells import _read_budgets, load_cells
        from cft_adapters.study_config import load_study

        path = Path(self.study_path)
        study = load_study(path)
        state = read_state(Path(study.output_dir) / "cells.json")
        cells = {_state_key(c): c for c in load_cells(study, path, _read_budgets(state.get("token_budgets", {})))}
        if self.key not in cells:
            raise CftError(f"{self.study_path}: the study no longer has the cell {self.key}")
        cell = cells[self.key]
        recorded = state.get("cells", {}).get(self.key, {}).get("keys")
        if recorded != phase_keys(cell.recipe):
            raise CftError(f"{self.study_path}: {self.key}: the study changed since this job was submitted; rerun cft-study")
        return cell, cells.get(self.donor) if self.donor else None, state

    def command(self, cell: Cell) -> list[str]:
        train = ["-m", "cft_adapters.cli", cell.recipe_path, *cell.overrides]
        if self.gpus > 1:  # a free port each: two multi-GPU cells on one node must not both take 29500
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(self.gpus),
                      "--main_process_port", str(_free_port())]
            if self.accelerate_config:
                launch += ["--config_file", self.accelerate_config]
            return [*launch, *train]
        return [sys.executable, *train]


def _job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child (Linux): SIGTERM when the job process dies, so cft-train never outlives a
    cancelled or timed-out job and keeps its devices and run-directory lock."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_streaming(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run `cmd`, its output passed through to the job's log; returns the exit status and the last
    lines of its stderr (what the summary shows of a failure)."""
    tail: deque[str] = deque(maxlen=ERROR_LINES)
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace", env=env,
                          preexec_fn=_die_with_parent if sys.platform == "linux" else None) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.strip() and "%|" not in line:  # progress bars are not the error
                tail.append(line.strip())
        rc = proc.wait()
    sys.stderr.flush()
    return rc, list(tail)


# ---------------------------------------------------------------------------------------------
# executors
# ---------------------------------------------------------------------------------------------


def slurm_parameters(settings: LauncherSettings, name: str, after: str | None = None) -> dict[str, Any]:
    """The SlurmExecutor parameters of one cell's job (submitit's names; see its _make_sbatch_string)."""
    params: dict[str, Any] = {"job_name": name, "time": settings.time_min, "nodes": 1, "ntasks_per_node": 1}
    if settings.partition:
        params["partition"] = settings.partition
    if settings.account:
        params["account"] = settings.account
    if settings.gpus_per_job:
        params["gpus_per_node"] = settings.gpus_per_job
    if settings.cpus_per_job:
        params["cpus_per_task"] = settings.cpus_per_job
    if settings.mem_gb:
        params["mem"] = f"{int(settings.mem_gb)}GB" if float(settings.mem_gb).is_integer() else f"{int(settings.mem_gb * 1024)}MB"
    if settings.setup:
        params["setup"] = list(settings.setup)
    extra = {k.removeprefix("--").replace("-", "_"): v for k, v in settings.sbatch.items()}
    if after is not None:
        params["dependency"] = f"afterok:{after}"
        extra["kill_on_invalid_dep"] = "yes"
    if extra:
        params["additional_parameters"] = extra
    return params


def _executor(settings: LauncherSettings, folder: Path, name: str, after: str | None, gpus: tuple[int, ...]) -> Any:
    import submitit

    if settings.kind == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
        executor.update_parameters(**slurm_parameters(settings, name, after))
        return executor
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=0)
    params: dict[str, Any] = {"timeout_min": settings.time_min}
    if gpus:
        params.update(gpus_per_node=len(gpus), visible_gpus=gpus)
    if settings.setup:
        params["setup"] = list(settings.setup)
    executor.update_parameters(**params)
    return executor


def local_devices() -> list[int]:
    """The GPUs this driver may hand to local jobs: its CUDA_VISIBLE_DEVICES, else every device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(d) for d in visible.split(",") if d.strip().isdigit()]
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # no torch CUDA runtime: no GPUs
        return []


def _device_slots(settings: LauncherSettings) -> list[tuple[int, ...]]:
    """One tuple of GPU ids per parallel slot (empty tuples without GPUs); a clear error when the
    machine has fewer GPUs than max_parallel x gpus_per_job."""
    if settings.kind != "local" or settings.gpus_per_job == 0:
        return [()] * settings.max_parallel
    devices = local_devices()
    need = settings.max_parallel * settings.gpus_per_job
    if len(devices) < need:
        raise CftError(f"launcher: {settings.max_parallel} cells at once x {settings.gpus_per_job} GPU(s) each needs "
                       f"{need} GPUs; this machine shows {len(devices)} (CUDA_VISIBLE_DEVICES / torch). Lower "
                       "--max-parallel or --gpus-per-job")
    g = settings.gpus_per_job
    return [tuple(devices[i * g:(i + 1) * g]) for i in range(settings.max_parallel)]


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "UNKNOWN",
               "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT", "STOPPED", "SIGNALING", "STAGE_OUT"}
# Final or not, depending on the cluster's PreemptMode (REQUEUE: the job comes back; CANCEL: it ends):
# waited for this long after it is first seen, then taken as the end.
SLURM_PREEMPT_GRACE_S = 300
SLURM_GONE_GRACE_S = 60


def _squeue_state(job_id: str) -> str | None:
    """The job's state from squeue (None when it is not in the queue or squeue is not there)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    state = out.stdout.strip().split()
    return state[0].upper() if out.returncode == 0 and state else None


def _slurm_state(job: Any) -> str:
    """The job's state: sacct through submitit, else squeue (no accounting, or sacct lagging)."""
    try:
        state = str(job.state).upper().split()[0]
    except Exception:  # submitit could not ask sacct
        state = "UNKNOWN"
    if state == "UNKNOWN":
        state = _squeue_state(str(job.job_id)) or "UNKNOWN"
    return state


def _pid_alive(pid: int) -> bool:
    """A local job's controller (its job id is the pid) still running."""
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    try:
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: the pid exists, assume it is ours


class _Running:
    """A job being waited for: one this driver submitted, or one an earlier driver left running."""

    def __init__(self, cell: Cell, job: Any = None, adopted: str | None = None, slot: int | None = None,
                 pid: int | None = None, kind: str = "local"):
        self.cell, self.job, self.adopted, self.slot, self.pid, self.kind = cell, job, adopted, slot, pid, kind
        self._gone_since: float | None = None
        self._preempted_since: float | None = None

    @property
    def job_id(self) -> str | None:
        return str(self.job.job_id) if self.job is not None else None

    def done(self) -> bool:
        folder = job_dir(self.cell.run_dir)
        if self.kind == "slurm" and self.job is not None:
            state = _slurm_state(self.job)
            if state != "UNKNOWN":
                self._gone_since = None
                if state == "PREEMPTED":  # requeued soon (then PENDING again), or cancelled for good
                    self._preempted_since = self._preempted_since or time.time()
                    return time.time() - self._preempted_since > SLURM_PREEMPT_GRACE_S
                self._preempted_since = None
                return state not in SLURM_ALIVE
            # Neither sacct nor squeue knows it (no accounting and it left the queue): done once
            # its result file is there, or a minute after it vanished.
            if self.job.paths.result_pickle.exists():
                return True
            self._gone_since = self._gone_since or time.time()
            return time.time() - self._gone_since > SLURM_GONE_GRACE_S
        if self.job is not None:
            return bool(self.job.done())
        # An earlier driver's local job: done when neither its controller nor the cell's lock lives.
        return not (self.pid is not None and _pid_alive(self.pid)) and not _lock_held(folder)

    def error(self) -> str | None:
        """The failure in one line: cft-train's own last stderr lines (span.json), else the
        exception line of the job's traceback (its result file), else the job's end state and the
        last line of its log. Never waits: submitit's own job.exception() waits until sacct says
        the job ended, which on a cluster without accounting can be never."""
        span = _read_span(job_dir(self.cell.run_dir))
        if span.get("error"):
            return " | ".join(span["error"][-3:])[:2000]
        job = self.job
        if job is None:
            return None
        result = job.paths.result_pickle
        if not result.exists():  # killed, cancelled, out of time or memory, or never started
            state = _slurm_state(job) if self.kind == "slurm" else getattr(job, "state", "?")
            last = _last_line(job.paths.stderr)
            return (f"the job ended without a result (state {state})" + (f": {last}" if last else "")
                    + f"; logs in {job.paths.folder}")[:2000]
        from submitit.core.utils import pickle_load

        try:
            outcome, value = pickle_load(result)
        except Exception as err:  # a truncated or foreign file: say so, never raise
            return f"the job's result file {result} could not be read ({type(err).__name__})"
        return _exception_line(str(value)) if outcome == "error" else None


def _last_line(path: Path) -> str | None:
    """The last non-empty line of a log file (None: no file, or nothing in it)."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1].strip()[:500] if lines else None


def _exception_line(text: str) -> str:
    """The exception line of a submitit failure message (the traceback sits between dashed lines)."""
    parts = [p for p in text.split("\n") if p.strip()]
    dashes = [i for i, line in enumerate(parts) if set(line.strip()) == {"-"}]
    body = parts[dashes[0] + 1:dashes[1]] if len(dashes) >= 2 else parts
    return (body[-1].strip() if body else text.strip()[:200])[:2000]


def _lock_held(folder: Path) -> bool:
    from filelock import FileLock, Timeout

    if not (folder / CELL_LOCK).exists():
        return False
    lock = FileLock(str(folder / CELL_LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def run_jobs(study: Study, study_path: Path, cells: list[Cell], state: dict[str, Any], state_file: Path,
             console: Any, settings: LauncherSettings) -> bool:
    """Submit the cells that are missing, wait for them all, record each as it ends. Returns False
    when a cell failed (or is stale, or could not run because its donor failed)."""
    from cft_adapters.study_summary import write_outputs

    slots = _device_slots(settings)
    deps = dependencies(cells)
    status: dict[str, str] = {}  # key -> done | failed | stale | blocked
    running: dict[str, _Running] = {}
    free_slots = list(range(settings.max_parallel))
    not_alive: set[str] = set()  # cells whose recorded job was asked about once and is gone
    study_path = study_path.resolve()
    ok = True

    def save() -> None:
        write_state(state_file, state)

    def donor_failed(key: str) -> bool:
        return deps[key] is not None and status.get(deps[key]) in ("failed", "stale", "blocked")

    def block(cell: Cell, key: str) -> None:
        """The cell is not run (or was cancelled unstarted): the cell it shares phases with failed."""
        nonlocal ok
        cell.status, status[key], ok = "failed", "blocked", False
        state["cells"].setdefault(key, {}).update(
            status="failed", error=f"not run: the cell it shares phases with ({deps[key]}) failed")
        console.print(f"[red]cell {key}[/]: not run, its donor {deps[key]} failed")
        save()

    for cell in cells:
        key = _state_key(cell)
        if cell_finished(cell, state):
            cell.status, status[key] = "skipped", "done"
            state["cells"][key]["status"] = "done"
            console.print(f"{key}: finished, skipped")
        elif _stale(cell, state, console):
            cell.status, status[key] = "stale", "stale"
            ok = False
    save()

    def finish(run: _Running) -> None:
        nonlocal ok
        cell = run.cell
        key = _state_key(cell)
        if run.slot is not None:
            free_slots.append(run.slot)
        span = _read_span(job_dir(cell.run_dir))
        record = state["cells"].setdefault(key, {})
        finished = cell_finished(cell, state)
        if not finished and "started" not in span and donor_failed(key):
            block(cell, key)  # never started: Slurm cancelled it (--kill-on-invalid-dep) when its donor failed
            return
        error = None if finished else run.error()
        if error and ANOTHER_JOB in error:  # lost the race to a live job of an earlier driver: wait for that one
            console.print(f"{key}: another job holds the cell; waiting for it")
            return
        if finished:
            cell.status = "done"
        else:
            cell.status, ok = "failed", False
            error = error or f"the job ended without finishing the cell; see the logs in {job_dir(cell.run_dir)}"
            console.print(f"[red]cell {key} failed[/]: {error}", highlight=False)
        cell.shared = span.get("shared", record.get("shared", []))
        if "started" in span and "ended" in span:
            cell.wall_seconds = round(span["ended"] - span["started"], 1)
        # keys stay what _submit recorded: what the job checked it was running
        record.update(status=cell.status, wall_seconds=cell.wall_seconds, shared=cell.shared,
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                      span={k: span[k] for k in ("started", "ended") if k in span})
        if cell.status == "done":
            record.pop("error", None)
        else:
            record["error"] = error
        status[key] = cell.status
        save()
        write_outputs(study, study_path, cells, state, console, plot=False)
        console.print(f"[bold]{key}[/]: {cell.status} ({len([s for s in status.values() if s == 'done'])}/{len(cells)} done)")

    try:
        while True:
            for cell in cells:
                key = _state_key(cell)
                if key in status or key in running:
                    continue
                donor = deps[key]
                after = None
                if donor_failed(key):
                    block(cell, key)
                    continue
                adopted = _adopt(cell, state, not_alive)
                if adopted is not None:
                    if adopted.slot is not None and adopted.slot in free_slots:
                        free_slots.remove(adopted.slot)  # its devices are taken
                    else:
                        adopted.slot = None
                    running[key] = adopted
                    console.print(f"{key}: a job of an earlier driver is still at work ({adopted.adopted}); waiting for it")
                    continue
                if donor is not None and status.get(donor) != "done":
                    if settings.kind == "slurm" and donor in running and running[donor].job_id:
                        after = running[donor].job_id
                    else:
                        continue
                if len(running) >= settings.max_parallel or not free_slots:
                    continue
                slot = free_slots.pop(0)
                try:
                    running[key] = _submit(cell, key, donor, after, slot, slots[slot], study, study_path, state,
                                           settings, console)
                except CftError as exc:
                    free_slots.append(slot)
                    cell.status, status[key], ok = "failed", "failed", False
                    state["cells"][key].update(status="failed", error=exc.problems[0])
                    console.print(f"[red]cell {key} failed[/]: {exc.problems[0]}", highlight=False)
                save()
            for key, run in list(running.items()):
                if run.done():
                    del running[key]
                    finish(run)
            if not running and all(_state_key(c) in status for c in cells):
                break
            if not running and not any(_ready(c, deps, status) for c in cells if _state_key(c) not in status):
                break  # nothing can start (cannot happen with a valid plan; never spin)
            time.sleep(settings.poll_seconds)
    except KeyboardInterrupt:
        save()
        ids = ", ".join(f"{k} ({r.job_id or r.adopted})" for k, r in running.items())
        where = ("Slurm jobs keep running" if settings.kind == "slurm" else
                 "local jobs started from this terminal got the interrupt too; their finished phases are kept")
        console.print(f"[yellow]driver interrupted ({ids or 'no job running'}): {where}. Rerun the same command to "
                      "wait for live jobs and submit the rest.[/]")
        raise
    return ok


def _ready(cell: Cell, deps: dict[str, str | None], status: dict[str, str]) -> bool:
    donor = deps[_state_key(cell)]
    return donor is None or donor not in status or status[donor] == "done"


def _read_span(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / SPAN).read_text())
    except (OSError, ValueError):
        return {}


def _adopt(cell: Cell, state: dict[str, Any], not_alive: set[str]) -> _Running | None:
    """A job an earlier driver submitted for this cell that is still alive, to wait for instead of
    submitting another one: its lock is held, or its recorded job (a local controller's pid, or a
    Slurm job, whatever launcher this driver uses) is still there. A recorded job found gone is not
    asked about again in this driver run."""
    key = _state_key(cell)
    folder = job_dir(cell.run_dir)
    job = state.get("cells", {}).get(key, {}).get("job", {})
    slot = job.get("slot")
    if _lock_held(folder):
        return _Running(cell, adopted=f"lock {folder / CELL_LOCK} held", slot=slot,
                        pid=int(job["id"]) if job.get("launcher") == "local" and str(job.get("id", "")).isdigit() else None)
    if key in not_alive or not job.get("id"):
        return None
    job_id = str(job["id"])
    if job.get("launcher") == "local" and job_id.isdigit() and _pid_alive(int(job_id)):
        return _Running(cell, adopted=f"local job {job_id}", slot=slot, pid=int(job_id))
    if job.get("launcher") == "slurm":
        import submitit

        slurm_job = submitit.SlurmJob(folder=folder, job_id=job_id)
        state_now = _slurm_state(slurm_job)
        # UNKNOWN (sacct lagging, or no accounting) counts as alive unless the job left its result:
        # waiting on a dead job costs a minute (_Running.done), a second job for a live cell costs a run.
        if state_now in SLURM_ALIVE and not (state_now == "UNKNOWN" and slurm_job.paths.result_pickle.exists()):
            return _Running(cell, job=slurm_job, adopted=f"Slurm job {job_id} ({state_now})", kind="slurm")
    not_alive.add(key)
    return None


def live_job(cell: Cell, state: dict[str, Any]) -> str | None:
    """What is at work on the cell (or queued for it) outside this process, said in words: its
    lock held, a local job's controller alive, or its recorded Slurm job still queued or running.
    None: nothing, as far as can be asked (Slurm is not asked without submitit)."""
    try:
        running = _adopt(cell, state, set())
    except ImportError:  # a recorded Slurm job, and no submitit here to ask about it: the lock alone
        folder = job_dir(cell.run_dir)
        return f"a job (lock {folder / CELL_LOCK} held)" if _lock_held(folder) else None
    return running.adopted if running is not None else None


def _submit(cell: Cell, key: str, donor: str | None, after: str | None, slot: int, gpus: tuple[int, ...],
            study: Study, study_path: Path, state: dict[str, Any], settings: LauncherSettings, console: Any) -> _Running:
    folder = job_dir(cell.run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPAN).unlink(missing_ok=True)
    name = f"cft-{Path(study.output_dir).name}-{cell.condition}-s{cell.seed}"
    accelerate = settings.accelerate_config
    if accelerate and not Path(accelerate).is_absolute():
        accelerate = str((study_path.parent / accelerate).resolve())
    job = CellJob(str(study_path), key, donor, os.getcwd(), str(cell.run_dir), settings.gpus_per_job, accelerate,
                  os.environ.get("CUDA_VISIBLE_DEVICES") if settings.kind == "local" else None, settings.kind)
    record = state["cells"].setdefault(key, {})
    record.update(status="submitted", keys=phase_keys(cell.recipe))  # what the job checks it runs
    record.pop("error", None)
    write_state(Path(study.output_dir) / "cells.json", state)
    try:
        submitted = _executor(settings, folder, name, after, gpus).submit(job)
    except Exception as exc:  # sbatch refused it, srun missing, ...: the cell fails, the study goes on
        raise CftError(f"{key}: could not submit the job to {settings.kind}: {exc}") from None
    record["job"] = {"launcher": settings.kind, "id": str(submitted.job_id), "folder": str(folder), "slot": slot,
                     "gpus": list(gpus), "stdout": str(submitted.paths.stdout), "stderr": str(submitted.paths.stderr),
                     **({"after": after} if after else {})}
    write_state(Path(study.output_dir) / "cells.json", state)  # before anything else
    console.print(f"{key}: submitted ({settings.kind} job {submitted.job_id}{f', after {after}' if after else ''}); "
                  f"log {submitted.paths.stderr}")
    return _Running(cell, job=submitted, slot=slot, kind=settings.kind)
