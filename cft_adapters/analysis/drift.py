"""Representation drift between consecutive checkpoints of a run, layer by layer.

On a fixed probe set (default: the held-out English prompts of cft_smoke_en_gen), each checkpoint's
hidden states are mean-pooled over the prompt's tokens, giving one N × H matrix per layer. For each
pair of consecutive checkpoints (X before, Y after), per layer:

- mean shift: ‖mean(Y) − mean(X)‖ / ‖mean(X)‖
- covariance shift: ‖Cov(Y) − Cov(X)‖_F / ‖Cov(X)‖_F
- CKA: linear centered kernel alignment ‖Yᶜᵀ Xᶜ‖_F² / (‖Xᶜᵀ Xᶜ‖_F · ‖Yᶜᵀ Yᶜ‖_F); 1 = same geometry

The base is loaded once and the adapters are swapped in place, as in evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cft_adapters import modeling
from cft_adapters.errors import CftError
from cft_adapters.evaluation import CheckpointScorer, eval_model_config, training_precision
from cft_adapters.manifest import RunManifest
from cft_adapters.util.jsonl import read_jsonl
from cft_adapters.util.plot import pyplot, save_figure


PROBE_FILE = Path(__file__).resolve().parents[1] / "data" / "probes" / "general_en.jsonl"


def default_probe() -> list[str]:
    """88 general English instructions written for this project in the MT-Bench spirit (11 each of
    writing, reasoning, maths, coding, extraction, STEM, humanities, role-play)."""
    return [row["prompt"] for row in read_jsonl(PROBE_FILE)]


def probe_digest(prompts: list[str]) -> str:
    """Which probe a drift.json was made on (the prompts themselves, not just their count)."""
    from cft_adapters.util.digest import canonical_json, short_digest

    return short_digest(canonical_json(prompts))


def drift_checkpoints(manifest: RunManifest) -> list[dict[str, Any]]:
    """The checkpoints drift compares: the base and every finished phase, each with its adapter's
    digest, so a drift.json made before a phase was retrained or added no longer matches."""
    return [{"index": r.index, "name": r.name, "adapter": r.train.final_digest if r.train else None}
            for r in manifest.phases if r.index == 0 or r.status == "done"]


def read_probe(path: Path, where: str = "--probe") -> list[str]:
    """The probe's prompts; `where` is what the user wrote it as (--probe, or analysis.drift_probe)."""
    try:
        rows = read_jsonl(path)
        prompts = [r["prompt"] for r in rows]
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("every 'prompt' must be non-empty text")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CftError(f"{where} {path}: expected JSON Lines with a 'prompt' field ({exc})") from None
    if not prompts:
        raise CftError(f"{where} {path}: no prompts")
    return prompts


