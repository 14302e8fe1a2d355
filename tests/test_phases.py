"""End to end through the real CLI, SFTTrainer, PEFT and bitsandbytes NF4, on the tiny model."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cft_adapters.cli import main
from cft_adapters.manifest import RunManifest
from cft_adapters.modeling import adapter_file_digest, load_base_model
from cft_adapters.phases import PhaseRunner
from cft_adapters.recipe import load_recipe

from conftest import SMOKE

pytestmark = pytest.mark.slow


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_smoke_run_directory_matches_the_contract(smoke_run: Path) -> None:
    assert (smoke_run / "recipe.resolved.yaml").is_file()
    manifest = json.loads((smoke_run / "run.json").read_text())
    assert {"recipe", "base_model", "seed", "versions", "phases"} <= set(manifest)
    assert manifest["chat_template"]["source"] == "tokenizer"  # the tiny model ships its own
    assert manifest["versions"]["trl"] and manifest["versions"]["peft"]
    assert [p["index"] for p in manifest["phases"]] == [0, 1, 2]
    assert [p["status"] for p in manifest["phases"]] == ["done"] * 3
    assert manifest["phases"][0]["checkpoint"] is None
    for phase in manifest["phases"][1:]:
        assert phase["checkpoint"] == f"phase_{phase['index']}_{phase['name']}/adapter"
        assert sorted(os.listdir(smoke_run / phase["checkpoint"])) == [
            "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.cft.json"]
        saved_template = json.loads((smoke_run / phase["checkpoint"] / "chat_template.cft.json").read_text())
        assert saved_template["sha256"] == manifest["chat_template"]["sha256"] and saved_template["template"]
        train = phase["train"]
        assert {"steps", "tokens", "seconds", "tokens_per_second", "peak_memory_mb"} <= set(train)
        assert train["steps"] == 24 and train["tokens"] > 1000 and train["tokens_per_second"] > 0
        assert not (smoke_run / f"phase_{phase['index']}_{phase['name']}" / "trainer").exists()
    assert manifest["phases"][1]["data"]["languages"] == {"en": 64}
    assert manifest["phases"][2]["data"]["languages"] == {"de": 32, "fr": 32}
    assert not list(smoke_run.rglob(".adapter.tmp-*"))


def test_resolved_recipe_loads_back_unchanged(smoke_run: Path) -> None:
    from cft_adapters.recipe import dump_recipe

    resolved = smoke_run / "recipe.resolved.yaml"
    assert dump_recipe(load_recipe(resolved)) == resolved.read_text()


def test_each_adapter_loads_with_plain_peft(smoke_run: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    manifest = RunManifest.read(smoke_run)
    for phase in manifest.phases[1:]:
        adapter_dir = smoke_run / str(phase.checkpoint)
        base = AutoModelForCausalLM.from_pretrained(manifest.base_model_path)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
        loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert len(loaded) == len(saved) > 0
        for name, tensor in saved.items():
            live = loaded[name.replace(".weight", ".default.weight")]
            assert torch.equal(live, tensor), name
        out = model(torch.tensor([[1, 2, 3]]))
        assert torch.isfinite(out.logits).all()


def test_adapter_changed_in_every_phase_and_phase2_starts_from_phase1(smoke_run: Path) -> None:
    manifest = RunManifest.read(smoke_run)
    p1, p2 = manifest.phases[1], manifest.phases[2]
    assert p1.train.init_adapter is None
    assert p1.train.init_digest != p1.train.final_digest
    assert p2.train.init_adapter == "phase_1_english/adapter"
    assert p2.train.init_digest == adapter_file_digest(smoke_run / str(p1.checkpoint))
    assert p2.train.final_digest != p2.train.init_digest
    assert adapter_file_digest(smoke_run / str(p2.checkpoint)) == p2.train.final_digest


def test_base_weights_bitwise_unchanged_and_every_lora_tensor_trained(tmp_path, tiny_model_path) -> None:
    recipe = load_recipe(SMOKE, [f"output_dir={tmp_path / 'run'}", "phases[1].training.max_steps=4"])
    runner = PhaseRunner(recipe, str(SMOKE))
    runner.run()
    fresh = load_base_model(recipe.model, str(tiny_model_path))
    fresh_state = fresh.state_dict()
    trained = runner.model.peft.get_base_model().state_dict()
    base_keys = [k for k in trained if "lora_" not in k]
    assert len(base_keys) == len(fresh_state)
    for key in base_keys:
        plain = key.replace(".base_layer", "")
        assert torch.equal(trained[key], fresh_state[plain]), key
    # 4-bit weights really are NF4 here: the QLoRA path ran, not a float fallback.
    q_proj = runner.model.peft.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.quant_state.quant_type == "nf4"

    from safetensors.torch import load_file

    p1 = load_file(str(tmp_path / "run/phase_1_english/adapter/adapter_model.safetensors"))
    p2 = load_file(str(tmp_path / "run/phase_2_french_german/adapter/adapter_model.safetensors"))
    for name in p1:
        assert not torch.equal(p1[name], p2[name]), f"{name} did not train in phase 2"


def test_same_seed_gives_identical_adapters(tmp_path, smoke_run) -> None:
    assert main([str(SMOKE), f"output_dir={tmp_path / 'again'}"]) == 0
    for phase in ("phase_1_english", "phase_2_french_german"):
        again = tmp_path / "again" / phase / "adapter" / "adapter_model.safetensors"
        first = smoke_run / phase / "adapter" / "adapter_model.safetensors"
        assert hashlib.sha256(again.read_bytes()).hexdigest() == hashlib.sha256(first.read_bytes()).hexdigest()


def test_rerun_skips_finished_phases_and_rewrites_nothing(smoke_run: Path, capsys) -> None:
    before = {p: _file_hashes(smoke_run / p / "adapter") for p in ("phase_1_english", "phase_2_french_german")}
    mtimes = {p: (smoke_run / p / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns for p in before}
    assert main([str(SMOKE), f"output_dir={smoke_run}"]) == 0
    assert "done, skipped" in capsys.readouterr().out
    for p in before:
        assert _file_hashes(smoke_run / p / "adapter") == before[p]
        assert (smoke_run / p / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtimes[p]


def test_changed_recipe_on_finished_run_is_refused(smoke_run: Path, capsys) -> None:
    code = main([str(SMOKE), f"output_dir={smoke_run}", "training.learning_rate=1e-3"])
    output = capsys.readouterr()
    assert code == 1
    assert "phase 1 'english' is finished there with a different recipe" in output.err
    assert "training.learning_rate" in output.err


def test_kill_mid_phase2_then_resume(tmp_path) -> None:
    out = tmp_path / "run"
    args = [str(SMOKE), f"output_dir={out}", "phases[1].training.num_train_epochs=10", "phases[1].training.save_steps=10"]
    proc = subprocess.Popen([sys.executable, "-m", "cft_adapters.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    trainer_dir = out / "phase_2_french_german" / "trainer"
    # Wait on the event itself (a checkpoint of phase 2 on disk), however slow the machine is; a
    # run that never gets there fails as "timed out", never by killing too early.
    deadline = time.monotonic() + 900
    while proc.poll() is None and not list(trainer_dir.glob("checkpoint-*/trainer_state.json")):
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out after 900 s waiting for phase 2's first checkpoint")
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    phase1 = _file_hashes(out / "phase_1_english" / "adapter")
    manifest = RunManifest.read(out)
    assert manifest.phases[1].status == "done" and manifest.phases[2].status == "running"
    assert not (out / "phase_2_french_german" / "adapter").exists()

    assert main(args) == 0
    manifest = RunManifest.read(out)
    assert manifest.phases[2].status == "done"
    assert manifest.phases[2].train.resumed_from.startswith("phase_2_french_german/trainer/checkpoint-")
    assert manifest.phases[2].train.steps == 80
    assert _file_hashes(out / "phase_1_english" / "adapter") == phase1


def test_nan_loss_stops_with_a_clear_message(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main([str(SMOKE), f"output_dir={out}", "training.learning_rate=1e30"])
    err = capsys.readouterr().err
    assert code == 1
    assert "phase 1 'english': adapter weights became non-finite (nan/inf) at step" in err
    assert "Traceback" not in err
    manifest = RunManifest.read(out)
    assert manifest.phases[1].status == "failed" and "non-finite" in manifest.phases[1].error
    assert not (out / "phase_1_english" / "adapter").exists()


def test_nan_guard_keeps_the_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    """Phase 1 trains normally past its step-8 checkpoint, then its weights are poisoned at step 10."""
    import cft_adapters.phases as phases
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import cft_adapters.train_phase as train_phase

    real_guard = train_phase.NonFiniteGuard

    class PoisonThenGuard(TrainerCallback):
        def __init__(self, model):
            self.guard = real_guard(model)

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 10:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

        def on_step_end(self, *args, **kwargs):
            self.guard.on_step_end(*args, **kwargs)

    monkeypatch.setattr(train_phase, "NonFiniteGuard", PoisonThenGuard)
    recipe = load_recipe(SMOKE, [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(phases.RunError) as exc:
        PhaseRunner(recipe, str(SMOKE)).run()
    assert "non-finite" in str(exc.value) and "checkpoint-8" in str(exc.value)
    saved = load_file(str(tmp_path / "run/phase_1_english/trainer/checkpoint-8/adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (tmp_path / "run/phase_1_english/trainer/checkpoint-16").exists()


def test_a_token_budget_stop_never_saves_non_finite_weights(tmp_path, monkeypatch) -> None:
    """The budget stops training at step 1, a step neither logged nor saved (the guard's step check
    is skipped there): the weights, poisoned at that step, are caught before the adapter is saved."""
    import cft_adapters.phases as phases
    import cft_adapters.train_phase as train_phase

    class PoisonFirstStep(train_phase.NonFiniteGuard):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step == 0:
                with torch.no_grad():
                    self.params[0].fill_(float("nan"))

    monkeypatch.setattr(train_phase, "NonFiniteGuard", PoisonFirstStep)
    recipe = load_recipe(SMOKE, [f"output_dir={tmp_path / 'run'}", "eval.tasks=[]", "training.token_budget=1",
                                 "training.logging_steps=50", "training.save_steps=50"])
    with pytest.raises(phases.RunError) as exc:
        PhaseRunner(recipe, str(SMOKE)).run()
    assert "non-finite" in str(exc.value) and "step 1" in str(exc.value)
    assert not (tmp_path / "run/phase_1_english/adapter").exists()
    assert RunManifest.read(tmp_path / "run").phases[1].status == "failed"


def test_phase1_moved_every_tensor_from_its_init(smoke_run: Path, tiny_model_path) -> None:
    from safetensors.torch import load_file
    from transformers import set_seed

    from cft_adapters.modeling import adapter_state, new_adapter, tensors_digest

    recipe = load_recipe(SMOKE)
    set_seed(recipe.phase_training(0).seed)
    init = adapter_state(new_adapter(load_base_model(recipe.model, str(tiny_model_path)), recipe.adapter))
    # init_digest is taken as the trainer trains the adapter: TRL casts a QLoRA adapter to bf16.
    init = {name: tensor.to(torch.bfloat16) for name, tensor in init.items()}
    assert tensors_digest(init) == RunManifest.read(smoke_run).phases[1].train.init_digest
    trained = load_file(str(smoke_run / "phase_1_english/adapter/adapter_model.safetensors"))
    assert set(trained) == set(init)
    for name in trained:
        assert not torch.equal(trained[name], init[name]), f"{name} did not train in phase 1"


def _as_if_killed_after_save(run: Path, index: int) -> None:
    """The state a kill leaves between the adapter rename and the run.json update."""
    manifest = json.loads((run / "run.json").read_text())
    manifest["phases"][index]["status"] = "running"
    manifest["phases"][index]["checkpoint"] = None
    (run / "run.json").write_text(json.dumps(manifest))


def test_saved_but_unrecorded_adapter_is_recorded_not_retrained(smoke_run: Path, tmp_path, capsys) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    _as_if_killed_after_save(run, 2)
    stamp = (run / "phase_2_french_german/adapter/adapter_model.safetensors").stat().st_mtime_ns
    assert main([str(SMOKE), f"output_dir={run}"]) == 0
    assert "adapter was already saved; recorded as done" in capsys.readouterr().out
    assert RunManifest.read(run).phases[2].status == "done"
    assert (run / "phase_2_french_german/adapter/adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_unrecorded_adapter_from_other_settings_is_kept_aside(smoke_run: Path, tmp_path, capsys) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    _as_if_killed_after_save(run, 2)
    old = _file_hashes(run / "phase_2_french_german/adapter")
    assert main([str(SMOKE), f"output_dir={run}", "phases[1].training.learning_rate=1e-3", "eval.tasks=[]"]) == 0
    assert "was moved to" in " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    aside = list((run / "phase_2_french_german").glob("stale-*/adapter"))
    assert len(aside) == 1 and _file_hashes(aside[0]) == old
    assert _file_hashes(run / "phase_2_french_german/adapter") != old


VARIANTS = sorted(p.name for p in SMOKE.parent.glob("smoke_*.yaml"))


@pytest.mark.parametrize("name", VARIANTS)
def test_shipped_smoke_variant_runs_end_to_end(name: str, tmp_path) -> None:
    out = tmp_path / "run"
    assert main([str(SMOKE.parent / name), f"output_dir={out}", "eval.tasks=[]"]) == 0
    manifest = RunManifest.read(out)
    assert all(p.status == "done" for p in manifest.phases)
    last = manifest.phases[-1]
    if "_gr" in name or "_er" in name:
        assert (out / last.dirname / "replay.jsonl").is_file() and last.replay["replayed_examples"] > 0
    if "_lf_" in name or "spectrum" in name:
        assert (out / last.dirname / "placement.json").is_file() and len(last.placement["frozen"]) == 2
    if "mixed" in name:
        assert [p.name for p in manifest.phases] == ["base", "mixed"]
