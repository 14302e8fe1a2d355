"""The base's phase-0 scores, cached across runs: a second recipe on the same base, scored the same
way, takes them from `<cache>/base_scores/<digest>/` instead of scoring the base again.

The key is everything the scores depend on: the model section of the recipe (quantization, dtype,
revision...) and what it resolved to (a builtin's builder digest, a local folder's files with their
sizes and times, a hub snapshot's commit), the eval section and the eval settings, the task
definitions (every file under `lm_eval_tasks/`: versions, prompts, data), the package versions
(lm-eval's own tasks come with lm-eval), and the device. An entry holds exactly what scoring wrote:
lm-eval's results file (and samples), the summary, the groups and the time the scoring took (a run
that restores the entry records the restore's own time as its eval_seconds). It is written
once, atomically, under a lock; an entry that does not read back whole is moved aside and the base
scored again. `CFT_NO_SCORE_CACHE=1` turns the cache off.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from cft_adapters.evaluation import EvalOutcome
from cft_adapters.manifest import package_versions
from cft_adapters.modeling import FALLBACK_CHAT_TEMPLATE
from cft_adapters.recipe import BUILTIN_PREFIX, EvalConfig, ModelConfig
from cft_adapters.tasks_path import task_dirs
from cft_adapters.util.digest import canonical_json, short_digest
from cft_adapters.util.fs import build_cached_dir, cache_dir, file_lock, move_aside, write_atomic

CACHE_OFF_ENV = "CFT_NO_SCORE_CACHE"
OUTCOME = "outcome.json"
_FORMAT = 1


def cache_enabled() -> bool:
    return os.environ.get(CACHE_OFF_ENV, "").strip().lower() in ("", "0", "false", "no")


def model_identity(model: ModelConfig, model_path: str) -> dict[str, Any]:
    """What the base is: the recipe's model section and what its name resolved to."""
    ident: dict[str, Any] = {"model": model.model_dump(mode="json"),
                             "fallback_template": short_digest(FALLBACK_CHAT_TEMPLATE)}
    path = Path(model_path)
    if model.name_or_path.startswith(BUILTIN_PREFIX):
        ident["resolved"] = path.name  # <name>-<builder digest>, or a GGUF's digest of name, size and time
    elif path.is_dir():
        ident["resolved"] = str(path.resolve())
        ident["files"] = sorted([f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in path.iterdir() if f.is_file())
    else:  # a hub id: the snapshot it resolves to locally, when there is one
        ident["resolved"] = _hub_commit(model)
    return ident


def _hub_commit(model: ModelConfig) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model.name_or_path, "config.json", revision=model.revision)
    except Exception:  # an id the hub library refuses: the name and revision are in the key already
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def task_definitions_digest() -> str:
    """Every file under lm_eval_tasks/ and the include paths in use (YAML with each task's version,
    utils, bundled data). The bundled folder is keyed by relative paths, as before include paths."""
    parts = []
    for i, root in enumerate(task_dirs()):
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                name = path.relative_to(root) if i == 0 else path
                parts.append(f"{name}:{short_digest(path.read_bytes())}")
    return short_digest("\n".join(parts))


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def base_score_key(model: ModelConfig, model_path: str, eval_cfg: EvalConfig, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "model": model_identity(model, model_path),
        "tasks": list(eval_cfg.tasks),
        "eval": eval_cfg.keyed_dump(exclude={"tasks"}),
        "settings": settings,
        "task_definitions": task_definitions_digest(),
        "versions": package_versions(),
        "device": _device(),
    }


@dataclass
class CachedScores:
    """An entry read back whole: the summary and the files' text, restored into a run on demand."""

    entry: dict[str, Any]
    texts: dict[str, str]
    eval_cfg: EvalConfig

    def score(self, adapter_dir: Path | None, out_dir: Path) -> EvalOutcome:
        """The stored scores, restored into `out_dir`. Its seconds are this restore's own (what this run
        spent on the evaluation), not the original scoring's, which stays in the entry."""
        started = time.perf_counter()
        for name, text in self.texts.items():
            write_atomic(out_dir / name, text)
        e = self.entry
        return EvalOutcome({t: dict(m) for t, m in e["metrics"].items()}, {g: list(c) for g, c in e["groups"].items()},
                           round(time.perf_counter() - started, 3), out_dir / e["results_file"])


