"""Score phase checkpoints with lm-eval's Python API on the model already in memory.

lm-eval gets the loaded model through `HFLM(pretrained=<model object>)` and our task families
through `TaskManager(include_path=lm_eval_tasks)`. Phase 0 is scored with the adapter disabled;
phase k by loading phase k's adapter weights into the one adapter in place. The base is never
loaded again.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

from cft_adapters import modeling
from cft_adapters.errors import RecipeError
from cft_adapters.manifest import write_atomic
from cft_adapters.recipe import EvalConfig, ModelConfig
from cft_adapters.task_semantics import TaskSemanticsError, unclassified_tasks
from cft_adapters.tasks_path import task_dirs


def task_manager(names: Sequence[str] = ()) -> Any:
    """lm-eval's task manager over the bundled tasks and the include paths in use (tasks_path).

    Indexing lm-eval's own few thousand task files takes seconds in every process (6 s on 2 CPU
    cores), paid by every cft-train and every study job. When `names` are given and the include
    paths define every one of them, and every task their groups list, that index is not built."""
    dirs = task_dirs()
    if names and _self_contained(dirs, tuple(names)):
        return _task_manager(dirs, False)
    return _task_manager(dirs, True)


@lru_cache(maxsize=8)
def _task_manager(dirs: tuple[Path, ...], include_defaults: bool = True) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(d) for d in dirs], include_defaults=include_defaults)


@lru_cache(maxsize=32)
def _self_contained(dirs: tuple[Path, ...], names: tuple[str, ...]) -> bool:
    """Every name is a task, group or tag of the include paths alone, and so is every task their
    groups list (followed down): lm-eval's own index is not needed to resolve them."""
    index = _task_manager(dirs, False).task_index
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        entry = index.get(name)
        if entry is None:
            return False
        if entry.kind.name != "GROUP":
            continue
        for member in (entry.cfg or {}).get("task", []) or []:
            if isinstance(member, str):
                todo.append(member)
            elif isinstance(member, dict) and "group" not in member and isinstance(member.get("task"), str) \
                    and "dataset_path" not in member:
                todo.append(member["task"])  # a member named with overrides: still resolved by name
            else:  # an inline task or group: its needs are not read here, so keep lm-eval's index
                return False
    return True


def unknown_tasks(names: list[str]) -> list[str]:
    """One message per name lm-eval does not know, with the closest known names."""
    known = task_manager(names).all_tasks
    if any(name not in known for name in names):  # a did-you-mean over every task lm-eval knows
        known = task_manager().all_tasks
    problems = []
    for i, name in enumerate(names):
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            problems.append(f"eval.tasks[{i}]: unknown lm-eval task or group '{name}'{hint}")
    return problems


def check_eval_tasks(eval_cfg: EvalConfig, source: str, console: Any = None) -> None:
    """Every task is known to lm-eval, and the report can classify it (before anything trains).
    An AlpacaEval member without a judge is announced as skipped (on `console`, when given)."""
    problems = unknown_tasks(eval_cfg.tasks)
    if problems:
        raise RecipeError([f"{source}: {p}" for p in problems])
    problems = unclassified_tasks(eval_cfg.tasks)
    if problems:
        raise TaskSemanticsError([f"{source}: {p}" for p in problems])
    problems = limit_problems_of(eval_cfg)
    if problems:
        raise RecipeError([f"{source}: {p}" for p in problems])
    from cft_adapters import alpacaeval

    if eval_cfg.judge is not None and alpacaeval.judged_tasks(list(eval_cfg.tasks)):
        alpacaeval.check_judge(eval_cfg.judge, source)
    if console is not None:
        from rich.markup import escape

        for task, why in skipped_tasks(eval_cfg).items():
            console.print(f"[yellow]{task} skipped: {escape(why)}; EA is averaged without AlpacaEval[/]")


def limit_problems_of(eval_cfg: EvalConfig) -> list[str]:
    from cft_adapters.eval_cost import limit_problems
    from cft_adapters.task_semantics import classify

    if not eval_cfg.limits:
        return []
    paths: dict[str, tuple[str, ...]] = {}
    classify(list(eval_cfg.tasks), paths=paths)
    return limit_problems(eval_cfg.limits, paths)


