"""The recipe: one YAML file, one pydantic model tree, every error reported at once.

Only this module and the CLI read YAML or argv. Everything below takes the typed `Recipe`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from cft_adapters.errors import RecipeError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATA_DIR = Path(__file__).parent / "data"
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
SEED_MAX = 2**32 - 1  # numpy.random.seed takes 0 .. 2**32-1; torch.manual_seed takes more, so numpy's range is the limit
PHASE_NAME = r"^[a-z0-9][a-z0-9_-]*$"  # phase names become folder names: no path separators
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Strict(BaseModel):
    # allow_inf_nan=False: YAML's .inf / .nan parse as floats, and no float of a recipe means anything infinite.
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


def _seed_in_range(value: int) -> int:
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"must be in 0 .. {SEED_MAX} (the seeds numpy and torch accept), got {value}")
    return value


Seed = Annotated[int, AfterValidator(_seed_in_range)]


# ---------------------------------------------------------------------------------------------
# model / adapter / training / eval
# ---------------------------------------------------------------------------------------------


class ModelConfig(_Strict):
    name_or_path: str = Field(
        description="Hub id, local directory, or 'builtin:tiny-mistral' (a tiny random model built "
        "locally on first use; the embedded default)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    gguf_file: str | None = Field(
        None,
        description="GGUF file inside name_or_path. It is dequantized once into a cached plain "
        "checkpoint, which is then loaded like any other (NF4 or not).",
    )
    quantization: Literal["nf4", "none"] = Field(
        "nf4", description="'nf4': QLoRA base (bitsandbytes NF4, double quantization). 'none': plain weights."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype. 'auto': bfloat16 on a GPU that supports it, else float32."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention backend; None lets transformers choose."
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code. Off unless you trust the repository."
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template used when the tokenizer has none. Default: 'fallback-chatml-eos', ChatML "
        "turns whose assistant answers end with the tokenizer's EOS (so the model learns to stop). A tokenizer's own "
        "template always wins; the template in use is recorded in run.json and beside each adapter.",
    )

    @model_validator(mode="after")
    def _revision_needs_hub(self) -> ModelConfig:
        if self.revision is not None and self.name_or_path.startswith(BUILTIN_PREFIX):
            raise ValueError("'revision' applies to hub models, not to builtin ones")
        return self


class AdapterConfig(_Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Module names that carry adapters, as a list (PEFT's layers_to_transform, used for "
        "layer placement, needs a list, not 'all-linear').",
    )


class TrainingConfig(_Strict):
    max_length: int = Field(1024, ge=8, description="Tokens per example after the chat template; longer ones are truncated.")
    per_device_train_batch_size: int = Field(4, ge=1, description="Examples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "constant", "constant_with_warmup"
    ] = Field("cosine", description="Learning-rate schedule within a phase.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the phase's steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the phase's data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps for the phase; overrides num_train_epochs.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (non-reentrant).")
    optim: Literal["adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"] = Field(
        "adamw_torch_fused", description="Optimizer. The default is the Trainer's own (fused AdamW, CPU and GPU)."
    )
    seed: Seed = Field(42, description=f"Seed for adapter init, data shuffling and dropout (0 .. {SEED_MAX}).")
    completion_only_loss: bool = Field(True, description="Loss on the answer tokens only, not on the prompt.")
    logging_steps: int = Field(10, ge=1, description="Steps between loss logs.")
    save_steps: int = Field(100, ge=1, description="Steps between resumable trainer checkpoints.")
    padding_free: bool = Field(
        False,
        description="Flatten each batch into one sequence with no padding tokens. Attention stays inside each "
        "example through position_ids (packed-sequence masks for sdpa/eager, varlen kernels for flash-attention).",
    )
    group_by_length: bool = Field(
        False, description="Batch examples of similar length together (less padding; the fallback when padding_free is off)."
    )
    use_liger_kernel: bool = Field(
        False, description="Liger kernels (fused linear + cross-entropy, RMSNorm, RoPE); GPU only, needs the 'gpu' extra."
    )
    token_budget: int | None = Field(
        None, ge=1,
        description="Train the phase on this many non-padding input tokens (replay included), then stop; the "
        "learning-rate schedule is sized to the budget. For comparing conditions at equal tokens.",
    )


def _overrides_model(base: type[BaseModel], name: str) -> type[BaseModel]:
    """The same fields as `base`, each optional with default None (per-phase overrides)."""
    fields: dict[str, Any] = {}
    for field_name, info in base.model_fields.items():
        inner = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[field_name] = (
            Optional[inner],
            Field(None, description=f"Overrides training.{field_name} for this phase. {info.description}"),
        )
    return create_model(name, __base__=_Strict, **fields)


TrainingOverrides = _overrides_model(TrainingConfig, "TrainingOverrides")


class EvalConfig(_Strict):
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval task or group names scored for phase 0 (the base) and after every phase, "
        "e.g. [cft_en, cft_ml] or [cft_smoke_en, cft_smoke_ml]. Empty: no evaluation.",
    )
    limit: float | None = Field(None, gt=0, description="Examples per task (an int), or a fraction below 1.")
    batch_size: int = Field(8, ge=1, description="lm-eval batch size.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples; None keeps each task's default.")
    apply_chat_template: bool = Field(
        True, description="Wrap prompts in the tokenizer's chat template (the models here are instruction-tuned)."
    )
    log_samples: bool = Field(False, description="Also write lm-eval's per-sample files to phase_k_<name>/eval/.")
    bootstrap_iters: int = Field(0, ge=0, description="lm-eval bootstrap iterations for stderr (0: skip, fast).")
    base_precision: Literal["nf4", "bf16", "fp32"] | None = Field(
        None,
        description="Precision of the base the adapters are scored on. None: the training base as it is "
        "in memory (no second load). Another value loads the base once more at that precision.",
    )


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


class ColumnMap(_Strict):
    prompt: str = Field(description="Column holding the user prompt.")
    response: str = Field(description="Column holding the answer to learn.")
    system: str | None = Field(None, description="Optional column holding a system prompt.")


class DatasetSource(_Strict):
    hub: str | None = Field(None, description="Hub dataset id, e.g. 'tatsu-lab/alpaca'. Exactly one of hub / path.")
    path: str | None = Field(
        None,
        description="Local json/jsonl/parquet/csv file, relative to the recipe file, or 'builtin:<file>' "
        "for data bundled with the package. Exactly one of hub / path.",
    )
    name: str | None = Field(None, description="Hub dataset config name.")
    data_files: str | list[str] | None = Field(None, description="Hub data_files (e.g. one jsonl per language).")
    split: str = Field("train", description="Split to read.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    format: Literal["alpaca", "messages", "columns"] = Field(
        "alpaca",
        description="'alpaca': instruction/input/output. 'messages': a chat list whose last turn is the "
        "assistant's answer. 'columns': explicit mapping in `columns`.",
    )
    columns: ColumnMap | None = Field(None, description="Column mapping, for format 'columns'.")
    messages_column: str = Field("messages", description="Column holding the chat list, for format 'messages'.")
    language: str | None = Field(None, description="Language tag for every example of this source (e.g. 'en').")
    language_column: str | None = Field(None, description="Column holding each example's language tag.")
    max_examples: int | None = Field(None, ge=1, description="Keep at most this many examples (seeded shuffle first).")
    fraction: float | None = Field(None, gt=0, le=1, description="Keep this share of the examples (seeded shuffle first).")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if value.startswith(BUILTIN_PREFIX):
            problem = builtin_data_problem(value)
            if problem:
                raise ValueError(problem)
            return value
        base_dir = Path((info.context or {}).get("base_dir", "."))
        resolved = (base_dir / value).expanduser().resolve() if not Path(value).is_absolute() else Path(value)
        if not resolved.is_file():
            raise ValueError(f"file not found: {resolved}")
        if resolved.suffix not in DATA_SUFFIXES:
            raise ValueError(f"expected a .json, .jsonl, .parquet or .csv file, got '{resolved.name}'")
        return str(resolved)

    @model_validator(mode="after")
    def _one_source_one_tag(self) -> DatasetSource:
        problems = source_problems(self.model_dump(exclude_unset=True))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def describe(self) -> str:
        return self.hub if self.hub is not None else str(self.path)


def source_problems(src: dict[str, Any]) -> list[str]:
    """Rules across the keys of one data source. Shared by the model validator and the raw-dict
    pass (which still runs when a field of the source is invalid, so all problems show at once)."""
    given = {k for k, v in src.items() if v is not None}
    problems = []
    if ("hub" in given) == ("path" in given):
        problems.append("set exactly one of 'hub' and 'path'")
    if ("language" in given) == ("language_column" in given):
        problems.append("set exactly one of 'language' and 'language_column'")
    fmt = src.get("format", "alpaca")
    if fmt == "columns" and "columns" not in given:
        problems.append("format 'columns' needs 'columns' (prompt, response)")
    if fmt != "columns" and "columns" in given:
        problems.append(f"'columns' is only used with format 'columns', not '{fmt}'")
    if {"max_examples", "fraction"} <= given:
        problems.append("set at most one of 'max_examples' and 'fraction'")
    hub_only = sorted(given & {"name", "data_files", "revision"} | ({"split"} if src.get("split", "train") != "train" else set()))
    if "path" in given and hub_only:
        problems.append(f"{', '.join(repr(k) for k in hub_only)} apply to 'hub' sources only (a local file has one split)")
    return problems


def builtin_data_path(value: str) -> Path:
    """`builtin:smoke/en_tasks.jsonl` -> the file inside the installed package (see builtin_data_problem)."""
    return BUILTIN_DATA_DIR / value.removeprefix(BUILTIN_PREFIX)


def builtin_data_problem(value: str) -> str | None:
    """Why `value` is not a bundled data file, or None. A builtin path stays inside the package's data
    folder (no '..', no absolute path, no symlink out) and names a data file, like a local path."""
    target = builtin_data_path(value).resolve()
    if not target.is_relative_to(BUILTIN_DATA_DIR.resolve()):
        return f"'{value}' points outside the bundled data folder (available: {', '.join(list_builtin_data())})"
    if target.suffix not in DATA_SUFFIXES:
        return f"expected a .json, .jsonl, .parquet or .csv file, got '{value}'"
    if not target.is_file():
        return f"no bundled data file '{value}' (available: {', '.join(list_builtin_data())})"
    return None


def list_builtin_data() -> list[str]:
    return sorted(BUILTIN_PREFIX + str(p.relative_to(BUILTIN_DATA_DIR)) for p in BUILTIN_DATA_DIR.rglob("*.jsonl"))


# ---------------------------------------------------------------------------------------------
# placement and replay: validated here, implemented in their own modules
# ---------------------------------------------------------------------------------------------


class PlacementConfig(_Strict):
    strategy: Literal["none", "explicit", "random", "most_changed", "spectrum"] = Field(
        description="Which layers' adapters are frozen this phase: explicit indices, random (LF_H1), "
        "most_changed (LF_H2), spectrum (lowest SNR), or none."
    )
    layers: str | list[int] | None = Field(None, description="explicit: layers to freeze, e.g. '0-7,12' or [0, 1].")
    fraction: float | None = Field(None, gt=0, lt=1, description="Share of layers to freeze.")
    count: int | None = Field(None, ge=1, description="Number of layers to freeze.")
    modules: list[str] | None = Field(None, description="Restrict freezing to these module types.")
    seed: int | None = Field(None, description="random: seed of the layer draw (default: training.seed).")
    reference_phase: str | None = Field(
        None, description="most_changed: the earlier phase whose adapter change ranks layers (default: previous)."
    )

    @model_validator(mode="after")
    def _strategy_needs(self) -> PlacementConfig:
        if self.strategy == "explicit" and self.layers is None:
            raise ValueError("strategy 'explicit' needs 'layers'")
        if self.strategy in {"random", "most_changed", "spectrum"} and (self.fraction is None) == (self.count is None):
            raise ValueError(f"strategy '{self.strategy}' needs exactly one of 'fraction' and 'count'")
        return self


class ReplayConfig(_Strict):
    kind: Literal["generative", "real"] = Field(
        description="'generative': the previous phase's model answers English prompts. 'real': real English examples."
    )
    ratio: float = Field(gt=0, lt=1, description="Share of this phase's training examples that are replay.")
    prompts: DatasetSource | None = Field(None, description="generative: English prompts to answer.")
    source: DatasetSource | None = Field(None, description="real: English examples (default: earlier phases' data).")
    max_new_tokens: int = Field(256, ge=1, description="generative: answer length cap.")
    min_new_tokens: int = Field(0, ge=0, description="generative: generate at least this many tokens before the end token is allowed.")
    generation_batch_size: int = Field(16, ge=1, description="generative: prompts per generate() call.")
    do_sample: bool = Field(False, description="generative: sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="generative: sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="generative: nucleus sampling (with do_sample).")
    pool_size: int | Literal["auto"] = Field(
        "auto", description="Distinct replay examples to prepare. auto: ceil(ratio × phase examples), enough for one "
        "pass; the pool cycles over later epochs."
    )

    @model_validator(mode="after")
    def _kind_needs(self) -> ReplayConfig:
        if self.kind == "generative" and self.prompts is None:
            raise ValueError("kind 'generative' needs 'prompts' (English prompts for the previous phase's model to answer)")
        if self.kind == "generative" and self.source is not None:
            raise ValueError("'source' is for kind 'real'; generative replay reads 'prompts'")
        if self.kind == "real" and self.prompts is not None:
            raise ValueError("'prompts' is for kind 'generative'; real replay reads 'source'")
        return self


# ---------------------------------------------------------------------------------------------
# phases and the recipe
# ---------------------------------------------------------------------------------------------


class PhaseConfig(_Strict):
    name: str = Field(pattern=PHASE_NAME, description="Phase name: lowercase letters, digits, '_' or '-'.")
    datasets: list[DatasetSource] = Field(min_length=1, description="Data sources of this phase, concatenated.")
    training: TrainingOverrides = Field(  # type: ignore[valid-type]
        default_factory=TrainingOverrides, description="Overrides of the recipe's training defaults."
    )
    placement: PlacementConfig | None = Field(None, description="Layer freezing through adapter placement.")
    replay: ReplayConfig | None = Field(None, description="Replay mixed into this phase's batches.")


class AnalysisConfig(_Strict):
    drift: bool = Field(
        False, description="After the run, write analysis/drift.json and drift.png: per-layer representation drift "
        "between consecutive checkpoints on held-out English prompts (cft-analyze drift)."
    )


class Recipe(_Strict):
    description: str | None = Field(None, description="What this recipe is for.")
    output_dir: str = Field(description="Run directory (default: runs/<recipe file stem>).")
    model: ModelConfig = Field(description="The base model.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="The LoRA adapter carried across phases.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Training defaults for every phase.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation after phase 0 and every phase.")
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig, description="Analyses run by cft-train itself.")
    phases: list[PhaseConfig] = Field(min_length=1, description="Training phases in order (phase 0, the base, is implicit).")
    mixed_baseline: bool = Field(
        False,
        description="The paper's baseline: train ONE phase, 'mixed', on the union of every phase's data (top-level "
        "training settings). Set training.token_budget to compare with the phased run at equal tokens.",
    )

    def run_phases(self) -> list[PhaseConfig]:
        """The phases the runner trains: the recipe's, or the single mixed phase."""
        if not self.mixed_baseline:
            return self.phases
        return [PhaseConfig(name="mixed", datasets=[src for p in self.phases for src in p.datasets])]

    def phase_training(self, index: int) -> TrainingConfig:
        """Effective training config of phases[index]: defaults with that phase's overrides."""
        overrides = self.phases[index].training.model_dump(exclude_none=True)
        return TrainingConfig.model_validate({**self.training.model_dump(), **overrides})



