"""Padding-free batches through TRL's real collator and the real model: no attention leaks between
the examples flattened into one sequence."""

from __future__ import annotations

import pytest
import torch

from cft_adapters.cli import main
from cft_adapters.data import load_phase_data
from cft_adapters.hf_configs import sft_config
from cft_adapters.manifest import RunManifest
from cft_adapters.modeling import load_base_model, load_tokenizer
from cft_adapters.recipe import load_recipe

from conftest import SMOKE


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_loss_per_example_equals_the_example_alone(tmp_path, tiny_model_path, attn) -> None:
    from trl import SFTTrainer

    recipe = load_recipe(SMOKE, ["model.quantization=none", f"model.attn_implementation={attn}",
                                 "training.padding_free=true", "adapter.dropout=0.0"])
    model = load_base_model(recipe.model, str(tiny_model_path))
    tok = load_tokenizer(recipe.model, str(tiny_model_path))
    data = load_phase_data(recipe.phases[1], 1, seed=0)
    trainer = SFTTrainer(model=model, args=sft_config(recipe.phase_training(1), recipe.model, tmp_path),
                         train_dataset=data.for_trainer(), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one flat sequence, no padding
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) - 1 == 8
    model.train()  # as in training: no KV cache, dropout off in this recipe
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        for lo, hi in zip(starts, starts[1:]):
            ids, labels = batch["input_ids"][:, lo:hi], batch["labels"][0, lo:hi]
            alone = model(input_ids=ids).logits[0]
            packed_loss = torch.nn.functional.cross_entropy(logits[lo:hi - 1], labels[1:], ignore_index=-100, reduction="sum")
            alone_loss = torch.nn.functional.cross_entropy(alone[:-1], labels[1:], ignore_index=-100, reduction="sum")
            assert packed_loss.item() == pytest.approx(alone_loss.item(), rel=1e-5, abs=1e-4)


@pytest.mark.slow
def test_padding_free_phase_trains_and_counts_only_real_tokens(tmp_path) -> None:
    padded, flat = tmp_path / "padded", tmp_path / "flat"
    assert main([str(SMOKE), f"output_dir={padded}", "eval.tasks=[]", "training.max_steps=6"]) == 0
    assert main([str(SMOKE), f"output_dir={flat}", "eval.tasks=[]", "training.max_steps=6", "training.padding_free=true"]) == 0
    a, b = RunManifest.read(padded), RunManifest.read(flat)
    for k in (1, 2):  # same examples in the same order: the same non-padding tokens
        assert a.phases[k].train.tokens == b.phases[k].train.tokens


def test_liger_without_a_gpu_is_a_clear_error(tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    code = main([str(SMOKE), f"output_dir={tmp_path / 'o'}", "training.use_liger_kernel=true", "eval.tasks=[]"])
    assert code == 2
    assert "training.use_liger_kernel: Liger kernels need a CUDA GPU" in capsys.readouterr().err