def skipped_tasks(eval_cfg: EvalConfig) -> dict[str, str]:
    """The requested AlpacaEval members that cannot be judged, with why: no judge is configured, or
    a limit leaves fewer examples than the length-controlled win rate's fit needs."""
    from cft_adapters import alpacaeval
    from cft_adapters.eval_cost import examples_limit

    judged = alpacaeval.judged_tasks(list(eval_cfg.tasks))
    if not judged:
        return {}
    from cft_adapters.extras import install_hint, missing

    if missing("alpaca"):
        return dict.fromkeys(judged, f"AlpacaEval's judging needs the 'alpaca' extra ({install_hint('alpaca')})")
    if eval_cfg.judge is None:  # a recipe's judge only: CFT_JUDGE_MODEL is for the stock lm_eval CLI
        why = "AlpacaEval needs a judge and eval.judge is not set (a local model, or an OpenAI-compatible endpoint)"
        return dict.fromkeys(judged, why)
    out = {}
    for task in judged:
        n = examples_limit((task,), eval_cfg.limits, eval_cfg.limit)  # a fraction: size unknown here, not refused
        if n is not None and n < alpacaeval.MIN_ITEMS:
            out[task] = (f"a limit of {n} examples is below the {alpacaeval.MIN_ITEMS} the length-controlled win rate's "
                         f"cross-validated fit needs")
    return out


def scored_tasks(eval_cfg: EvalConfig) -> list[str]:
    """The tasks lm-eval runs: the requested ones less those `skipped_tasks` names."""
    skipped = skipped_tasks(eval_cfg)
    return [name for name in eval_cfg.tasks if name not in skipped]


def training_precision(model: ModelConfig) -> str:
    """The precision the training base is held in: 'nf4', or the compute dtype's short name."""
    if model.quantization == "nf4":
        return "nf4"
    from cft_adapters.hf_configs import compute_dtype

    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[str(compute_dtype(model)).removeprefix("torch.")]


def eval_model_config(model: ModelConfig, precision: str) -> ModelConfig:
    """The recipe's model section, changed to load the base at `precision` for scoring."""
    if precision == "nf4":
        return model.model_copy(update={"quantization": "nf4"})
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    return model.model_copy(update={"quantization": "none", "compute_dtype": dtype})


@dataclass
class EvalOutcome:
    metrics: dict[str, dict[str, float]]
    groups: dict[str, list[str]]
    seconds: float
    results_file: Path


class CheckpointScorer:
    """Scores the base and phase adapters on one loaded base by swapping adapter weights in place."""

    def __init__(self, eval_cfg: EvalConfig, tokenizer: Any, base: Any, peft_model: Any = None):
        self.eval_cfg = eval_cfg
        self.tokenizer = tokenizer
        self.base = base
        self.peft_model = peft_model

    @contextlib.contextmanager
    def model_for(self, adapter_dir: Path | None) -> Iterator[Any]:
        if adapter_dir is None:
            if self.peft_model is None:
                yield self.base
            else:
                with self.peft_model.disable_adapter():
                    yield self.peft_model
            return
        if self.peft_model is None:  # at the dtype it was saved (and trained) in, as cft-train scores it
            self.peft_model = modeling.load_adapter(self.base, adapter_dir, trainable=False)
        else:
            modeling.load_adapter_weights(self.peft_model, adapter_dir)
        yield self.peft_model

    def score(self, adapter_dir: Path | None, out_dir: Path) -> EvalOutcome:
        """Evaluate, write lm-eval's results JSON (and samples) to `out_dir`, return the summary."""
        with self.model_for(adapter_dir) as model:
            results = run_lm_eval(model, self.tokenizer, self.eval_cfg)
        path = write_results(results, out_dir)
        return EvalOutcome(summarize(results), group_members(results), results["cft_eval_seconds"], path)


