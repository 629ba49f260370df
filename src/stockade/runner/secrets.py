"""The runner's side of secrets: redeem the job's leases, deliver, mask, and look for leaks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stockade.api.protocol import Assignment, ControlPlane
from stockade.errors import PolicyDenied
from stockade.secrets.redact import Masker


class JobSecrets:
    """The values of one attempt's secrets, held in memory only, and what became of them."""

    def __init__(self, control: ControlPlane, a: Assignment, runner_id: str) -> None:
        self.masker = Masker()
        self.env: dict[str, str] = {}
        self.files: dict[str, bytes] = {}
        self.reports: list[tuple[str, dict[str, Any]]] = []
        self.leaks: list[tuple[str, list[str]]] = []
        for grant in a.secrets:
            value = control.redeem(grant.lease_id, a.job_id, a.attempt, runner_id)
            self.masker.add(value, name=grant.name)
            if grant.delivery == "file":
                self.files[grant.name] = value
            elif b"\0" in value:
                raise PolicyDenied(f"secret {grant.name} contains a NUL byte and cannot be an "
                                   "environment variable", hint="request it with as: file")
            else:
                self.env[grant.name] = value.decode("utf-8", errors="surrogateescape")

    def mask_registered(self, length: int) -> None:
        """Audit an ``::add-mask::`` registration (never the value)."""
        self.reports.append(("secret.mask_registered", {"source": "add-mask",
                                                        "length": length}))

    def scan(self, path: Path) -> tuple[set[str], str | None]:
        """Secrets found in a file about to be published (inside archives too), and why the
        file could not be scanned completely, if it could not."""
        if not self.masker:
            return set(), None
        from stockade.secrets.leaks import scan_file  # archives' modules: only when needed

        result = scan_file(path, self.masker)
        return set(result.found), result.unscannable

    def names_in(self, text: str) -> list[str]:
        """The secrets whose values (or encodings) occur in a job-chosen string."""
        return sorted(self.masker.names_in(text.encode("utf-8", "surrogateescape")))

    def leaked(self, where: str, names: list[str]) -> None:
        """Record a leak (the secret's name, never its value)."""
        self.leaks.append((where, names))
        for name in names:
            self.reports.append(("secret.leak", {"secret": name, "where": where}))
