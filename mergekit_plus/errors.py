"""The exception tree. The CLI maps each type to an exit code and a short message."""

from __future__ import annotations


class MergeError(Exception):
    """Base class of every error the toolkit reports to a user.

    `hint` is the next step for the user; the CLI prints it under the message.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  fix: {self.hint}"
        return self.message


class RecipeError(MergeError):
    """The recipe is invalid. `problems` lists every problem found, each with its YAML location."""

    exit_code = 1

    def __init__(self, problems: list[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        count = len(self.problems)
        header = f"{count} problem{'s' if count != 1 else ''}{where}:"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


class InputError(MergeError):
    """An input checkpoint is missing, broken, or incompatible with the others."""

    exit_code = 2


class OutputError(MergeError):
    """The output folder cannot be written as requested."""

    exit_code = 3


class MergeValueError(MergeError):
    """A merged tensor contains values that cannot be stored: NaN, infinity, or out of the output dtype's range."""

    exit_code = 4


class HubError(MergeError):
    """Publishing to the Hugging Face Hub failed: no token or a rejected one, offline mode, or a failed request.

    The message states what the Hub already contains and what it does not, so the user can tell whether to retry.
    """

    exit_code = 5
