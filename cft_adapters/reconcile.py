"""A recipe against the run directory it points to: which phases go on, which are kept as they are,
and which are refused or moved aside, decided before any model is loaded.

- A finished phase under the same settings (`phase_config_digest`) is kept; its adapter is verified.
- A finished phase under other settings is refused: it is never retrained in place.
- An unfinished phase under the same settings goes on (resumes from its checkpoints).
- An unfinished phase under other settings starts over; what it left is moved aside, never deleted.
- Scores made under other eval settings are refused (a report compares phases scored one way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cft_adapters import modeling
from cft_adapters.data import source_fingerprint
from cft_adapters.errors import RunError
from cft_adapters.manifest import RESOLVED_RECIPE, PhaseRecord, RunManifest
from cft_adapters.recipe import Recipe, format_loc
from cft_adapters.rundir import RunDirectory, verify_adapter
from cft_adapters.util.digest import canonical_json, short_digest


def phase_config_digest(recipe: Recipe, k: int) -> str:
    """Everything that determines phase k's adapter: the model, the adapter, and phases 1..k, with
    the content of every data source they read (a file edited in place is another phase)."""
    payload = {
        "model": recipe.model.model_dump(mode="json"),
        "adapter": recipe.adapter.model_dump(mode="json"),
        # The template a tokenizer without one trains under (changing it changes every such phase).
        "fallback_template": short_digest(modeling.FALLBACK_CHAT_TEMPLATE),
        "phases": [
            {
                **_without_new_defaults(recipe.run_phases()[i].model_dump(mode="json", exclude={"training"})),
                "training": recipe.phase_training(i).model_dump(mode="json", exclude=TRACKING_FIELDS),
                "content": [_content(src) for src in _sources(recipe.run_phases()[i])],
            }
            for i in range(k)
        ],
    }
    return short_digest(canonical_json(payload))


def base_config_digest(recipe: Recipe) -> str:
    """What the base's own (phase 0) scores depend on besides the eval settings: the model section
    and the template a tokenizer without one is scored under."""
    return short_digest(canonical_json({"model": recipe.model.model_dump(mode="json"),
                                        "fallback_template": short_digest(modeling.FALLBACK_CHAT_TEMPLATE)}))


# Fields added to a phase's schema after runs were made, with their defaults: left out of the digest
# while at the default, so a run made before they existed keeps its digest (and resumes).
NEW_DATASET_FIELDS = {"conversations_column": "conversations"}
TRACKING_FIELDS = {"report_to", "project", "run_name"}  # where curves are logged changes no adapter
NEW_REPLAY_FIELDS = {"translate": None}


def _without_new_defaults(phase: dict[str, Any]) -> dict[str, Any]:
    def trim(d: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if not (k in new and v == new[k])}

    out = {**phase, "datasets": [trim(d, NEW_DATASET_FIELDS) for d in phase.get("datasets", [])]}
    replay = phase.get("replay")
    if isinstance(replay, dict):
        out["replay"] = trim(replay, NEW_REPLAY_FIELDS)
        for key in ("prompts", "source"):
            if isinstance(replay.get(key), dict):
                out["replay"][key] = trim(replay[key], NEW_DATASET_FIELDS)
    return out


def _sources(phase: Any) -> list[Any]:
    replay = phase.replay
    extra = [s for s in (getattr(replay, "prompts", None), getattr(replay, "source", None)) if s is not None] if replay else []
    return [*phase.datasets, *extra]


def _content(src: Any) -> dict[str, Any] | None:
    """A source's content: size and sha256 of a file, the commit a hub source resolved to. An
    unresolved hub source adds nothing (its id and revision are in the recipe part already)."""
    fingerprint = source_fingerprint(src)
    return None if fingerprint.get("kind") == "hub" and not fingerprint.get("resolved") else fingerprint


def changed_keys(old: Any, new: Any, path: tuple[Any, ...] = ()) -> list[str]:
    """The key paths (`phases[1].training.learning_rate`) where two recipe dumps differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(key), new.get(key), (*path, key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in changed_keys(a, b, (*path, i))]
    return [] if old == new else [format_loc(path) or "(top level)"]


