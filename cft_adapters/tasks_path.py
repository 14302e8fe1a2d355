"""Where the `cft_*` lm-eval task YAMLs are installed. `python -m cft_adapters.tasks_path` prints it,
for the stock CLI: `lm_eval --include_path "$(python -m cft_adapters.tasks_path)" --tasks cft_...`.

A recipe's `eval.include_path` adds the user's own task folders. The command that runs the recipe
(cft-train, its dry run, cft-eval, cft-study, cft tables) calls `use_include_paths` once; lm-eval's
task manager, the report's task declarations and the score cache's key then see the bundled
folder and those (`task_dirs`).
"""

from __future__ import annotations

from pathlib import Path

_extra: list[Path] = []


def tasks_dir() -> Path:
    """The installed `lm_eval_tasks` package folder (the repository folder in an editable install)."""
    import lm_eval_tasks

    return Path(lm_eval_tasks.__file__).resolve().parent


def use_include_paths(paths: list[str] | tuple[str, ...]) -> None:
    """The user's task folders searched with the bundled ones, from now on in this process."""
    _extra[:] = [Path(p).resolve() for p in paths]


def task_dirs() -> tuple[Path, ...]:
    """The bundled task folder, then the include paths in use."""
    return (tasks_dir(), *(p for p in _extra if p != tasks_dir()))


if __name__ == "__main__":
    print(tasks_dir())
