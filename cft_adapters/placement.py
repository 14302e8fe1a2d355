"""Layer freezing as adapter placement: which layers' LoRA adapters train in a phase.

With a frozen 4-bit base, "freezing a layer" means its adapters do not train in that phase. The
strategies are pure functions over layer counts and per-layer scores, testable without training:

- explicit: the listed layers are frozen.
- random (the paper's LF_H1): a seeded random choice of layers.
- most_changed (LF_H2): the layers whose adapter update moved most during a reference phase. Our
  definition, since the paper leaves it loose: per layer, the sum over its adapted modules of
  ‖scale · (B_end·A_end − B_start·A_start)‖_F, where start/end are the adapter before and after the
  reference phase (a fresh adapter starts at B = 0, so its update starts at zero).
- reference_change (LF_H2 on the Instruct pair): the layers whose weights moved most, relative to
  their size, between two reference checkpoints (a vendor base and its Instruct model). The scan is
  in reference_change.py; it needs no earlier phase, so it works in the first one.
- spectrum: per layer, the mean signal-to-noise ratio of its base weight matrices (Spectrum,
  Hartford et al. 2024): singular values above the Marchenko–Pastur bound are signal, the rest noise,
  with the noise scale estimated from the singular values' interquartile range. The lowest-SNR layers
  are frozen, so the highest-SNR share trains. Spectrum's released code further divides by the
  largest singular value; that makes the score depend on the matrix's scale (it ranked pure noise
  above low-rank signal plus noise in our check), so we use the scale-free ratio.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from cft_adapters.errors import CftError
from cft_adapters.recipe import PlacementConfig, parse_layers  # noqa: F401  (parse_layers: also used here)
from cft_adapters.util.digest import short_digest

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class Placement:
    """A phase's choice, with the evidence for it (written to placement.json and run.json)."""

    strategy: str
    num_layers: int
    frozen: list[int]
    trainable: list[int]
    modules: list[str] | None = None
    score_name: str | None = None
    scores: dict[int, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["scores"] = {str(k): v for k, v in self.scores.items()}
        return data


# -- choosing -------------------------------------------------------------------------------------


def explicit_frozen(cfg: PlacementConfig, num_layers: int | None) -> list[int]:
    """The layers an explicit placement freezes, checked against the layer count when known."""
    frozen = parse_layers(cfg.layers or [], num_layers)
    if num_layers is not None and len(frozen) >= num_layers:
        raise ValueError(f"freezing all {num_layers} layers leaves nothing to train")
    return frozen


def random_seed(cfg: PlacementConfig, training_seed: int) -> int:
    return cfg.seed if cfg.seed is not None else training_seed


def count_to_freeze(cfg: PlacementConfig, num_layers: int) -> int:
    n = cfg.count if cfg.count is not None else round(float(cfg.fraction or 0) * num_layers)
    if n < 1:
        raise ValueError(f"fraction {cfg.fraction} of {num_layers} layers freezes none; raise it or use count")
    if n >= num_layers:
        raise ValueError(f"freezing {n} of {num_layers} layers leaves nothing to train")
    return n


def select_layers_random(num_layers: int, n: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(num_layers), n))


def select_layers_most_changed(delta_norms: dict[int, float], n: int) -> list[int]:
    """The n layers with the largest adapter-update change (ties: lower index first)."""
    return sorted(sorted(delta_norms, key=lambda i: (-delta_norms[i], i))[:n])


def select_layers_spectrum(snr: dict[int, float], n: int) -> list[int]:
    """The n layers with the lowest SNR (ties: lower index first)."""
    return sorted(sorted(snr, key=lambda i: (snr[i], i))[:n])


# -- scores ---------------------------------------------------------------------------------------


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _module_of(name: str) -> str:
    """'...layers.3.self_attn.q_proj.lora_A.weight' -> 'q_proj'."""
    return name.split(".lora_")[0].rsplit(".", 1)[-1]


