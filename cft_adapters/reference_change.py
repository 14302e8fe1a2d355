"""LF_H2 evidence from a reference model pair: how far each layer's weights moved from one checkpoint
(a vendor base, e.g. Mistral-7B-v0.1) to another (its Instruct model, Mistral-7B-Instruct-v0.1).

This is the paper's setting for the Instruct pair, where phase 1 is the vendor's own instruction
tuning, so no phase of the run can supply the change. Both checkpoints are read from safetensors one
tensor slice at a time (4M elements per step), so the scan needs no GPU and little memory: about
200 MB beyond the interpreter whatever the model size (measured on a 0.9 GB pair); the files are
memory-mapped, so what was read sits in the page cache, not in the process.

The score is relative, since the paper ("freeze the most-changed layers") does not say which:
per layer, ‖W_tuned − W_base‖_F / ‖W_base‖_F, where W is the layer's target matrices (the adapter's
`target_modules`, or `placement.modules`) taken together as one vector. The norms of the weights grow
with depth, so an absolute score ranks the layers with the largest weights first even when every
layer moved by the same share. Taking the matrices together, rather than averaging per-matrix ratios,
keeps a small matrix (k_proj / v_proj under grouped-query attention) from outweighing the rest. The
absolute change is recorded beside the score, in placement.json's detail.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cft_adapters.placement import layer_of
from cft_adapters.recipe import ReferencePair, safetensors_problem
from cft_adapters.util.digest import canonical_json, short_digest

SCORE = "relative"
DEFINITION = "‖W_tuned − W_base‖_F / ‖W_base‖_F per layer, over its target matrices taken together"
_VERSION = 1  # part of the cache key: bump it when what is cached changes
_SLICE_ELEMENTS = 1 << 22  # elements read per step from each checkpoint


@dataclass(frozen=True)
class Checkpoint:
    name: str  # as the recipe has it: an absolute folder or a hub id
    revision: str | None
    folder: Path
    files: list[Path]  # the safetensors files that hold the weights
    commit: str | None  # the hub commit it resolved to (None: a local folder)

    def identity(self) -> Any:
        """What the cache is keyed by: the hub commit, or the folder with its files' sizes and mtimes."""
        if self.commit is not None:
            return ["hub", self.name, self.commit]
        index = self.folder / "model.safetensors.index.json"
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in [*self.files, *([index] if index.is_file() else [])]]
        return ["local", str(self.folder), stats]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else model.safetensors, else every
    *.safetensors. A folder without any (pickled PyTorch weights only) is refused, naming it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"{folder}: {index.name} names {missing[0]}, which is not there")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(safetensors_problem(folder))
    return files


