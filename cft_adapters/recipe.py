"""The recipe: one YAML file, one pydantic model tree, every error reported at once.

Only this module and the CLI read YAML or argv. Everything below takes the typed `Recipe`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

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
    model_serializer,
    model_validator,
)

from cft_adapters.config_errors import allowed_keys, format_loc, validation_lines  # noqa: F401  (re-exported)
from cft_adapters.errors import RecipeError
from cft_adapters.recipe_rules import parse_layers, raw_cross_problems, source_problems  # noqa: F401  (re-exported)
from cft_adapters.recipe_yaml import (  # noqa: F401  (re-exported)
    BUILTIN_PREFIX,
    _read_with_extends,
    apply_override,
    deep_merge,
    expand_path,
    local_path,
    parse_override,
)

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

    @field_validator("name_or_path")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        """A 'builtin:' name is one of the package's: a typo is said here, not after the dry run."""
        if value.startswith(BUILTIN_PREFIX):
            from cft_adapters.wheels import builtin_model_names

            known = builtin_model_names()
            if value.removeprefix(BUILTIN_PREFIX) not in known:
                raise ValueError(f"unknown builtin model '{value}' (available: "
                                 f"{', '.join(BUILTIN_PREFIX + k for k in known)})")
        return value

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
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="Experiment trackers for the training curves (one run per phase, so phase boundaries show) and "
        "each phase's EA / MA / Combined / forgetting. TensorBoard writes to <output_dir>/tensorboard/. Not part "
        "of any phase's digest: tracking changes no adapter.",
    )
    project: str | None = Field(None, description="The tracker's project (W&B, Trackio, MLflow experiment).")
    run_name: str | None = Field(None, description="The tracker's run name (default: the output_dir's name); "
                                 "each phase is '<run_name>/phase_<k>_<name>'.")


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


class JudgeConfig(_Strict):
    model: str = Field(
        description="The AlpacaEval judge: a local model (directory, hub id or 'builtin:<name>') whose next-token "
        "log-probabilities answer the package's judge prompt, or, with `endpoint`, the model name the endpoint serves.",
    )
    endpoint: str | None = Field(
        None,
        description="An OpenAI-compatible endpoint (e.g. a local vLLM server, 'http://localhost:8000/v1') that serves "
        "`model` with logprobs; its key is read from OPENAI_API_KEY. None: load `model` locally.",
    )
    quantization: Literal["nf4", "none"] = Field("none", description="A local judge's weights: plain, or NF4.")
    trust_remote_code: bool = Field(False, description="Run a local judge repository's own Python code.")
    max_prompt_tokens: int = Field(
        4096, ge=64, description="A local judge reads at most this many prompt tokens (the end of the prompt is kept)."
    )