def lora_updates(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """{module path: scale·B·A} from a PEFT adapter state dict (lora_A / lora_B pairs)."""
    out = {}
    for name, a in state.items():
        if ".lora_A." not in name:
            continue
        b = state[name.replace(".lora_A.", ".lora_B.")]
        out[name.split(".lora_A.")[0]] = scale * (b.float() @ a.float())
    return out


def layer_delta_norms(
    start: dict[str, torch.Tensor] | None, end: dict[str, torch.Tensor], scale: float,
    num_layers: int, modules: list[str] | None = None,
) -> dict[int, float]:
    """Per layer: sum over adapted modules of ‖scale·(B_e A_e − B_s A_s)‖_F (start None: zero)."""
    after = lora_updates(end, scale)
    before = lora_updates(start, scale) if start is not None else {}
    norms = {i: 0.0 for i in range(num_layers)}
    for path, update in after.items():
        layer = layer_of(path + ".")
        if layer is None or (modules and path.rsplit(".", 1)[-1] not in modules):
            continue
        delta = update - before[path] if path in before else update
        norms[layer] += float(torch.linalg.matrix_norm(delta))
    return norms


def matrix_snr(weight: torch.Tensor) -> float:
    """Σ singular values above the Marchenko–Pastur bound / Σ those below it."""
    s = torch.linalg.svdvals(weight.float())
    m, n = weight.shape
    beta = min(m, n) / max(m, n)
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    threshold = sigma * (1 + beta**0.5)
    signal, noise = s[s > threshold].sum(), s[s <= threshold].sum()
    return float(signal / noise) if noise > 0 else float("inf")


def _dense_weight(module: Any) -> torch.Tensor:
    """The module's weight in floating point; NF4 weights are dequantized."""
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, quant_state)
    return weight.data


def spectrum_scan(base: Any, target_modules: list[str], cache_key: str, cache_root: Path) -> dict[str, Any]:
    """Per-layer mean SNR over the target modules of the base; cached per base model."""
    digest = short_digest(json.dumps([cache_key, sorted(target_modules), 1]))
    cache = cache_root / "spectrum" / f"{digest}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from cft_adapters.util.fs import file_lock, write_atomic

    with file_lock(cache.with_suffix(".lock")):  # one scan per base, however many processes ask
        if cache.is_file():
            return json.loads(cache.read_text())
        result = _scan(base, target_modules, cache_key)
        write_atomic(cache, json.dumps(result, indent=1))
    return result


def _scan(base: Any, target_modules: list[str], cache_key: str) -> dict[str, Any]:
    started = time.perf_counter()
    per_layer: dict[int, list[float]] = {}
    for name, module in base.named_modules():
        layer = layer_of(name + ".")
        if layer is None or name.rsplit(".", 1)[-1] not in target_modules or getattr(module, "weight", None) is None:
            continue
        dense = _dense_weight(module)
        if dense.ndim == 2:
            per_layer.setdefault(layer, []).append(matrix_snr(dense))
    return {
        "snr": {str(k): sum(v) / len(v) for k, v in sorted(per_layer.items())},
        "seconds": round(time.perf_counter() - started, 3),
        "base": cache_key,
    }


# -- applying -------------------------------------------------------------------------------------


def apply_placement(peft_model: Any, placement: Placement | None) -> int:
    """Set requires_grad on every LoRA parameter for this phase; return the trainable count."""
    frozen = set(placement.frozen) if placement else set()
    modules = set(placement.modules) if placement and placement.modules else None
    total = 0
    for name, param in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        layer = layer_of(name)
        freeze = layer in frozen and (modules is None or _module_of(name) in modules)
        param.requires_grad_(not freeze)
        total += 0 if freeze else param.numel()
    return total


# -- the strategies ---------------------------------------------------------------------------
#
# Every value of PlacementConfig.strategy has exactly one entry here (a test checks the keys against
# the schema's Literal): a new strategy is an entry, and a schema value without one fails that test
# instead of falling through to another strategy.


