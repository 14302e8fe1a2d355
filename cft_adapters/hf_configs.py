"""The one place that translates recipe sections into Hugging Face config objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cft_adapters.errors import CftError
from cft_adapters.recipe import AdapterConfig, ModelConfig, Recipe, TrainingConfig


def compute_dtype(model: ModelConfig) -> torch.dtype:
    if model.compute_dtype != "auto":
        return getattr(torch, model.compute_dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def bnb_config(model: ModelConfig) -> Any:
    """NF4 with double quantization (QLoRA), or None for a plain base."""
    if model.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(model),
    )


def lora_config(adapter: AdapterConfig, layers_to_transform: list[int] | None = None) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules),
        layers_to_transform=layers_to_transform,
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(training: TrainingConfig, model: ModelConfig, output_dir: Path, **tracking: Any) -> Any:
    """SFTConfig for one phase. Checkpoints go to `output_dir` (the phase's trainer/ folder).
    `tracking`: report_to / run_name / project for the Trainer's tracker integrations (tracking.py)."""
    from trl import SFTConfig

    dtype = compute_dtype(model)
    return SFTConfig(
        output_dir=str(output_dir),
        # TRL enforces max_length only for padded batches; with padding_free the runner truncates
        # the tokenized examples itself (data.truncate_tokenized).
        max_length=None if training.padding_free else training.max_length,
        per_device_train_batch_size=training.per_device_train_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler_type,
        warmup_steps=training.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the steps
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        num_train_epochs=training.num_train_epochs,
        max_steps=training.max_steps if training.max_steps is not None else -1,
        **_checkpointing_args(SFTConfig, training.gradient_checkpointing),
        optim=training.optim,
        seed=training.seed,
        data_seed=training.seed,
        completion_only_loss=training.completion_only_loss,
        logging_steps=training.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach the guard, not be averaged away
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=2,
        save_only_model=False,  # optimizer and scheduler state: a resumed phase continues exactly
        include_num_input_tokens_seen="non_padding",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **({"report_to": "none"} | tracking),
        disable_tqdm=True,  # progress is drawn by cft_adapters.callbacks.RichProgressCallback
        dataloader_pin_memory=torch.cuda.is_available(),
        padding_free=training.padding_free,
        train_sampling_strategy="group_by_length" if training.group_by_length else "random",
        use_liger_kernel=training.use_liger_kernel,
    )


def _checkpointing_args(config_class: Any, enabled: bool) -> dict[str, Any]:
    """transformers >= 5.2x names it activation checkpointing; the old names warn (removed in v6)."""
    kwargs = {"use_reentrant": False} if enabled else None
    if "activation_checkpointing" in getattr(config_class, "__dataclass_fields__", {}):
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}


def check_liger(recipe: Recipe, source: str) -> None:
    """use_liger_kernel needs a CUDA GPU and the 'gpu' extra: said before any training."""

    wants = [i for i in range(len(recipe.phases)) if recipe.phase_training(i).use_liger_kernel]
    if not wants:
        return
    if not torch.cuda.is_available():
        raise CftError(f"{source}: training.use_liger_kernel: Liger kernels need a CUDA GPU; none is visible")
    from cft_adapters.extras import require

    require("gpu", f"{source}: training.use_liger_kernel")
