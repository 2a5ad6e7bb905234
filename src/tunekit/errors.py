"""User-facing errors.

A `TunekitError` is a mistake the user can fix (bad data, bad config, missing model). The CLI prints
its message without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TunekitError(Exception):
    """An error caused by user input. The message names the file, line or key and the fix."""


class DataError(TunekitError):
    """One or more data rows could not be read. `problems` lists every one of them."""

    def __init__(self, problems: list[str], header: str = "data errors"):
        self.problems = problems
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"{header} ({len(problems)}):\n  " + "\n  ".join(shown) + more)


class ConfigError(TunekitError):
    """The config has one or more errors; all are reported at once."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} error(s):\n  " + "\n  ".join(problems))


class ModelError(TunekitError):
    """A model spec could not be resolved or loaded."""


class Interrupted(TunekitError):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint; `exit_code` follows the shell
    convention (128 + signal number)."""

    def __init__(self, message: str, exit_code: int):
        self.exit_code = exit_code
        super().__init__(message)
