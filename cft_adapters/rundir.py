"""The run directory: its lock, its manifest, and the phase folders' life cycle.

One `cft-train` owns a run directory at a time (`RunLock`). A phase folder only ever moves forward:
trainer checkpoints while it trains, then an adapter renamed into place in one step, then the
manifest record. Whatever a killed attempt leaves is either finished (and recorded on the next
start) or moved aside; nothing of a finished phase is rewritten, and nothing is deleted except the
trainer checkpoints of a phase whose adapter is safely saved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cft_adapters.errors import CftError, RunError
from cft_adapters.manifest import MANIFEST, RESOLVED_RECIPE, ManifestError, PhaseRecord, RunManifest, TrainStats
from cft_adapters.recipe import PHASE_NAME, EvalConfig, ModelConfig
from cft_adapters.util.fs import RunLock, fsync_path, make_temp_dir, publish_dir, stamped_path, write_atomic

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAIN_STATS = "train.json"
TRAIN_LOG = "train_log.json"
PHASE_RECORD = "record.json"  # the phase's data, placement and replay entries of run.json, beside its adapter
# Everything a phase folder can hold that was derived from the phase's settings (moved aside together
# when an unfinished phase's settings change).
ATTEMPT = "attempt.json"  # the config_digest an unfinished attempt trains under
DERIVED = ("trainer", "adapter", TRAIN_STATS, TRAIN_LOG, PHASE_RECORD, "replay.jsonl", "replay_meta.json",
           "placement.json", "eval", ATTEMPT)
RECORD_FIELDS = ("data", "placement", "replay")


def read_manifest(run_dir: Path) -> RunManifest | None:
    """run.json, or None for a new run directory. A damaged file is an error that names the field
    and says how to recover; it is never modified."""
    path = run_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return RunManifest.read(run_dir)
    except ManifestError as exc:
        raise RunError(
            f"{exc} (run.json is damaged and was not modified). Move it aside and re-run: finished phases are "
            f"recovered from their adapter/ and train.json, then scored again."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: cannot read the run manifest: {exc}") from None


def _adapter_digest(adapter_dir: Path) -> str:
    from cft_adapters.modeling import adapter_file_digest

    return adapter_file_digest(adapter_dir)


def verify_adapter(run_dir: Path, record: PhaseRecord) -> Path:
    """The adapter folder of a finished phase, checked against the digest recorded when it was saved.
    A missing, truncated or altered adapter is an error: nothing trains from it or scores it."""
    where = f"{run_dir}: phase {record.index} '{record.name}'"
    if record.checkpoint is None or record.train is None:
        raise RunError(f"{where} is recorded as done but has no checkpoint in run.json")
    adapter_dir = inside(run_dir, run_dir / record.checkpoint,
                         f"{run_dir / MANIFEST}: phases[{record.index}].checkpoint: {record.checkpoint!r}")
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise RunError(f"{where}: its adapter file {adapter_dir / missing[0]} is missing; restore it, or start over "
                       f"in a new output_dir (a finished phase is never retrained in place)")
    try:
        digest = _adapter_digest(adapter_dir)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise RunError(f"{where}: its adapter {adapter_dir / ADAPTER_FILES[1]} cannot be read ({exc}); restore it, "
                       f"or start over in a new output_dir") from None
    if digest != record.train.final_digest:
        raise RunError(f"{where}: its adapter {adapter_dir / ADAPTER_FILES[1]} was changed after it was saved "
                       f"(digest {digest[:16]}, recorded {record.train.final_digest[:16]}); restore it, or start "
                       f"over in a new output_dir")
    return adapter_dir


def inside(run_dir: Path, path: Path, source: str | None = None) -> Path:
    """`path` with symlinks resolved; a CftError naming `source` (default: the path) when it lies
    outside the resolved run directory. A run directory may come from someone else: every path read
    from it, and every file written into it, goes through here."""
    root = Path(run_dir).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise CftError(f"{source or path}: resolves to {resolved}, outside the run directory {root}")
    return resolved


def checkpoint_problem(path: Path) -> str | None:
    """Why a trainer checkpoint cannot be resumed from, or None when it can: its trainer state parses,
    its adapter loads and is finite, and its optimizer, scheduler and RNG states load."""
    import torch
    from safetensors.torch import load_file

    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or unreadable (a save cut short)"
    try:
        adapter = load_file(str(path / "adapter_model.safetensors"))
    except Exception as exc:  # safetensors' own error types
        return f"adapter_model.safetensors cannot be read ({str(exc)[:80]})"
    if not all(torch.isfinite(t).all() for t in adapter.values()):
        return "the adapter holds nan/inf"
    from cft_adapters.distributed import world_size

    # One process saves rng_state.pth; under data parallelism each rank saves rng_state_<rank>.pth.
    ranks = world_size()
    rng = ["rng_state.pth"] if ranks == 1 else [f"rng_state_{i}.pth" for i in range(ranks)]
    for name in ("optimizer.pt", "scheduler.pt", *rng):
        if not (path / name).is_file():
            return f"{name} is missing"
        try:
            if name.startswith("rng_state"):  # holds numpy state: not loadable with weights_only, so check the archive
                with zipfile.ZipFile(path / name) as archive:
                    if archive.testzip() is not None:
                        raise ValueError("bad CRC")
            else:
                torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises pickle, runtime and zip errors
            return f"{name} cannot be loaded ({type(exc).__name__})"
    return None


def checkpoint_step(path: Path) -> int | None:
    step = path.name.removeprefix("checkpoint-")
    return int(step) if path.name.startswith("checkpoint-") and step.isdigit() else None


def last_good_checkpoint(trainer_dir: Path, console: Any = None, move_damaged: bool = False) -> str | None:
    """The newest trainer checkpoint that can be resumed from; damaged newer ones are passed over
    (and named), never resumed from. With `move_damaged` (rank 0, before resuming) they are moved out
    of the trainer folder, to `damaged-checkpoint-<step>-<time>/` beside it, so the resumed trainer
    neither writes into them nor counts them when it rotates its checkpoints."""
    from cft_adapters.distributed import is_main

    if not trainer_dir.is_dir():
        return None
    steps = sorted(((checkpoint_step(p), p) for p in trainer_dir.iterdir() if checkpoint_step(p) is not None), reverse=True)
    for step, path in steps:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        aside = stamped_path(trainer_dir.parent, f"damaged-checkpoint-{step}")
        if move_damaged and is_main():
            path.rename(aside)
        if console is not None:
            moved = f"; moved to {aside}" if aside.exists() else ""
            console.print(f"[yellow]{path}: not resumable, {problem}{moved}; trying an earlier checkpoint[/]")
    return None


def saved_stats(phase_dir: Path) -> TrainStats | None:
    try:
        return TrainStats.model_validate_json((phase_dir / TRAIN_STATS).read_text())
    except (OSError, ValueError):
        return None


def claim(run_dir: Path, source: str) -> RunLock:
    """Create (or check) the run directory and take its lock: one process owns a run directory.
    Cheap on purpose (no model library is imported), so a second process is told at once."""
    where = f"{source}: output_dir"
    if run_dir.exists() and not run_dir.is_dir():
        raise CftError(f"{where}: '{run_dir}' exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CftError(f"{where}: cannot create run directory '{run_dir}': {exc.strerror}") from None
    try:  # a real write: permissions, a read-only mount and an immutable folder all show here
        fd, probe = tempfile.mkstemp(prefix=".cft-write-test-", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CftError(f"{where}: the run directory '{run_dir}' is not writable ({exc.strerror})") from None
    lock = RunLock(run_dir)
    lock.acquire()
    return lock


class RunDirectory:
    """The files of one run: manifest, lock, phase folders, atomic adapter saves."""

    def __init__(self, path: Path, console: Any):
        self.path = path
        self.console = console
        self._lock: RunLock | None = None

    # -- ownership ------------------------------------------------------------------------------

    def lock(self, source: str) -> None:
        """Take the lock unless this process holds it already (the CLI takes it before loading models)."""
        if self._lock is None and not RunLock.held_here(self.path):
            self._lock = claim(self.path, source)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- phase folders --------------------------------------------------------------------------

    def phase_dir(self, record: PhaseRecord) -> Path:
        return self.path / record.dirname

    def trainer_dir(self, record: PhaseRecord) -> Path:
        return self.phase_dir(record) / "trainer"

    def move_derived_aside(self, record: PhaseRecord, reason: str) -> Path | None:
        """Move everything an unfinished phase derived from its old settings into one folder beside
        them (`stale-<time>/`); nothing is deleted. Returns that folder, or None when there was nothing."""
        phase_dir = self.phase_dir(record)
        present = [phase_dir / name for name in DERIVED if (phase_dir / name).exists()]
        if not present:
            return None
        aside = stamped_path(phase_dir, reason)
        aside.mkdir(parents=True)
        for path in present:
            path.rename(aside / path.name)
        fsync_path(phase_dir)
        return aside

    def recover_phase(self, record: PhaseRecord, tidy: bool = True) -> TrainStats | None:
        """Tidy what a killed attempt left in an unfinished phase. Returns the saved stats when the
        attempt had already saved the phase's adapter (it only needs recording). `tidy=False` (the
        other ranks of a data-parallel run, after rank 0 tidied) only looks."""
        phase_dir = self.phase_dir(record)
        adapter_dir = phase_dir / "adapter"
        stats = saved_stats(phase_dir)
        saved = (adapter_dir.exists() and stats is not None and stats.config_digest == record.config_digest
                 and all((adapter_dir / n).is_file() for n in ADAPTER_FILES) and _digest_or_none(adapter_dir) == stats.final_digest)
        if not tidy:
            return stats if saved else None
        for leftover in phase_dir.glob(".adapter.tmp-*"):  # a save cut short by a kill
            shutil.rmtree(leftover, ignore_errors=True)
        if saved:
            return stats
        if adapter_dir.exists():
            aside = self.move_derived_aside(record, "stale")
            self.console.print(f"phase {record.index} '{record.name}': an unrecorded adapter from other settings was "
                               f"moved to {aside}")
            return None
        self._check_attempt(record)
        return None

    def _check_attempt(self, record: PhaseRecord) -> None:
        """Trainer checkpoints and replay files carry no settings of their own: what an attempt left is
        resumed only when its attempt.json names this phase's config_digest (run.json may be gone, or
        the phase may have been dropped from the recipe and added back with other settings)."""
        phase_dir = self.phase_dir(record)
        try:
            digest = json.loads((phase_dir / ATTEMPT).read_text()).get("config_digest")
        except (OSError, ValueError, AttributeError):
            digest = None
        if digest == record.config_digest:
            return
        aside = self.move_derived_aside(record, "stale")
        if aside is not None:
            self.console.print(f"phase {record.index} '{record.name}': what an attempt under other (or unknown) "
                               f"settings left was moved to {aside}")

    def start_attempt(self, record: PhaseRecord) -> None:
        write_atomic(self.phase_dir(record) / ATTEMPT, json.dumps({"config_digest": record.config_digest}) + "\n")

    def save_adapter(self, peft_model: Any, record: PhaseRecord, stats: TrainStats, log_history: list[dict],
                     template: Any = None) -> None:
        """Write the adapter to a temporary folder, check it, then rename it into place in one step.
        train.json is written before the rename, so a saved adapter always has its stats beside it.
        `template(folder)` writes the chat-template record beside the adapter files."""
        phase_dir = self.phase_dir(record)
        write_atomic(phase_dir / TRAIN_LOG, json.dumps(log_history, indent=1) + "\n")
        tmp = make_temp_dir(phase_dir, ".adapter.tmp-")
        try:
            peft_model.save_pretrained(str(tmp), safe_serialization=True)
            if template is not None:
                template(tmp)
            if _adapter_digest(tmp) != stats.final_digest:
                raise RunError(f"{tmp}: the saved adapter does not match the trained weights")
            # What run.json says of the phase's data, placement and replay, kept beside the adapter:
            # a phase recovered without its run.json record (a kill, a damaged run.json) gets it back.
            write_atomic(phase_dir / PHASE_RECORD, json.dumps({f: getattr(record, f) for f in RECORD_FIELDS}, indent=2) + "\n")
            write_atomic(phase_dir / TRAIN_STATS, stats.model_dump_json(indent=2) + "\n")
            publish_dir(tmp, phase_dir / "adapter")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def record_phase_done(self, manifest: RunManifest, record: PhaseRecord, stats: TrainStats) -> None:
        """The phase is done: its stats, checkpoint and status in run.json. Entries the record lacks
        (recovered after a kill, or after run.json was moved aside) come from its record.json."""
        saved = _saved_record(self.phase_dir(record))
        for name in RECORD_FIELDS:
            if getattr(record, name) is None and saved.get(name) is not None:
                setattr(record, name, saved[name])
        record.train = stats
        record.checkpoint = f"{record.dirname}/adapter"
        record.status, record.error = "done", None
        manifest.write(self.path)
        from cft_adapters.distributed import is_main

        if is_main():
            shutil.rmtree(self.trainer_dir(record), ignore_errors=True)  # optimizer state is only needed to resume


def _saved_record(phase_dir: Path) -> dict[str, Any]:
    try:
        saved = json.loads((phase_dir / PHASE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in saved.items() if isinstance(v, dict)} if isinstance(saved, dict) else {}


def _digest_or_none(adapter_dir: Path) -> str | None:
    try:
        return _adapter_digest(adapter_dir)
    except Exception:  # a damaged file is simply not the saved adapter
        return None


# -- a run directory written by someone else: checked before anything in it is used -------------------


def checked_manifest(run_dir: Path) -> RunManifest:
    """run.json, with every phase's index, name and checkpoint checked before any of them is used.

    Names become folder names (phase_<k>_<name>), so they must follow the recipe schema's rule. The
    raw JSON is checked first, so that the file's own schema is not what stands between a crafted
    name and a file path; the parsed records are checked again (the schema may coerce values).
    """
    path = run_dir / MANIFEST
    if not path.is_file():
        raise CftError(f"{run_dir}: no run.json here; is this a cft-train run directory?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None  # read_manifest says what is wrong with the file
    if isinstance(raw, dict) and isinstance(raw.get("phases"), list):
        _raise_phase_problems(run_dir, raw["phases"])
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise CftError(f"{run_dir}: no run.json here; is this a cft-train run directory?")
    _raise_phase_problems(run_dir, [record.model_dump() for record in manifest.phases])
    return manifest


def _raise_phase_problems(run_dir: Path, phases: list) -> None:
    """One line per bad phases[i].index / .name / .checkpoint; values of another type are left to
    the manifest schema."""
    source = run_dir / MANIFEST
    problems = []
    for i, phase in enumerate(phases):
        if not isinstance(phase, dict):
            continue
        index, name, checkpoint = phase.get("index"), phase.get("name"), phase.get("checkpoint")
        if isinstance(index, int) and index != i:
            problems.append(f"{source}: phases[{i}].index: expected {i}, got {index}")
        if isinstance(name, str) and not re.fullmatch(PHASE_NAME, name):
            problems.append(f"{source}: phases[{i}].name: {name!r} is not a valid phase name "
                            f"(lowercase letters, digits, '_' or '-')")
        if isinstance(checkpoint, str):
            try:
                inside(run_dir, run_dir / checkpoint, f"{source}: phases[{i}].checkpoint: {checkpoint!r}")
            except CftError as exc:
                problems += exc.problems
    if problems:
        raise CftError(problems)


def run_settings(run_dir: Path, *, allow_remote_code: bool = False) -> tuple[ModelConfig, EvalConfig]:
    """The model and eval sections of the run's resolved recipe (data paths are not needed here).

    `model.trust_remote_code: true` is refused unless `allow_remote_code` (the user's
    --trust-remote-code): whoever wrote the run directory would choose what code runs here.
    """
    path = run_dir / RESOLVED_RECIPE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        model_cfg, eval_cfg = ModelConfig.model_validate(raw["model"]), EvalConfig.model_validate(raw.get("eval") or {})
    except (OSError, KeyError, TypeError, yaml.YAMLError, ValidationError) as exc:
        raise CftError(f"{path}: cannot read the run's recipe: {str(exc).splitlines()[0]}") from None
    if model_cfg.trust_remote_code and not allow_remote_code:
        raise CftError(f"{path}: model.trust_remote_code is true; this run directory asks to run code from the "
                       f"model repository. Pass --trust-remote-code to allow it.")
    return model_cfg, eval_cfg
