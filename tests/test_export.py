"""`cft export`: a phase's adapter merged into a plain checkpoint that transformers loads, equal in
logits to base + adapter; the adapter alone; never over an existing folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cft_adapters.cli import cft_main
from cft_adapters.manifest import RunManifest


@pytest.mark.slow
def test_the_merged_checkpoint_loads_and_matches_base_plus_adapter(smoke_run: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert cft_main(["export", str(smoke_run), str(out), "--phase", "1", "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    manifest = RunManifest.read(smoke_run)
    base = AutoModelForCausalLM.from_pretrained(manifest.base_model_path, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(smoke_run / manifest.phases[1].checkpoint)).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = merged(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    card = (out / "README.md").read_text()
    assert "phase 1 'english'" in card and "| 1 english | builtin:smoke/en_tasks.jsonl | en |" in card
    assert "NF4" in card and "## Scores" in card and "phase 2" not in card.split("## Recipe")[0].split("## Phases")[1]


@pytest.mark.slow
def test_adapter_only_and_no_overwrite(smoke_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "adapter"
    assert cft_main(["export", str(smoke_run), str(out), "--adapter-only"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert "library_name: peft" in (out / "README.md").read_text()
    before = sorted(p.name for p in out.iterdir())
    assert cft_main(["export", str(smoke_run), str(out), "--adapter-only"]) == 2
    assert "already exists" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before
    assert cft_main(["export", str(smoke_run), str(tmp_path / "x"), "--phase", "7"]) == 2
    assert "--phase 7: not a finished phase" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial"))
