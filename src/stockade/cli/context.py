"""Opening the embedded control plane for commands that need it."""

from __future__ import annotations

import getpass
from typing import TYPE_CHECKING

from stockade.config import Settings, ensure_home, load_settings
from stockade.control import AdmissionPolicy, ControlService, JobView
from stockade.errors import UsageError
from stockade.secrets.broker import Broker
from stockade.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from stockade.secrets.oidc import KeyRing


def open_control() -> tuple[Settings, ControlService]:
    """Settings, the state directory, and the control service over the embedded store."""
    settings = load_settings()
    ensure_home(settings)
    store = SqliteStore(settings.db_path)
    actor = f"cli:{getpass.getuser()}"
    return settings, ControlService(store, actor=actor, broker=open_broker(settings, store),
                                    identity=lambda: open_keyring(settings),
                                    policy=admission_policy(settings))


def admission_policy(settings: Settings) -> AdmissionPolicy:
    """The operator's admission settings, as the control plane takes them."""
    return AdmissionPolicy(
        oidc_audiences_untrusted=settings.oidc_audiences_untrusted,
        oidc_audiences_trusted=settings.oidc_audiences_trusted,
        oidc_audiences_protected=settings.oidc_audiences_protected,
        egress_untrusted_allow=settings.egress_untrusted_allow,
    )


def open_keyring(settings: Settings) -> KeyRing:
    """The control plane's OIDC signing keys (created on first use)."""
    from stockade.secrets.oidc import KeyRing

    return KeyRing(settings.home / "oidc", settings.oidc_issuer)


def open_broker(settings: Settings, store: SqliteStore) -> Broker:
    """The secrets broker; the master key is read (or created) only when a value is needed."""
    from stockade.secrets.vault import Vault

    def vault() -> Vault:
        return Vault.open(settings.master_key_path, create=not settings.master_key_file)

    return Broker(store, vault, actor=f"cli:{getpass.getuser()}")


def require_job(control: ControlService, id_or_prefix: str) -> JobView:
    """The job, or a UsageError naming the fix."""
    view = control.view(id_or_prefix)
    if view is None:
        raise UsageError(f"no job matches {id_or_prefix!r} (or the prefix is ambiguous)",
                         hint="list jobs with: stockade jobs")
    return view
