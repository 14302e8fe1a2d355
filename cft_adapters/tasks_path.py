"""Where the `cft_*` lm-eval task YAMLs are installed. `python -m cft_adapters.tasks_path` prints it,
for the stock CLI: `lm_eval --include_path "$(python -m cft_adapters.tasks_path)" --tasks cft_...`."""

from __future__ import annotations

from pathlib import Path


def tasks_dir() -> Path:
    """The installed `lm_eval_tasks` package folder (the repository folder in an editable install)."""
    import lm_eval_tasks

    return Path(lm_eval_tasks.__file__).resolve().parent


if __name__ == "__main__":
    print(tasks_dir())