@dataclass
class PlacementInputs:
    """What a strategy may read when the phase starts. The runner fills it; the evidence that costs
    something (a Spectrum scan of the base, an earlier adapter's change) is computed only on demand."""

    cfg: PlacementConfig
    num_layers: int
    seed: int  # the phase's training seed
    modules: list[str] | None
    spectrum: Callable[[], dict[str, Any]] | None = None  # spectrum_scan of the base, cached
    adapter_change: Callable[[], tuple[dict[int, float], dict[str, Any]]] | None = None  # LF_H2 evidence
    reference_change: Callable[[], tuple[dict[int, float], dict[str, Any]]] | None = None  # LF_H2, reference pair


Choice = tuple[list[int], dict[int, float], "str | None", dict[str, Any]]  # frozen, scores, score name, detail


@dataclass(frozen=True)
class Strategy:
    needs_count: bool  # 'fraction' or 'count' says how many layers to freeze
    needs_reference: bool  # reads an earlier trained phase of the run
    choose: Callable[[PlacementInputs], Choice] | None  # None: no placement at all
    dry_run: Callable[[PlacementConfig, int | None, int], str]  # what --dry-run can say before training
    summary: str
    needs_checkpoints: bool = False  # reads two reference checkpoints ('reference'), not the run


def _explicit(x: PlacementInputs) -> Choice:
    return explicit_frozen(x.cfg, x.num_layers), {}, None, {}


def _random(x: PlacementInputs) -> Choice:
    seed = random_seed(x.cfg, x.seed)
    return select_layers_random(x.num_layers, count_to_freeze(x.cfg, x.num_layers), seed), {}, None, {"seed": seed}


def _most_changed(x: PlacementInputs) -> Choice:
    assert x.adapter_change is not None
    scores, detail = x.adapter_change()
    return select_layers_most_changed(scores, count_to_freeze(x.cfg, x.num_layers)), scores, "adapter_update_change_fro", detail


def _reference_change(x: PlacementInputs) -> Choice:
    assert x.reference_change is not None
    scores, detail = x.reference_change()
    return select_layers_most_changed(scores, count_to_freeze(x.cfg, x.num_layers)), scores, "relative_weight_change_fro", detail


def _spectrum(x: PlacementInputs) -> Choice:
    assert x.spectrum is not None
    scan = x.spectrum()
    scores = {int(layer): value for layer, value in scan["snr"].items()}
    frozen = select_layers_spectrum(scores, count_to_freeze(x.cfg, x.num_layers))
    return frozen, scores, "snr", {"scan_seconds": scan["seconds"], "cache": "spectrum/"}


def _later(cfg: PlacementConfig, num_layers: int | None, seed: int) -> str:
    if num_layers is None:
        return f"{cfg.strategy} (layer count unknown until the model config is available)"
    return f"{cfg.strategy}: freeze {count_to_freeze(cfg, num_layers)} of {num_layers} layers (chosen when the phase starts)"


def _reference_later(cfg: PlacementConfig, num_layers: int | None, seed: int) -> str:
    ref = cfg.reference
    assert ref is not None

    def named(name: str, revision: str | None) -> str:
        return name + (f"@{revision}" if revision else "")

    how_many = (f"freeze {count_to_freeze(cfg, num_layers)} of {num_layers} layers" if num_layers is not None
                else "freeze a share of the layers (layer count unknown until the model config is available)")
    return (f"reference_change: {how_many}, those whose weights changed most (relative to the base weights) from "
            f"{named(ref.base, ref.base_revision)} to {named(ref.tuned, ref.tuned_revision)}; read when the phase starts")


def _random_now(cfg: PlacementConfig, num_layers: int | None, seed: int) -> str:
    if num_layers is None:
        return _later(cfg, num_layers, seed)
    return f"random: freeze {select_layers_random(num_layers, count_to_freeze(cfg, num_layers), random_seed(cfg, seed))}"