@torch.no_grad()
def pooled_hidden_states(model: Any, tokenizer: Any, prompts: list[str], batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer (embeddings first), an N × H matrix of token-mean hidden states, in float64."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    layers: list[list[torch.Tensor]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                     for p in prompts[start:start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model(**enc, output_hidden_states=True, use_cache=False)
            mask = enc["attention_mask"].unsqueeze(-1).to(torch.float64)
            for i, h in enumerate(out.hidden_states):
                pooled = (h.to(torch.float64) * mask).sum(1) / mask.sum(1)
                if len(layers) <= i:
                    layers.append([])
                layers[i].append(pooled.cpu())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [torch.cat(chunks) for chunks in layers]


def mean_shift(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(y.mean(0) - x.mean(0)) / torch.linalg.norm(x.mean(0)).clamp_min(1e-12))


def covariance_shift(x: torch.Tensor, y: torch.Tensor) -> float:
    cx, cy = torch.cov(x.T), torch.cov(y.T)
    return float(torch.linalg.matrix_norm(cy - cx) / torch.linalg.matrix_norm(cx).clamp_min(1e-12))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    xc, yc = x - x.mean(0), y - y.mean(0)
    num = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    return float(num / den) if den > 0 else 1.0


def layer_drift(before: list[torch.Tensor], after: list[torch.Tensor]) -> dict[str, list[float]]:
    return {
        "mean_shift": [mean_shift(x, y) for x, y in zip(before, after)],
        "covariance_shift": [covariance_shift(x, y) for x, y in zip(before, after)],
        "cka": [linear_cka(x, y) for x, y in zip(before, after)],
    }


def run_drift(run_dir: Path, prompts: list[str], console: Any, batch_size: int = 8, *,
              allow_remote_code: bool = False, probe_source: str | None = None) -> dict[str, Any]:
    """`allow_remote_code`: honour `model.trust_remote_code: true` in the run's resolved recipe.
    `probe_source`: the probe file the prompts came from, recorded (None: the bundled probe)."""
    from cft_adapters.rundir import checked_manifest, inside, run_settings

    manifest: RunManifest = checked_manifest(run_dir)
    records = [r for r in manifest.phases if r.index == 0 or r.status == "done"]
    checkpoints = drift_checkpoints(manifest)
    if len(records) < 2:
        raise CftError(f"{run_dir}: drift compares consecutive checkpoints, and this run has only the base "
                       f"(no finished phase yet)")
    model_cfg, eval_cfg = run_settings(run_dir, allow_remote_code=allow_remote_code)
    cfg = eval_model_config(model_cfg, training_precision(model_cfg))
    path = modeling.resolve_model_path(cfg)
    tokenizer = modeling.load_tokenizer(cfg, path)
    scorer = CheckpointScorer(eval_cfg, tokenizer, modeling.load_base_model(cfg, path))
    features = {}
    for record in records:
        console.print(f"drift: hidden states of phase {record.index} '{record.name}' on {len(prompts)} probe prompts")
        with scorer.model_for(inside(run_dir, run_dir / record.checkpoint) if record.checkpoint else None) as model:
            features[record.index] = pooled_hidden_states(model, tokenizer, prompts, batch_size)
    transitions = []
    for prev, cur in zip(records, records[1:]):
        transitions.append({"from": f"{prev.index} {prev.name}", "to": f"{cur.index} {cur.name}",
                            **layer_drift(features[prev.index], features[cur.index])})
    return {"run": str(run_dir), "probe": probe_source, "probe_prompts": len(prompts),
            "probe_digest": probe_digest(prompts), "checkpoints": checkpoints, "layers": len(features[0]),
            "layer_index_note": "index 0 is the embedding output; index i is the output of block i-1",
            "transitions": transitions}


def drift_outputs(run_dir: Path, out: Path | None = None) -> tuple[Path, Path]:
    """The JSON and PNG paths: `out` as the user gave it, or <run_dir>/analysis/drift.json, which
    must stay inside the run directory (a symlinked analysis/ folder could lead elsewhere)."""
    from cft_adapters.rundir import inside

    if out is None:
        out = run_dir / "analysis" / "drift.json"
        for path in (out, out.with_suffix(".png")):
            inside(run_dir, path)
    return out, out.with_suffix(".png")


def plot_drift(result: dict[str, Any], path: Path) -> None:
    import numpy as np

    plt = pyplot()

    names = [f"{t['from'].split()[0]}→{t['to'].split()[0]}" for t in result["transitions"]]
    panels = [("mean_shift", "mean shift"), ("covariance_shift", "covariance shift"), ("cka", "1 − CKA")]
    fig, axes = plt.subplots(1, 3, figsize=(10, max(3, 0.25 * result["layers"] + 1.5)))
    for ax, (key, title) in zip(axes, panels):
        grid = np.array([t[key] for t in result["transitions"]]).T
        if key == "cka":
            grid = 1 - grid
        im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
        ax.set_title(title)
        ax.set_xticks(range(len(names)), names)
        ax.set_xlabel("transition")
        ax.set_ylabel("layer (0 = embeddings)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path)