class BaseScoreCache:
    def __init__(self, key: dict[str, Any], root: Path | None = None):
        self.key = json.loads(canonical_json(key))  # as it reads back from disk
        self.dir = (root or cache_dir()) / "base_scores" / short_digest(canonical_json(key))

    def lookup(self, eval_cfg: EvalConfig, console: Console) -> CachedScores | None:
        """The entry, or None (none yet, or an unusable one: that is said and moved aside)."""
        if not (self.dir / OUTCOME).is_file():
            return None
        try:
            entry = json.loads((self.dir / OUTCOME).read_text(encoding="utf-8"))
            texts = self._check(entry)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
            console.print(f"[yellow]base score cache:[/] {self.dir} is unusable ({why[:300]}); moved aside, scoring the base again")
            self._discard()
            return None
        return CachedScores(entry, texts, eval_cfg)

    def _check(self, entry: Any) -> dict[str, str]:
        if not isinstance(entry, dict) or entry.get("key") != self.key:
            raise ValueError("its key does not match")
        metrics, groups = entry["metrics"], entry["groups"]
        if not all(isinstance(m, dict) and all(isinstance(v, (int, float)) for v in m.values()) for m in metrics.values()):
            raise ValueError("bad metrics")
        if not all(isinstance(c, list) for c in groups.values()) or not isinstance(entry["seconds"], (int, float)):
            raise ValueError("bad groups or seconds")
        files = entry["files"]
        if entry["results_file"] not in files:
            raise ValueError("no results file")
        texts = {}
        for name, sha in files.items():
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or name == OUTCOME:
                raise ValueError(f"bad file name {name!r}")
            data = (self.dir / name).read_bytes()
            if short_digest(data) != sha:
                raise ValueError(f"{name} does not match its digest")
            texts[name] = data.decode("utf-8")
        json.loads(texts[entry["results_file"]])
        return texts

    def _discard(self) -> None:
        try:
            with file_lock(self.dir.with_name(f".{self.dir.name}.lock")):
                if self.dir.exists():
                    move_aside(self.dir, "unusable")
        except OSError:
            pass  # another process moved it, or the cache is read-only: the base is scored either way

    def store(self, outcome: EvalOutcome, out_dir: Path, console: Console) -> None:
        """Keep what scoring wrote (results file and its samples); a cache that cannot be written
        is said, never fatal."""
        stamp = outcome.results_file.name.removeprefix("results_").removesuffix(".json")
        names = [outcome.results_file.name, *sorted(p.name for p in out_dir.glob(f"samples_*_{stamp}.jsonl"))]

        def build(tmp: Path) -> None:
            files = {}
            for name in names:
                data = (out_dir / name).read_bytes()
                (tmp / name).write_bytes(data)
                files[name] = short_digest(data)
            entry = {"key": self.key, "metrics": outcome.metrics, "groups": outcome.groups, "seconds": outcome.seconds,
                     "results_file": outcome.results_file.name, "files": files}
            write_atomic(tmp / OUTCOME, json.dumps(entry, indent=2, sort_keys=True) + "\n")

        try:
            build_cached_dir(self.dir, build, ready=OUTCOME)
        except OSError as exc:
            console.print(f"[yellow]base score cache:[/] not stored in {self.dir}: {exc.strerror or exc}")


@dataclass
class StoringScorer:
    """Scores the base with `inner` and keeps the scores in the cache."""

    inner: Any
    cache: BaseScoreCache
    console: Console

    @property
    def eval_cfg(self) -> EvalConfig:
        return self.inner.eval_cfg

    def score(self, adapter_dir: Path | None, out_dir: Path) -> EvalOutcome:
        outcome = self.inner.score(adapter_dir, out_dir)
        self.cache.store(outcome, out_dir, self.console)
        return outcome
