"""Peak-memory planner for a QLoRA phase, from the model config alone (`cft-train --dry-run`).

Estimates, in MiB, what torch allocates on the device at the peak of a training step:

- weights: quantized linear weights at 0.5 byte/param plus NF4 block constants (one absmax byte per
  64 weights with double quantization, ~0.016 byte/param); every other parameter (embeddings,
  lm_head, norms) in float32, since prepare_model_for_kbit_training upcasts them;
- LoRA: r·(in + out) per adapted matrix, float32 weights + gradients + two AdamW moments = 16 B/param;
- activations saved for backward, in the compute dtype (b bytes), per layer
  B·s·(10·h + 4·i + 2·kv)·b without gradient checkpointing (attention through SDPA, so no s² score
  matrix is kept), or B·s·h·b per layer plus one layer's full activations with it;
- logits: B·s·V in the compute dtype, their float32 upcast in the loss, and its gradient:
  B·s·V·(b + 8); Liger's fused linear + cross-entropy never materialises them (counted as 0).

The CUDA context (~0.5 GiB, outside torch's allocator) is not included; `fits` adds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MIB = 2**20
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64
CUDA_CONTEXT_MIB = 512


@dataclass
class MemoryEstimate:
    weights: float
    lora: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.logits

    def fits(self, gpu_gib: float) -> bool:
        return self.total + CUDA_CONTEXT_MIB <= gpu_gib * 1024

    def to_json(self) -> dict[str, float]:
        return {**{k: round(v, 1) for k, v in asdict(self).items()}, "total": round(self.total, 1)}


def _shapes(config: Any) -> dict[str, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    return {"h": h, "i": text.intermediate_size, "layers": text.num_hidden_layers, "vocab": text.vocab_size,
            "q": heads * head_dim, "kv": kv, "tied": int(bool(getattr(text, "tie_word_embeddings", False)))}


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each decoder linear of a Llama/Mistral-style block."""
    s = _shapes(config)
    return {"q_proj": (s["h"], s["q"]), "k_proj": (s["h"], s["kv"]), "v_proj": (s["h"], s["kv"]),
            "o_proj": (s["q"], s["h"]), "gate_proj": (s["h"], s["i"]), "up_proj": (s["h"], s["i"]),
            "down_proj": (s["i"], s["h"])}


def lora_parameters(config: Any, r: int, target_modules: list[str], layers: int | None = None) -> int:
    shapes = linear_shapes(config)
    per_layer = sum(r * (i + o) for name, (i, o) in shapes.items() if name in target_modules)
    return per_layer * (layers if layers is not None else _shapes(config)["layers"])


def estimate(
    config: Any, *, quantization: str, compute_bytes: int, r: int, target_modules: list[str], batch: int,
    seq_len: int, gradient_checkpointing: bool, liger: bool = False,
) -> MemoryEstimate:
    s = _shapes(config)
    linear = s["layers"] * sum(i * o for i, o in linear_shapes(config).values())
    other = s["vocab"] * s["h"] * (1 if s["tied"] else 2) + s["layers"] * 2 * s["h"] + s["h"]
    if quantization == "nf4":
        weights = linear * NF4_BYTES_PER_PARAM + other * 4
    else:
        weights = (linear + other) * compute_bytes
    lora = lora_parameters(config, r, target_modules) * 16
    tokens = batch * seq_len
    full_layer = tokens * (10 * s["h"] + 4 * s["i"] + 2 * s["kv"]) * compute_bytes
    if gradient_checkpointing:
        activations = s["layers"] * tokens * s["h"] * compute_bytes + full_layer
    else:
        activations = s["layers"] * full_layer
    logits = 0 if liger else tokens * s["vocab"] * (compute_bytes + 8)
    return MemoryEstimate(weights / MIB, lora / MIB, activations / MIB, logits / MIB)


def planning_config(model: Any) -> Any | None:
    """The model config for planning, without loading weights (None where only the hub has it)."""
    from cft_adapters.recipe import BUILTIN_PREFIX
    from cft_adapters.tiny import BUILTIN_MODELS

    name = model.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        spec = BUILTIN_MODELS.get(name.removeprefix(BUILTIN_PREFIX))
        if spec is None:
            return None
        from transformers import MistralConfig

        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size")
        return MistralConfig(**{k: spec[k] for k in keys}, tie_word_embeddings=False)
    if model.gguf_file:
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except Exception:  # offline or gated: the plan says "unknown"
        return None


def plan_phase(recipe: Any, index: int, config: Any) -> MemoryEstimate:
    import torch

    from cft_adapters.hf_configs import compute_dtype

    training = recipe.phase_training(index)
    dtype = compute_dtype(recipe.model)
    if recipe.model.compute_dtype == "auto" and not torch.cuda.is_available():
        dtype = torch.bfloat16  # the plan is for the GPU the recipe is meant for
    return estimate(
        config, quantization=recipe.model.quantization, compute_bytes=torch.finfo(dtype).bits // 8,
        r=recipe.adapter.r, target_modules=list(recipe.adapter.target_modules),
        batch=training.per_device_train_batch_size, seq_len=training.max_length,
        gradient_checkpointing=training.gradient_checkpointing, liger=training.use_liger_kernel,
    )
