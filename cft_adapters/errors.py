"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations


class CftError(Exception):
    """A problem with the user's input or environment. `exit_code` is what the CLI returns."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class RecipeError(CftError):
    """The recipe (or an override) is invalid. One line per problem, each with file and key path."""


class DataError(CftError):
    """A data source cannot be read or does not have the expected shape."""


class HubUnavailable(DataError):
    """A hub dataset could not be read (offline, gated, wrong id or config)."""


class RunError(CftError):
    """The run directory does not fit this recipe, or a phase failed."""

    exit_code = 1