class EvalConfig(_Strict):
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval task or group names scored for phase 0 (the base) and after every phase, "
        "e.g. [cft_en, cft_ml] or [cft_smoke_en, cft_smoke_ml]. Empty: no evaluation.",
    )
    limit: float | None = Field(None, gt=0, description="Examples per task (an int), or a fraction below 1.")

    @field_validator("limit")
    @classmethod
    def _whole_or_fraction(cls, value: float | None) -> float | None:
        if value is not None and value >= 1 and not float(value).is_integer():
            raise ValueError(f"expected a whole number of examples or a fraction below 1, got {value}")
        return value

    limits: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="Examples per task, by task or group name (a group's limit applies to each of its tasks, as "
        "lm-eval's limit does: {mmlu: 20} is 20 questions in each of the 57 subjects); names not listed take `limit`. "
        "`cft-train --dry-run` prints what they cost.",
    )
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
    include_path: list[str] = Field(
        default_factory=list,
        description="Your own lm-eval task folders (relative to the recipe file), searched with the bundled ones, as "
        "lm_eval --include_path: their tasks can be named in `tasks`. Each task declares metadata.cft "
        "{ability, language, metric, benchmark} for the report (see lm_eval_tasks/README.md).",
    )
    judge: JudgeConfig | None = Field(
        None,
        description="The LLM judge of the AlpacaEval members (cft_alpacaeval, cft_smoke_alpacaeval): the length-"
        "controlled win rate against the reference answers, through the alpaca-eval package. None: those members "
        "are skipped with a message, and EA has four members.",
    )

    # Fields added after runs and caches were keyed on this section, with their defaults.
    NEW_DEFAULTS: ClassVar[dict[str, Any]] = {"limits": {}, "judge": None, "include_path": []}

    @field_validator("include_path")
    @classmethod
    def _folders(cls, value: list[str], info: ValidationInfo) -> list[str]:
        base_dir = Path((info.context or {}).get("base_dir", "."))
        out = []
        for i, folder in enumerate(value):
            try:
                path = local_path(folder, base_dir)
            except ValueError as exc:
                raise ValueError(f"[{i}]: {exc}") from None
            if not path.is_dir():
                raise ValueError(f"[{i}]: no folder at {path} (a folder of lm-eval task YAMLs, relative to the recipe)")
            out.append(str(path))
        return out

    def keyed_dump(self, **kwargs: Any) -> dict[str, Any]:
        """model_dump for keys and digests: fields added later are left out while at their default,
        so what was keyed before they existed keeps its key."""
        dump = self.model_dump(mode="json", **kwargs)
        return {k: v for k, v in dump.items() if not (k in self.NEW_DEFAULTS and v == self.NEW_DEFAULTS[k])}


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
    format: Literal["alpaca", "messages", "sharegpt", "columns"] = Field(
        "alpaca",
        description="'alpaca': instruction/input/output. 'messages': a chat list ({role, content}) whose last turn is "
        "the assistant's answer. 'sharegpt': a `conversations` list of {from, value} turns (human/gpt/system; "
        "user/assistant also read), the last one gpt's. 'columns': explicit mapping in `columns`.",
    )
    columns: ColumnMap | None = Field(None, description="Column mapping, for format 'columns'.")
    messages_column: str = Field(
        "messages", description="Column holding the chat list, for format 'messages' ('sharegpt': `conversations_column`)."
    )
    conversations_column: str = Field("conversations", description="Column holding the turns, for format 'sharegpt'.")
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
        resolved = local_path(value, base_dir)
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


HUB_ID = r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?"