# ---------------------------------------------------------------------------------------------
# loading: YAML, extends, overrides, validation with key paths
# ---------------------------------------------------------------------------------------------


def parse_layers(spec: str | list[int], num_layers: int | None = None) -> list[int]:
    """'0-7,12' or [0, 1] -> sorted unique indices, checked against num_layers when known."""
    if isinstance(spec, list):
        layers = list(spec)
    else:
        layers = []
        for part in (p.strip() for p in spec.split(",")):
            match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if not match:
                raise ValueError(f"cannot read layer range '{part}' (expected e.g. '0-7,12')")
            lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
            if hi < lo:
                raise ValueError(f"layer range '{part}' runs backwards")
            layers.extend(range(lo, hi + 1))
    if num_layers is not None:
        bad = [i for i in layers if i < 0 or i >= num_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range: the model has layers 0-{num_layers - 1}")
    return sorted(set(layers))



def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge (`extends`), override and validate a recipe. Raises RecipeError listing every problem."""
    path = Path(path)
    raw = _read_with_extends(path, chain=())
    problems = []
    for override in overrides:
        try:
            apply_override(raw, override)
        except ValueError as exc:
            problems.append(f"{path}: override '{override}': {exc}")
    if problems:
        raise RecipeError(problems)
    raw.setdefault("output_dir", str(Path("runs") / path.stem))
    return validate_recipe(raw, source=str(path), base_dir=path.parent)


def validate_recipe(raw: dict[str, Any], *, source: str, base_dir: Path) -> Recipe:
    """Validate a merged recipe dict. Field errors and cross-key rules are all reported together."""
    cross = raw_cross_problems(raw)
    lines = [f"{source}: {loc}: {msg}" for loc, msg in cross]
    try:
        recipe = Recipe.model_validate(raw, context={"base_dir": str(base_dir)})
    except ValidationError as exc:
        lines += _format_validation_error(exc, source, covered={loc for loc, _ in cross})
        raise RecipeError(list(dict.fromkeys(lines))) from None
    if lines:
        raise RecipeError(lines)
    return recipe


def raw_cross_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Rules that span keys, checked on the raw dict so they run even when fields are invalid."""
    problems: list[tuple[str, str]] = []
    phases = raw.get("phases")
    if not isinstance(phases, list):
        return problems
    if raw.get("mixed_baseline") is True:
        for i, phase in enumerate(phases):
            for key in ("placement", "replay", "training"):
                if isinstance(phase, dict) and phase.get(key):
                    problems.append((f"phases[{i}].{key}", "not used with mixed_baseline: the single mixed phase "
                                     "takes the top-level training settings"))
    seen: dict[str, int] = {}
    for i, phase in enumerate(phases):
        if not isinstance(phase, dict):
            continue
        name = phase.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append((f"phases[{i}].name", f"duplicate phase name '{name}' (also phases[{seen[name]}].name)"))
            seen.setdefault(name, i)
        placement = phase.get("placement")
        ref = placement.get("reference_phase") if isinstance(placement, dict) else None
        if ref is not None and seen.get(ref, i) >= i:
            problems.append((f"phases[{i}].placement.reference_phase", f"'{ref}' must name an earlier phase of this recipe"))
        replay = phase.get("replay")
        if isinstance(replay, dict) and replay.get("kind") == "real" and not replay.get("source") and i == 0:
            problems.append((f"phases[{i}].replay", "real replay without 'source' replays earlier phases' data, "
                             "and this is the first phase"))
        if isinstance(placement, dict) and placement.get("strategy") == "most_changed" and i == 0:
            problems.append((f"phases[{i}].placement.strategy", "'most_changed' ranks layers by an earlier trained "
                             "phase's adapter change, and this is the first phase"))
        if isinstance(placement, dict) and isinstance(placement.get("layers"), str):
            try:
                parse_layers(placement["layers"])
            except ValueError as exc:
                problems.append((f"phases[{i}].placement.layers", str(exc)))
        datasets = phase.get("datasets")
        for j, src in enumerate(datasets if isinstance(datasets, list) else []):
            if isinstance(src, dict):
                problems += [(f"phases[{i}].datasets[{j}]", p) for p in source_problems(src)]
    return problems


class _DuplicateKeys(yaml.YAMLError):
    def __init__(self, found: list[tuple[str, int, int]]):
        self.found = found  # (key path, first line, repeated line)
        super().__init__("; ".join(f"{loc}: duplicate key (lines {a} and {b})" for loc, a, b in found))


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key written twice in one mapping is an error: plain YAML keeps
    the last silently. Keys merged in with `<<: *anchor` may still be overridden, as YAML intends."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        found = _duplicate_keys(node, self)
        if found:
            raise _DuplicateKeys(found)
        return self.construct_document(node)


def _duplicate_keys(root: yaml.Node, loader: yaml.SafeLoader) -> list[tuple[str, int, int]]:
    """Every key written twice in one mapping, with its key path and both lines, before construction."""
    found: list[tuple[str, int, int]] = []
    visited: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in visited:  # an alias: the anchored node was checked where it was written
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(item, (*loc, i)) for i, item in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges mappings, checked as written
                    stack.append((value_node, loc))
                    continue
                key = _key_of(key_node, loader)
                child = (*loc, str(key))
                line = key_node.start_mark.line + 1
                if key in first_line:
                    found.append((format_loc(child), first_line[key], line))
                else:
                    first_line[key] = line
                stack.append((value_node, child))
    return sorted(found, key=lambda item: item[2])


def _key_of(node: yaml.Node, loader: yaml.SafeLoader) -> Any:
    """The key as YAML constructs it (so `1` and `01` are one key), or its node text when unhashable."""
    if isinstance(node, yaml.ScalarNode):
        try:
            key = loader.construct_object(node)
            hash(key)
            return key
        except (yaml.YAMLError, TypeError):
            pass
    return (node.tag, repr(node.value))


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found"])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise RecipeError([f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, column {column}); "
                           "save the file as UTF-8"]) from None
    try:
        data = _safe_load(text)
    except _DuplicateKeys as exc:
        raise RecipeError([f"{path}: {loc}: key written twice ({f'lines {a} and {b}' if a != b else f'both on line {a}'}); "
                           "YAML would silently keep only the last, so remove one" for loc, a, b in exc.found]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise RecipeError([f"{path}: not valid YAML (line {line}): character #x{exc.character:04x} is not "
                           "allowed in YAML"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{path}: not valid YAML{where}: {problem}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: expected a mapping of recipe keys at the top level, got {type(data).__name__}"])
    return data


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError([f"{path}: extends: cycle {cycle}"])
    data = _absolutize_paths(_read_yaml(path), path.parent)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError([f"{path}: extends: expected a path to another recipe, got {parent!r}"])
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if not parent_path.is_file():
        raise RecipeError([f"{path}: extends: recipe file not found: {parent_path}"])
    return deep_merge(_read_with_extends(parent_path, (*chain, resolved)), data)


def _absolutize_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Relative data paths are relative to the file that wrote them, also through `extends`."""

    def fix(src: Any) -> None:
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            value = src["path"]
            if not value.startswith(BUILTIN_PREFIX) and not Path(value).expanduser().is_absolute():
                src["path"] = str((base_dir / value).resolve())

    for phase in data.get("phases") or []:
        if not isinstance(phase, dict):
            continue
        for src in phase.get("datasets") or [] if isinstance(phase.get("datasets"), list) else []:
            fix(src)
        if isinstance(phase.get("replay"), dict):
            fix(phase["replay"].get("prompts"))
            fix(phase["replay"].get("source"))
    return data


def deep_merge(base: Any, child: Any) -> Any:
    """Child wins. Mappings merge key by key. Lists of mappings that all carry a 'name' (phases) merge
    by name, keeping the base order and appending new names; any other list is replaced whole."""
    if isinstance(base, dict) and isinstance(child, dict):
        merged = dict(base)
        for key, value in child.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    if _named_list(base) and _named_list(child):
        merged_list = list(base)
        index = {item["name"]: i for i, item in enumerate(base)}
        for item in child:
            if item["name"] in index:
                merged_list[index[item["name"]]] = deep_merge(base[index[item["name"]]], item)
            else:
                merged_list.append(item)
        return merged_list
    return child


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "name" in v for v in value)


_OVERRIDE = re.compile(r"^(?P<key>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*)=(?P<value>.*)$", re.S)
_SEGMENT = re.compile(r"\.?([A-Za-z_]\w*)|\[(\d+)\]")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    match = _OVERRIDE.match(text)
    if not match:
        raise ValueError("expected key.path=value, e.g. phases[1].training.learning_rate=1e-4")
    segments: list[str | int] = [
        name if name else int(index) for name, index in _SEGMENT.findall(match.group("key"))
    ]
    try:
        value = _safe_load(match.group("value")) if match.group("value") != "" else None
    except _DuplicateKeys as exc:
        keys = ", ".join(f"'{loc}'" for loc, _, _ in exc.found)
        raise ValueError(f"the value writes {keys} twice; YAML would silently keep only the last") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"value is not valid YAML: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None
    return segments, value


def apply_override(raw: dict[str, Any], text: str) -> None:
    segments, value = parse_override(text)
    node: Any = raw
    for depth, segment in enumerate(segments[:-1]):
        nxt = segments[depth + 1]
        where = format_loc(segments[: depth + 1])
        if isinstance(segment, int):
            if not isinstance(node, list) or segment >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ValueError(f"{where}: index out of range (the list has {size} items)")
            if node[segment] is None:
                node[segment] = [] if isinstance(nxt, int) else {}
            node = node[segment]
        else:
            if not isinstance(node, dict):
                raise ValueError(f"{where}: cannot set a key inside a {type(node).__name__}")
            if node.get(segment) is None:
                if isinstance(nxt, int):
                    raise ValueError(f"{where}: no list here to index")
                node[segment] = {}
            node = node[segment]
    last = segments[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ValueError(f"{format_loc(segments)}: index out of range")
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise ValueError(f"{format_loc(segments[:-1])}: cannot set a key inside a {type(node).__name__}")
        node[last] = value


def format_loc(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format_validation_error(exc: ValidationError, source: str, covered: set[str] = frozenset()) -> list[str]:
    """One line per key path. `covered`: paths whose cross-key rules the raw pass reported already."""
    by_loc: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = _clean_loc(err["loc"])
        where = format_loc(loc) or "(top level)"
        if err["type"] == "value_error" and where in covered:
            continue
        if err["type"] == "extra_forbidden":
            allowed = allowed_keys(loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = "unknown key; " + (f"did you mean '{hint[0]}'? " if hint else "") + f"allowed: {', '.join(allowed)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = _short(err.get("input"))
            if got is not None and err["type"] != "value_error":
                msg += f", got {got}"
        if msg not in by_loc.setdefault(where, []):
            by_loc[where].append(msg)
    # A union field (e.g. str | list[int]) fails once per member: one line, alternatives joined.
    return [f"{source}: {where}: {' | or: '.join(msgs)}" for where, msgs in by_loc.items()]


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's union-member segments ('str', 'list[int]', 'literal[...]')."""
    cleaned = []
    for part in loc:
        if isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part or part.startswith("function-")):
            continue
        cleaned.append(part)
    return tuple(cleaned)


def _short(value: Any) -> str | None:
    if isinstance(value, (dict, list)) and len(repr(value)) > 60:
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping at `loc` accepts, found by walking the schema."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _model_of(model.model_fields[part].annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_of(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] / list[...], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, list, getattr(__import__("types"), "UnionType", Union)):
        for arg in get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def recipe_json_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