def phase_records(recipe: Recipe, old: RunManifest | None, rundir: RunDirectory, console: Any) -> list[PhaseRecord]:
    """One record per phase (0 = the base) for a run of `recipe` in `rundir`, given what `old`
    (its run.json, or None) recorded there. Raises RunError for a finished phase it would change.
    The base's record carries `base_config_digest`: when the model changed (nothing finished after
    it, or that phase would be refused), its scores are another model's and are moved aside."""
    phases = recipe.run_phases()
    records = []
    for k in range(len(phases) + 1):
        name = "base" if k == 0 else phases[k - 1].name
        digest = base_config_digest(recipe) if k == 0 else phase_config_digest(recipe, k)
        prior = old.phases[k] if old is not None and k < len(old.phases) else None
        same = prior is not None and prior.name == name and prior.config_digest == digest
        if prior is not None and prior.status == "done" and k > 0:
            if not same:
                raise RunError(mismatch_message(rundir.path, recipe, prior))
            verify_adapter(rundir.path, prior)  # a finished adapter is checked before anything uses it
            records.append(prior)
        elif prior is not None and (k == 0 or same):
            records.append(prior)  # the base, or an unfinished phase under the same settings: its record goes on
        elif prior is not None:
            # What an unfinished phase derived from other settings (checkpoints, replay pool,
            # placement, an unrecorded adapter) is moved aside together, never reused or deleted.
            aside = rundir.move_derived_aside(prior, "stale")
            if aside is not None:
                console.print(f"phase {k} '{prior.name}': settings changed; what its unfinished attempt "
                              f"left was moved to {aside}")
            records.append(PhaseRecord(index=k, name=name, config_digest=digest))
        else:
            records.append(PhaseRecord(index=k, name=name, config_digest=digest, status="done" if k == 0 else "pending"))
    if old is not None:
        for extra in old.phases[len(records):]:
            if extra.status == "done":
                raise RunError(mismatch_message(rundir.path, recipe, extra))
    base = records[0]
    if base.config_digest is None:  # a run made before the base had a digest: taken as this base's
        base.config_digest = digest_0 = base_config_digest(recipe)
    elif base.config_digest != (digest_0 := base_config_digest(recipe)):  # refused above if a phase was finished
        aside = rundir.move_derived_aside(base, "stale")
        console.print(f"phase 0 'base': the model section changed; the old base's scores were moved to {aside} "
                      "and the new base is scored" if aside else "phase 0 'base': the model section changed; "
                      "the new base is scored")
        records[0] = PhaseRecord(index=0, name="base", config_digest=digest_0, status="done")
    return records


def refuse_other_eval_settings(run_dir: Path, old: RunManifest, wanted: dict[str, Any]) -> None:
    """Scores are only ever compared when produced the same way: a run scored under other eval
    settings is not silently mixed with (or relabelled as) the new ones."""
    scored = [r for r in old.phases if r.eval_status == "done" and r.eval_settings is not None]
    differ = [r for r in scored if r.eval_settings != wanted]
    if not differ:
        return
    recorded = differ[0].eval_settings or {}
    changed = [f"eval.{key}: {recorded.get(key)!r} -> {wanted[key]!r}" for key in wanted if recorded.get(key) != wanted[key]]
    phases = ", ".join(f"{r.index} '{r.name}'" for r in differ)
    raise RunError(
        f"{run_dir}: phase(s) {phases} were scored with other evaluation settings ({'; '.join(changed)}). "
        f"A run's report compares phases scored one way: keep the run's eval settings here, and score "
        f"others with cft-eval {run_dir} (it writes a separate, labelled result set)."
    )


def mismatch_message(run_dir: Path, recipe: Recipe, prior: PhaseRecord) -> str:
    changed: list[str] = []
    resolved = run_dir / RESOLVED_RECIPE
    if resolved.is_file():
        try:
            changed = changed_keys(yaml.safe_load(resolved.read_text(encoding="utf-8")), recipe.model_dump(mode="json"))
        except (OSError, ValueError, yaml.YAMLError):  # a damaged copy only loses the detail
            changed = []
    detail = (f" (changed keys: {', '.join(changed[:8])})" if changed
              else " (same settings, but the content of a data file it reads has changed)")
    return (
        f"{run_dir}: phase {prior.index} '{prior.name}' is finished there with a different recipe"
        f"{detail}. A finished phase is never retrained in place: use a new output_dir "
        f"(e.g. output_dir={run_dir}-2)."
    )