STRATEGIES: dict[str, Strategy] = {
    "none": Strategy(False, False, None, lambda cfg, n, seed: "none", "no freezing: every layer trains"),
    "explicit": Strategy(False, False, _explicit, lambda cfg, n, seed: f"explicit: freeze {explicit_frozen(cfg, n)}",
                         "freeze the listed layers"),
    "random": Strategy(True, False, _random, _random_now, "LF_H1: freeze a seeded random set of layers"),
    "most_changed": Strategy(True, True, _most_changed, _later,
                             "LF_H2: freeze the layers whose adapter update changed most in an earlier phase"),
    "reference_change": Strategy(True, False, _reference_change, _reference_later,
                                 "LF_H2 from a reference pair: freeze the layers whose weights changed most between "
                                 "two checkpoints (e.g. a vendor base and its Instruct model)", needs_checkpoints=True),
    "spectrum": Strategy(True, False, _spectrum, _later, "Spectrum: freeze the layers with the lowest weight SNR"),
}


def choose_placement(x: PlacementInputs) -> Placement | None:
    """The phase's placement by its strategy's rule (None for 'none')."""
    strategy = STRATEGIES[x.cfg.strategy]
    if strategy.choose is None:
        return None
    frozen, scores, score_name, detail = strategy.choose(x)
    trainable = [i for i in range(x.num_layers) if i not in frozen]
    return Placement(x.cfg.strategy, x.num_layers, frozen, trainable, x.modules, score_name, scores, detail)


def describe_for_dry_run(cfg: PlacementConfig, num_layers: int | None, seed: int) -> str:
    """What --dry-run can say without training: the layers for explicit/random, the rule otherwise."""
    try:
        return STRATEGIES[cfg.strategy].dry_run(cfg, num_layers, seed)
    except ValueError as exc:
        raise CftError(str(exc)) from None


def num_layers_from_config(model: Any) -> int | None:
    """The layer count from the model config alone (no weights), or None where that needs the hub."""
    from cft_adapters.recipe import BUILTIN_PREFIX
    from cft_adapters.tiny import BUILTIN_MODELS

    name = model.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        spec = BUILTIN_MODELS.get(name.removeprefix(BUILTIN_PREFIX))
        return spec["num_hidden_layers"] if spec else None
    if model.gguf_file:
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except Exception:  # offline, gated, or not a model: the caller says "unknown"
        return None
    return config.get_text_config().num_hidden_layers


def adapter_change_scores(
    run_dir: Path, records: list[Any], phase_names: list[str], cfg: PlacementConfig, k: int, scale: float,
    num_layers: int, modules: list[str] | None,
) -> tuple[dict[int, float], dict[str, Any]]:
    """LF_H2 evidence for phase k: the per-layer change of the adapter update over the reference
    phase (cfg.reference_phase, else phase k-1), read from the adapters that phase started and ended with."""
    from safetensors.torch import load_file

    ref = phase_names.index(cfg.reference_phase) + 1 if cfg.reference_phase else k - 1
    if ref < 1 or records[ref].status != "done":
        raise ValueError(f"'most_changed' needs phase {ref} ('{phase_names[ref - 1]}') finished first")
    end_dir = run_dir / records[ref].dirname / "adapter"
    start_dir = run_dir / records[ref - 1].dirname / "adapter" if ref > 1 else None
    scores = layer_delta_norms(
        load_file(str(start_dir / "adapter_model.safetensors")) if start_dir else None,
        load_file(str(end_dir / "adapter_model.safetensors")), scale, num_layers, modules,
    )
    detail = {"reference_phase": phase_names[ref - 1], "start": str(start_dir.relative_to(run_dir)) if start_dir else None,
              "end": str(end_dir.relative_to(run_dir)), "scale": scale}
    return scores, detail


def check_placements(recipe: Any, source: str) -> None:
    """Placement errors the model config can reveal (layer ranges, fractions) before any training."""
    if not any(p.placement and p.placement.strategy != "none" for p in recipe.phases):
        return
    num_layers = num_layers_from_config(recipe.model)
    problems = []
    for i, phase in enumerate(recipe.phases):
        if phase.placement is not None:
            try:
                describe_for_dry_run(phase.placement, num_layers, recipe.phase_training(i).seed)
            except CftError as exc:
                problems.append(f"{source}: phases[{i}].placement: {exc}")
    if problems:
        raise CftError(problems)