def run_lm_eval(model: Any, tokenizer: Any, eval_cfg: EvalConfig) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from cft_adapters import alpacaeval

    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=eval_cfg.batch_size)
    started = time.perf_counter()
    limit = eval_cfg.limit if eval_cfg.limit is None or eval_cfg.limit < 1 else int(eval_cfg.limit)
    names = scored_tasks(eval_cfg)
    manager = task_manager(names)
    tasks: list[Any] = list(names)
    samples = None
    if eval_cfg.limits:  # per-task limits: lm-eval takes them as the documents to score per leaf task
        tasks, loaded = load_tasks(names, manager)  # built once: simple_evaluate takes the objects
        samples, limit = leaf_samples_of(loaded, eval_cfg), None
    try:
        with alpacaeval.judging(eval_cfg.judge):
            results = simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                num_fewshot=eval_cfg.num_fewshot,
                limit=limit,
                samples=samples,
                apply_chat_template=eval_cfg.apply_chat_template,
                log_samples=eval_cfg.log_samples,
                bootstrap_iters=eval_cfg.bootstrap_iters,
                random_seed=0,
                numpy_random_seed=1234,
                torch_random_seed=1234,
                fewshot_random_seed=1234,
            )
    finally:
        model.train(was_training)
    results["cft_eval_seconds"] = round(time.perf_counter() - started, 3)
    return results


def load_tasks(names: Sequence[str], manager: Any) -> tuple[list[Any], dict[str, Any]]:
    """The tasks and groups `names` stand for, built once (their documents are read as they are
    built): the top-level Task/Group objects for `simple_evaluate`, which takes them as they are,
    and lm-eval's flat {tasks, groups, group_map}. A name that is neither a task nor a group (a tag)
    leaves the names themselves to be loaded again."""
    loaded = manager.load(list(names))
    top = [loaded["groups"].get(n, loaded["tasks"].get(n)) for n in names]
    return (top if all(t is not None for t in top) else list(names)), loaded


def leaf_samples(tasks: list[str], eval_cfg: EvalConfig) -> dict[str, list[int]]:
    """`leaf_samples_of` the loaded `tasks`."""
    return leaf_samples_of(task_manager(tasks).load(list(tasks)), eval_cfg)


def leaf_samples_of(loaded: dict[str, Any], eval_cfg: EvalConfig) -> dict[str, list[int]]:
    """{leaf task: the first n document indices} for lm-eval's `samples`: n is the leaf's limit in
    `eval_cfg.limits` (eval_cost.limit_for, matched on the leaf and the groups above it), else
    `eval_cfg.limit`; leaves with neither are scored whole (left out)."""
    from cft_adapters.eval_cost import examples_limit

    parent = {child: group for group, children in loaded["group_map"].items() for child in children}

    def above(name: str) -> tuple[str, ...]:
        chain: list[str] = []
        while name in parent and parent[name] not in chain:
            name = parent[name]
            chain.append(name)
        return tuple(chain)

    out: dict[str, list[int]] = {}
    for name, task in loaded["tasks"].items():
        size = len(task.eval_docs)
        n = examples_limit((name, *above(name)), eval_cfg.limits, eval_cfg.limit, size)
        if n is not None:
            out[name] = list(range(min(n, size)))
    return out


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    """lm-eval's own files: results_<timestamp>.json and samples_<task>_<timestamp>.jsonl."""
    from lm_eval.utils import handle_non_serializable

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S.%f")
    samples = results.pop("samples", None)
    path = out_dir / f"results_{stamp}.json"
    write_atomic(path, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    for task, rows in (samples or {}).items():
        text = "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows)
        write_atomic(out_dir / f"samples_{task}_{stamp}.jsonl", text)
    return path


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task_or_group: {metric: value}} from lm-eval's results (filter suffix dropped when 'none')."""
    out: dict[str, dict[str, float]] = {}
    for name, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else f"{metric},{filt}"] = float(value)
        out[name] = row
    return out


def group_members(results: dict[str, Any]) -> dict[str, list[str]]:
    return {group: list(children) for group, children in results.get("group_subtasks", {}).items()}
