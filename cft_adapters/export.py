"""`cft export RUN_DIR OUT`: one phase's adapter merged into a plain copy of the base, saved as an
ordinary transformers checkpoint (safetensors) with its tokenizer and a model card; or, with
`--adapter-only`, the adapter itself with the card. `--push-to-hub REPO` uploads the result.

The adapter is checked against the digest recorded when it was saved. The base is loaded unquantized
(bf16 or fp32) and the adapter merged with PEFT's `merge_and_unload`. An adapter trained on an NF4
base therefore lands on the unquantized weights; the card says so. The output folder is written
beside its final name and renamed into place, so a failed export leaves no half-written checkpoint,
and an existing folder is never overwritten.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from cft_adapters.errors import CftError
from cft_adapters.manifest import PhaseRecord, RunManifest
from cft_adapters.rundir import checked_manifest, run_settings, verify_adapter
from cft_adapters.tasks_path import use_include_paths

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def pick_phase(manifest: RunManifest, run_dir: Path, phase: int | None) -> PhaseRecord:
    done = [r for r in manifest.phases if r.index > 0 and r.status == "done"]
    if not done:
        raise CftError(f"{run_dir}: no finished phase to export")
    if phase is None:
        return done[-1]
    found = next((r for r in done if r.index == phase), None)
    if found is None:
        raise CftError(f"--phase {phase}: not a finished phase of {run_dir} (finished: {', '.join(str(r.index) for r in done)})")
    return found


def export(run_dir: Path, out: Path, *, phase: int | None = None, dtype: str = "bf16", adapter_only: bool = False,
           push_to_hub: str | None = None, allow_remote_code: bool = False, console: Console | None = None) -> Path:
    console = console or Console()
    out = out.resolve()
    if out.exists():
        raise CftError(f"{out}: already exists; export to a new folder (an export is never overwritten)")
    manifest = checked_manifest(run_dir)
    record = pick_phase(manifest, run_dir, phase)
    adapter_dir = verify_adapter(run_dir, record)
    model_cfg, eval_cfg = run_settings(run_dir, allow_remote_code=allow_remote_code)
    use_include_paths(eval_cfg.include_path)
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        if adapter_only:
            for item in adapter_dir.iterdir():
                if item.is_file():
                    shutil.copy2(item, staging / item.name)
        else:
            _merge(model_cfg, adapter_dir, staging, dtype, console)
        (staging / "README.md").write_text(model_card(run_dir, manifest, record, model_cfg, eval_cfg.tasks,
                                                      merged=not adapter_only, dtype=dtype), encoding="utf-8")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    console.print(f"exported phase {record.index} '{record.name}' of {run_dir} to {out}"
                  + ("" if adapter_only else f" (merged into the base, {dtype})"))
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=push_to_hub)
        console.print(f"pushed {out} to https://huggingface.co/{push_to_hub}")
    return out


def _merge(model_cfg: Any, adapter_dir: Path, staging: Path, dtype: str, console: Console) -> None:
    from peft import PeftModel

    from cft_adapters import modeling

    cfg = model_cfg.model_copy(update={"quantization": "none", "compute_dtype": DTYPES[dtype]})
    path = modeling.resolve_model_path(cfg)
    console.print(f"loading base {model_cfg.name_or_path} ({dtype}) and merging {adapter_dir}")
    tokenizer = modeling.load_tokenizer(cfg, path)
    base = modeling.load_base_model(cfg, path)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True  # a model for inference
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)


def model_card(run_dir: Path, manifest: RunManifest, record: PhaseRecord, model_cfg: Any, tasks: list[str],
               *, merged: bool, dtype: str) -> str:
    """What produced the export: the base, each phase up to it (data, languages, placement, replay,
    tokens) and how every phase scored (the paper's aggregates)."""
    from cft_adapters import report

    phases = [r for r in manifest.phases if 0 < r.index <= record.index]
    resolved = run_dir / "recipe.resolved.yaml"
    lines = ["---", f"base_model: {model_cfg.name_or_path}", "library_name: " + ("transformers" if merged else "peft"),
             "tags: [cft-adapters, continual-fine-tuning, lora]", "---", "",
             f"# {run_dir.name}: phase {record.index} '{record.name}'", "",
             f"Made with cft-adapters from the run `{run_dir.name}` (recipe `{Path(manifest.recipe).name}`). "
             + (f"The phase's LoRA adapter merged into `{model_cfg.name_or_path}` ({dtype}, with PEFT's "
                f"merge_and_unload)." if merged else "The phase's LoRA adapter (load it on the base with PEFT)."), ""]
    if merged and model_cfg.quantization == "nf4":
        lines += ["The adapter was trained on an NF4 (4-bit) copy of the base and is merged here into its "
                  "unquantized weights, so outputs can differ slightly from the run's own scoring.", ""]
    lines += ["## Phases", "", "| phase | data | languages | placement | replay | tokens |", "|---|---|---|---|---|---:|"]
    for r in phases:
        data = r.data or {}
        languages = ", ".join(sorted((data.get("languages") or {}).keys())) if isinstance(data, dict) else ""
        sources = "; ".join(s.get("source", "") for s in data.get("sources", [])) if isinstance(data, dict) else ""
        placement = (f"{r.placement.get('strategy')}, frozen {json.dumps(r.placement.get('frozen'))}"
                     if isinstance(r.placement, dict) and r.placement else "-")
        replay = f"{r.replay['kind']} {r.replay['ratio_requested']:g}" if isinstance(r.replay, dict) and r.replay else "-"
        tokens = r.train.tokens if r.train else "-"
        lines.append(f"| {r.index} {r.name} | {sources or '-'} | {languages or '-'} | {placement} | {replay} | {tokens} |")
    if tasks:
        try:
            scores = report.paper_scores(report.phase_scores(manifest, tasks))
        except CftError:
            scores = []
        if scores:
            lines += ["", "## Scores (the run's own evaluation)", "",
                      "| phase | EA | MA | Combined |", "|---|---:|---:|---:|"]
            lines += [f"| {p.index} {p.name} | {_num(p.ea)} | {_num(p.ma)} | {_num(p.combined)} |" for p in scores
                      if p.index <= record.index]
            lines += ["", "EA: English task ability; MA: multilingual ability; Combined = (EA + MA) / 2 "
                      f"(tasks: {', '.join(tasks)}; details in the run's report.md)."]
    if resolved.is_file():
        lines += ["", "## Recipe", "", "```yaml", resolved.read_text(encoding="utf-8").rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