def _snapshot(repo_id: str, revision: str | None) -> Path:
    """The hub checkpoint through huggingface_hub's cache (HF_HUB_OFFLINE: the cache only). The
    configs come first, then only the shards the index names: some repositories also ship the same
    weights again under other names (consolidated.safetensors), which would double the download."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json"]))
        index = folder / "model.safetensors.index.json"
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["*.safetensors"]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", *shards]))
    except Exception as exc:  # offline without a cached copy, gated, unknown id: one line, with the cause
        where = repo_id + (f"@{revision}" if revision else "")
        raise ValueError(f"cannot read {where} (hub or its local cache): {type(exc).__name__}: {exc}") from None


def locate(name: str, revision: str | None) -> Checkpoint:
    """A reference checkpoint: a local folder (absolute, as the schema left it) or a hub id."""
    if Path(name).is_absolute():
        folder = Path(name)
        if not folder.is_dir():
            raise ValueError(f"{folder}: folder not found")
        return Checkpoint(name, None, folder, weight_files(folder), None)
    folder = _snapshot(name, revision)
    return Checkpoint(name, revision, folder, weight_files(folder), folder.name)  # snapshots/<commit>/


def _is_target(name: str, modules: list[str]) -> bool:
    """'model.layers.3.self_attn.q_proj.weight' with q_proj in modules."""
    return name.endswith(".weight") and layer_of(name) is not None and name[: -len(".weight")].rsplit(".", 1)[-1] in modules


def _target_tensors(checkpoint: Checkpoint, modules: list[str]) -> dict[str, Path]:
    """{tensor name: file} for the target matrices of the decoder layers (reads the headers only)."""
    from safetensors import safe_open

    found: dict[str, Path] = {}
    for path in checkpoint.files:
        with safe_open(str(path), framework="pt") as fh:
            found.update({name: path for name in fh.keys() if _is_target(name, modules)})
    return found


def read_change(base: Checkpoint, tuned: Checkpoint, modules: list[str]) -> dict[int, dict[str, float]]:
    """Per layer: ‖W_tuned − W_base‖_F and ‖W_base‖_F over its target matrices, and how many there are.
    Each pair of files is opened once; each tensor is read in row slices."""
    from safetensors import safe_open

    at_base, at_tuned = _target_tensors(base, modules), _target_tensors(tuned, modules)
    if not at_tuned:
        raise ValueError(f"{tuned.folder}: no weights of modules {modules} under 'model.layers.<i>.'")
    for one, other, names in ((base, tuned, set(at_tuned) - set(at_base)), (tuned, base, set(at_base) - set(at_tuned))):
        if names:
            raise ValueError(f"{one.folder} lacks {sorted(names)[0]} ({len(names)} tensor(s) in all), which {other.folder} has")
    by_files: dict[tuple[Path, Path], list[str]] = {}
    for name in sorted(at_tuned):
        by_files.setdefault((at_base[name], at_tuned[name]), []).append(name)
    sums: dict[int, dict[str, float]] = {}
    for (base_file, tuned_file), names in sorted(by_files.items()):
        with safe_open(str(base_file), framework="pt") as fb, safe_open(str(tuned_file), framework="pt") as ft:
            for name in names:
                layer = sums.setdefault(layer_of(name), {"change_sq": 0.0, "base_sq": 0.0, "tensors": 0})  # type: ignore[arg-type]
                change_sq, base_sq = _tensor_sums(fb.get_slice(name), ft.get_slice(name), name)
                layer["change_sq"] += change_sq
                layer["base_sq"] += base_sq
                layer["tensors"] += 1
    return {i: {"change": math.sqrt(s["change_sq"]), "base_norm": math.sqrt(s["base_sq"]), "tensors": int(s["tensors"])}
            for i, s in sorted(sums.items())}


def _tensor_sums(base: Any, tuned: Any, name: str) -> tuple[float, float]:
    """Σ (W_tuned − W_base)² and Σ W_base² of one tensor, read a block of rows at a time."""
    shape = base.get_shape()
    if shape != tuned.get_shape():
        raise ValueError(f"{name}: shape {shape} in the base, {tuned.get_shape()} in the tuned checkpoint")
    per_row = math.prod(shape[1:])
    step = max(1, _SLICE_ELEMENTS // max(1, per_row))
    change_sq = base_sq = 0.0
    for start in range(0, shape[0], step):
        w_base = base[start:start + step].float()  # bf16/fp16 -> fp32 is exact; the sums run in fp64
        change_sq += float((tuned[start:start + step].float() - w_base).square().sum(dtype=torch.float64))
        base_sq += float(w_base.square().sum(dtype=torch.float64))
    return change_sq, base_sq


def reference_change_scores(
    reference: ReferencePair, modules: list[str], num_layers: int, cache_root: Path,
) -> tuple[dict[int, float], dict[str, Any]]:
    """LF_H2 evidence for the `reference_change` strategy: the relative weight change per layer, and
    the detail placement.json records. Cached under <cache>/reference_change/, keyed by both
    checkpoints (hub commit, or local files' sizes and mtimes) and the modules."""
    base, tuned = locate(reference.base, reference.base_revision), locate(reference.tuned, reference.tuned_revision)
    modules = sorted(modules)
    digest = short_digest(canonical_json([_VERSION, base.identity(), tuned.identity(), modules]))
    cache = cache_root / "reference_change" / f"{digest}.json"
    scan = _cached_scan(cache, base, tuned, modules)
    layers = {int(i): v for i, v in scan["layers"].items()}
    if sorted(layers) != list(range(num_layers)):
        raise ValueError(f"the reference checkpoints have target weights in layers {_span(sorted(layers))}, and the "
                         f"model trained here has {num_layers} layers (0-{num_layers - 1})")
    scores = {}
    for i, layer in layers.items():
        if layer["base_norm"] == 0:
            raise ValueError(f"layer {i}'s {modules} weights are all zero in {base.folder}: a relative change is undefined")
        scores[i] = layer["change"] / layer["base_norm"]
    detail = {
        "score": SCORE, "definition": DEFINITION, "modules": modules,
        "base": reference.base, "base_revision": reference.base_revision, "base_commit": base.commit,
        "tuned": reference.tuned, "tuned_revision": reference.tuned_revision, "tuned_commit": tuned.commit,
        "absolute_change": {str(i): layer["change"] for i, layer in layers.items()},
        "base_norm": {str(i): layer["base_norm"] for i, layer in layers.items()},
        "read_seconds": scan["seconds"], "cache": str(cache.relative_to(cache_root)),
    }
    return scores, detail


def _cached_scan(cache: Path, base: Checkpoint, tuned: Checkpoint, modules: list[str]) -> dict[str, Any]:
    if cache.is_file():
        return json.loads(cache.read_text())
    from cft_adapters.util.fs import file_lock, write_atomic

    with file_lock(cache.with_suffix(".lock")):  # one scan per pair, however many processes ask
        if cache.is_file():
            return json.loads(cache.read_text())
        started = time.perf_counter()
        layers = read_change(base, tuned, modules)
        scan = {"version": _VERSION, "base": base.identity(), "tuned": tuned.identity(), "modules": modules,
                "layers": {str(i): v for i, v in layers.items()}, "seconds": round(time.perf_counter() - started, 3)}
        write_atomic(cache, json.dumps(scan, indent=1))
    return scan


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers and layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
