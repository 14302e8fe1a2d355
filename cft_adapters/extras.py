"""Optional dependencies, grouped as the package's extras: what each subcommand needs beyond the core
(training, evaluation, reports), and one message naming the extra when it is missing."""

from __future__ import annotations

import importlib.util

from cft_adapters.errors import CftError

# extra -> the modules it provides (pyproject.toml's [project.optional-dependencies] lists the packages)
EXTRAS: dict[str, tuple[str, ...]] = {
    "analysis": ("sentence_transformers",),  # cft-analyze similarity (DES)
    "study": ("scipy", "submitit"),  # cft-study: intervals and tests; the local / slurm launchers
    "gguf": ("gguf",),  # GGUF checkpoints (model.gguf_file, builtin:smollm2-135m-instruct)
    "alpaca": ("alpaca_eval",),  # AlpacaEval's judging
    "tracking": ("tensorboard",),  # training.report_to: [tensorboard]
    "gpu": ("liger_kernel",),  # training.use_liger_kernel
}


def missing(extra: str) -> list[str]:
    return [module for module in EXTRAS[extra] if importlib.util.find_spec(module) is None]


def install_hint(extra: str) -> str:
    return f"pip install 'cft-adapters[{extra}]'"


def require(extra: str, what: str) -> None:
    """Raise a one-line error naming the extra `what` needs, when any of its modules is missing."""
    absent = missing(extra)
    if absent:
        raise CftError(f"{what} needs the '{extra}' extra ({', '.join(absent)} is not installed): "
                       f"{install_hint(extra)} (from a checkout: pip install -e '.[{extra}]')")
