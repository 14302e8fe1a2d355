from __future__ import annotations

import pytest
from transformers import MistralConfig

from cft_adapters.cli import main
from cft_adapters.memory import estimate, lora_parameters
from cft_adapters.modeling import load_base_model, new_adapter
from cft_adapters.recipe import AdapterConfig, ModelConfig

from conftest import SMOKE

MISTRAL_7B = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8)


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_weight_estimate_matches_the_loaded_model(tiny_model_path, quantization) -> None:
    model = load_base_model(ModelConfig(name_or_path="builtin:tiny-mistral", quantization=quantization), str(tiny_model_path))
    est = estimate(model.config, quantization=quantization, compute_bytes=4, r=8, target_modules=["q_proj"],
                   batch=1, seq_len=8, gradient_checkpointing=False)
    actual = model.get_memory_footprint() / 2**20
    assert est.weights == pytest.approx(actual, rel=0.05)


@pytest.mark.parametrize(("r", "targets"), [(8, ["q_proj", "v_proj"]), (16, AdapterConfig().target_modules)])
def test_lora_parameter_count_matches_peft(tiny_model_path, r, targets) -> None:
    base = load_base_model(ModelConfig(name_or_path="builtin:tiny-mistral"), str(tiny_model_path))
    model = new_adapter(base, AdapterConfig(r=r, alpha=2 * r, target_modules=targets))
    assert lora_parameters(model.config, r, targets) == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_knobs_move_the_estimate_the_right_way() -> None:
    kw = dict(quantization="nf4", compute_bytes=2, r=16, target_modules=AdapterConfig().target_modules, batch=1, seq_len=2048)
    plain = estimate(MISTRAL_7B, gradient_checkpointing=False, **kw)
    ckpt = estimate(MISTRAL_7B, gradient_checkpointing=True, **kw)
    liger = estimate(MISTRAL_7B, gradient_checkpointing=True, liger=True, **kw)
    assert 4000 < plain.weights < 5000  # ~7B params at NF4 plus float32 embeddings
    assert ckpt.activations < plain.activations / 8 and liger.logits == 0 < ckpt.logits
    assert ckpt.fits(24) and not plain.fits(16)


def test_dry_run_prints_the_memory_plan(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main([str(SMOKE), f"output_dir={tmp_path / 'o'}", "--dry-run", "--gpu-mem", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak GPU memory per phase" in out and "fits 0.4 GiB" in out and "NO" in out


@pytest.mark.parametrize("extra", [["--gpu-mem", "24"], ["--dry-run", "--gpu-mem", "0"], ["--dry-run", "--gpu-mem", "nan"],
                                   ["--dry-run", "--gpu-mem", "-4"]])
def test_gpu_mem_is_a_positive_size_for_a_dry_run(tmp_path, capsys, extra) -> None:
    assert main([str(SMOKE), f"output_dir={tmp_path / 'o'}", *extra]) == 2  # never a training run
    assert "--gpu-mem takes a GPU size in GiB above 0, with --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