def safetensors_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be read as safetensors, or None. Pickled PyTorch weights (.bin,
    .pt) are never loaded: unpickling runs code from the file."""
    if any(folder.glob("*.safetensors")):
        return None
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth"} or p.name.endswith(".bin.index.json"))
    if pickled:
        return (f"{folder}: holds PyTorch pickle weights only ({', '.join(pickled[:3])}); 'reference_change' reads "
                "safetensors only (convert the checkpoint, or use a revision that has *.safetensors)")
    return f"{folder}: no *.safetensors weights"


def _checkpoint_location(value: str, info: ValidationInfo) -> str:
    """A local folder (relative to the recipe file; made absolute) or a hub id (kept as written)."""
    base_dir = Path((info.context or {}).get("base_dir", "."))
    folder = expand_path(value)
    folder = folder if folder.is_absolute() else base_dir / folder
    if folder.is_dir():
        problem = safetensors_problem(folder.resolve())
        if problem:
            raise ValueError(problem)
        return str(folder.resolve())
    if value.startswith(("/", ".", "~")) or not re.fullmatch(HUB_ID, value):
        raise ValueError(f"folder not found: {folder.resolve()} (nor is '{value}' a hub id such as 'org/name')")
    return value


class ReferencePair(_Strict):
    base: str = Field(description="The checkpoint the change is measured from (e.g. mistralai/Mistral-7B-v0.1): a hub "
                      "id or a local folder (relative to the recipe file), holding safetensors weights.")
    tuned: str = Field(description="The checkpoint the change is measured to (e.g. mistralai/Mistral-7B-Instruct-v0.1): "
                       "a hub id or a local folder (relative to the recipe file), holding safetensors weights.")
    base_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of 'base'.")
    tuned_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of 'tuned'.")

    @field_validator("base", "tuned")
    @classmethod
    def _locate(cls, value: str, info: ValidationInfo) -> str:
        return _checkpoint_location(value, info)

    @model_validator(mode="after")
    def _revisions_for_hub_ids(self) -> ReferencePair:
        for key in ("base", "tuned"):
            if getattr(self, f"{key}_revision") is not None and Path(getattr(self, key)).is_absolute():
                raise ValueError(f"'{key}_revision' applies to a hub id, and '{key}' is a local folder")
        return self


class PlacementConfig(_Strict):
    strategy: Literal["none", "explicit", "random", "most_changed", "reference_change", "spectrum"] = Field(
        description="Which layers' adapters are frozen this phase: explicit indices, random (LF_H1), "
        "most_changed (LF_H2, by an earlier phase's adapter change), reference_change (LF_H2, by the weight change "
        "between two reference checkpoints, e.g. a vendor base and its Instruct model), spectrum (lowest SNR), or none."
    )
    layers: str | list[int] | None = Field(None, description="explicit: layers to freeze, e.g. '0-7,12' or [0, 1].")
    fraction: float | None = Field(None, gt=0, lt=1, description="Share of layers to freeze.")
    count: int | None = Field(None, ge=1, description="Number of layers to freeze.")
    modules: list[str] | None = Field(None, description="Restrict freezing to these module types.")
    seed: int | None = Field(None, description="random: seed of the layer draw (default: training.seed).")
    reference_phase: str | None = Field(
        None, description="most_changed: the earlier phase whose adapter change ranks layers (default: previous)."
    )
    reference: ReferencePair | None = Field(
        None, description="reference_change: the two checkpoints whose per-layer weight change ranks layers (the layers "
        "that changed most, relative to their base weights, are frozen). Usable in the first phase."
    )

    @model_validator(mode="after")
    def _strategy_needs(self) -> PlacementConfig:
        if self.strategy == "explicit" and self.layers is None:
            raise ValueError("strategy 'explicit' needs 'layers'")
        if self.strategy in {"random", "most_changed", "reference_change", "spectrum"} and (self.fraction is None) == (self.count is None):
            raise ValueError(f"strategy '{self.strategy}' needs exactly one of 'fraction' and 'count'")
        if self.strategy == "reference_change" and self.reference is None:
            raise ValueError("strategy 'reference_change' needs 'reference' ({base: ..., tuned: ...}: the checkpoints "
                             "whose weight change ranks the layers)")
        if self.strategy != "reference_change" and self.reference is not None:
            raise ValueError(f"'reference' is for strategy 'reference_change', not '{self.strategy}'")
        if self.strategy == "reference_change" and self.reference_phase is not None:
            raise ValueError("'reference_phase' is for strategy 'most_changed'; 'reference_change' reads 'reference'")
        unused = [k for k in PLACEMENT_KEYS if getattr(self, k) is not None and k not in PLACEMENT_KEYS_USED[self.strategy]]
        if unused:  # set, and silently without effect: a different experiment than the recipe reads
            used = ", ".join(sorted(PLACEMENT_KEYS_USED[self.strategy])) or "nothing else"
            raise ValueError(f"{', '.join(unused)}: not used by strategy '{self.strategy}' (it reads {used})")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_reference(self, handler: Any) -> Any:
        # Without a reference pair the dump is what it was before the field existed, so the phase
        # digests (reconcile.phase_config_digest hashes this dump) of runs made then still match.
        data = handler(self)
        if isinstance(data, dict) and data.get("reference") is None:
            data.pop("reference", None)
        return data


PLACEMENT_KEYS = ("layers", "fraction", "count", "modules", "seed", "reference_phase", "reference")
PLACEMENT_KEYS_USED: dict[str, set[str]] = {
    "none": set(),
    "explicit": {"layers", "modules"},
    "random": {"fraction", "count", "seed", "modules"},
    "most_changed": {"fraction", "count", "reference_phase", "modules"},
    "reference_change": {"fraction", "count", "reference", "modules"},
    "spectrum": {"fraction", "count", "modules"},
}


class TranslateConfig(_Strict):
    model: str = Field(
        "self",
        description="Who translates: 'self', the previous phase's model in memory (the one that then answers), or a "
        "causal instruction model named like model.name_or_path (a directory, hub id or 'builtin:'), e.g. an MT LLM "
        "such as Unbabel/TowerInstruct-7B-v0.2, loaded once for the pool.",
    )
    prompt: str = Field(
        "Translate the following {language} text into English. Reply with the English translation only.\n\n{text}",
        description="The translation request; {language} is the row's language name, {text} the instruction.",
    )
    max_new_tokens: int = Field(512, ge=1, description="Translation length cap.")
    batch_size: int = Field(16, ge=1, description="Instructions per generate() call.")
    trust_remote_code: bool = Field(False, description="Run a named translator's repository code.")

    @field_validator("prompt")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("must contain {text}, where the instruction goes")
        return value


class ReplayConfig(_Strict):
    kind: Literal["generative", "real"] = Field(
        description="'generative': the previous phase's model answers English prompts. 'real': real English examples."
    )
    ratio: float = Field(gt=0, lt=1, description="Share of this phase's training examples that are replay.")
    prompts: DatasetSource | None = Field(None, description="generative: English prompts to answer.")
    translate: TranslateConfig | None = Field(
        None,
        description="generative, instead of `prompts`: the paper's English versions of this phase's own instructions. "
        "A sample of the phase's examples is translated to English (rows already in English are kept), the previous "
        "phase's model answers the translations, and replay.jsonl records each one's original and language.",
    )
    source: DatasetSource | None = Field(None, description="real: the examples to replay (default: every earlier "
                                         "phase's data, whatever its language).")
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

    @field_validator("pool_size")
    @classmethod
    def _some_examples(cls, value: int | str) -> int | str:
        if value != "auto" and int(value) < 1:
            raise ValueError(f"expected 'auto' or a number of examples of at least 1, got {value}")
        return value

    @model_validator(mode="after")
    def _kind_needs(self) -> ReplayConfig:
        if self.kind == "generative" and (self.prompts is None) == (self.translate is None):
            raise ValueError("kind 'generative' needs exactly one of 'prompts' (English prompts for the previous phase's "
                             "model to answer) or 'translate' (English versions of this phase's own instructions)")
        if self.kind == "real" and self.translate is not None:
            raise ValueError("'translate' is for kind 'generative'")
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
    drift_probe: str | None = Field(
        None, description="JSON Lines of {prompt} the drift analysis probes with, relative to the recipe file. None: "
        "the bundled general English instructions (88, in the MT-Bench spirit: writing, reasoning, maths, coding, "
        "extraction, STEM, humanities, role-play).",
    )

    forgetting_model: str | None = Field(
        None, description="A forgetting model written by `cft-analyze predict STUDY_DIR` (forgetting_model.json, "
        "relative to the recipe file): before the last phase, cft-train prints the DES of the last two phases and "
        "the forgetting the model predicts.",
    )

    @field_validator("drift_probe", "forgetting_model")
    @classmethod
    def _probe_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        path = local_path(value, Path((info.context or {}).get("base_dir", ".")))
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        return str(path)


class Recipe(_Strict):
    description: str | None = Field(None, description="What this recipe is for.")
    output_dir: str = Field(description="Run directory (default: runs/<recipe file stem>); relative to the "
                            "current directory, '~' expanded.")
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

    @field_validator("output_dir")
    @classmethod
    def _run_directory(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected a folder for the run, got an empty string (the current directory is never a run)")
        return str(expand_path(value))

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
        lines += validation_lines(exc, source, Recipe, covered={loc for loc, _ in cross})
        raise RecipeError(list(dict.fromkeys(lines))) from None
    lines += [f"{source}: {loc}: {msg}" for loc, msg in _validated_problems(recipe)]
    if lines:
        raise RecipeError(lines)
    return recipe


def _validated_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Rules across sections of a valid recipe: a placement restricted to module types the adapter
    does not carry would freeze nothing, silently."""
    targets = set(recipe.adapter.target_modules)
    problems = []
    for i, phase in enumerate(recipe.phases):
        modules = phase.placement.modules if phase.placement is not None else None
        if modules and "all-linear" not in targets and not set(modules) <= targets:
            missing = ", ".join(m for m in modules if m not in targets)
            problems.append((f"phases[{i}].placement.modules", f"{missing}: not among adapter.target_modules "
                             f"({', '.join(recipe.adapter.target_modules)}); freezing them would freeze nothing"))
    return problems


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def recipe_json_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
