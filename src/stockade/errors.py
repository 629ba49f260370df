"""The stockade exception tree.

Every error raised on purpose by stockade derives from :class:`StockadeError` and carries a
``diagnostics()`` text meant for a person. The CLI maps each branch to an exit code::

    StockadeError
    ├── UsageError                 exit 2  (bad command line, unknown job id)
    │   └── SpecError              exit 2  (invalid job spec: path + problem + fix)
    ├── PolicyDenied               exit 3  (admission refused the job)
    ├── InfrastructureError        exit 4  (the host cannot run the job safely)
    │   ├── SandboxError           exit 4  (the sandbox could not be prepared or started)
    │   └── StoreError             exit 4  (the state database is unusable)
    └── ConfigError                exit 2  (bad settings file or STOCKADE_* variable)

Foreign exceptions (OSError, sqlite3.Error, pydantic.ValidationError, ...) are translated into
this tree where they enter stockade (``raise ... from e``); none reach the user as a traceback.
"""

from __future__ import annotations


class StockadeError(Exception):
    """Base of every error stockade raises on purpose."""

    exit_code = 4

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """A text for a person: what went wrong and how to fix it."""
        return f"{self.message}\nhint: {self.hint}" if self.hint else self.message


class UsageError(StockadeError):
    """The command line or an argument is wrong."""

    exit_code = 2


class SpecError(UsageError):
    """The job spec is invalid; ``problems`` lists each ``path: problem`` line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: invalid job spec")
        self.problems = problems

    def diagnostics(self) -> str:
        """All problems, one per line, under the file name."""
        return "\n".join([self.message, *(f"  {p}" for p in self.problems)])


class ConfigError(StockadeError):
    """A settings file or STOCKADE_* variable is invalid."""

    exit_code = 2


class PolicyDenied(StockadeError):
    """Admission refused the job."""

    exit_code = 3


class InfrastructureError(StockadeError):
    """The host cannot run the job with the full hardening baseline."""

    exit_code = 4


class SandboxError(InfrastructureError):
    """The sandbox could not be prepared, started or torn down."""


class StoreError(InfrastructureError):
    """The state database could not be opened, migrated or written."""
