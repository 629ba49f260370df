"""Opening the embedded control plane for commands that need it."""

from __future__ import annotations

import getpass
import shutil
import sys
import threading
from typing import TYPE_CHECKING

from stockade import liveness
from stockade.config import Settings, ensure_home, load_settings
from stockade.control import AdmissionPolicy, ControlService, JobView
from stockade.errors import UsageError
from stockade.secrets.broker import Broker
from stockade.store.interface import Store
from stockade.store.open import open_store

if TYPE_CHECKING:
    from stockade.control.fleet import FleetService
    from stockade.image.cache import ImageCache
    from stockade.sandbox.interface import Backend
    from stockade.secrets.oidc import KeyRing
    from stockade.secrets.vault import Vault


_OPEN: list[Store] = []


def open_control(recover: bool = True, local_runner: bool = False
                 ) -> tuple[Settings, ControlService]:
    """Settings, the state directory, and the control service over the embedded store; jobs
    whose runner is gone are failed first (so no command shows them running), unless the
    caller does that itself (``recover=False``: ``run`` reaps sandboxes too). With
    ``local_runner`` (``stockade run``) every job is for this host's runner: admission refuses
    what its sandbox backend cannot run."""
    settings = load_settings()
    ensure_home(settings)
    store = open_store(settings)
    _OPEN.append(store)
    actor = f"cli:{getpass.getuser()}"
    control = ControlService(store, actor=actor, broker=open_broker(settings, store),
                             identity=lambda: open_keyring(settings),
                             policy=admission_policy(settings, local_runner),
                             resolve_image=lambda ref: resolve_image(settings, ref))
    if recover:
        recover_lost(settings, control)
    return settings, control


def close_control() -> None:
    """Close the databases :func:`open_control` opened (the last close merges SQLite's
    write-ahead log into the database file, so that the file alone holds every commit)."""
    while _OPEN:
        _OPEN.pop().close()


def recover_lost(settings: Settings, control: ControlService,
                 backend: Backend | None = None) -> list[str]:
    """Fail (runner_lost) the jobs whose runner died, whatever it was doing: its lock in the
    state directory is free (see ``liveness.py``) or, for runners without one, its lease
    expired. Their secret leases are revoked and partial artifacts removed; with ``backend``
    (root), what their sandboxes left is torn down too. Each is reported on stderr; returns
    their ids."""
    dead: set[str] = set()

    def runner_gone(runner_id: str) -> bool | None:
        state = liveness.gone(settings.home, runner_id)
        if state:
            dead.add(runner_id)
        return state

    def ours(job_id: str) -> bool:  # a job of this installation that no live runner holds
        job = control.job(job_id)
        if job is None:
            return False
        if job.status in ("queued", "running") and job.runner_id:
            return liveness.gone(settings.home, job.runner_id) is not False
        return True

    orphaned = backend.reap_orphans(ours) if backend is not None else []
    lost = control.fail_lost(orphaned, runner_gone)
    for job_id in lost:
        shutil.rmtree(settings.artifacts_dir / job_id, ignore_errors=True)
        sys.stderr.write(f"stockade: job {job_id} lost its runner; marked failed "
                         "(runner_lost)\n")
    for runner_id in dead:
        liveness.forget(settings.home, runner_id)
    return lost


RESOLVE_S = 20.0  # a tag's resolution at admission, all tries and reads
_RESOLVING = threading.BoundedSemaphore(4)  # at once per process: submits never wait on it


def resolve_image(settings: Settings, text: str) -> str:
    """``text`` (an image reference with a tag) pinned to the digest the registry names now,
    within ``RESOLVE_S``; at most four at once (a slow registry cannot tie up a server)."""
    from stockade.image.errors import ImageUnavailable
    from stockade.image.reference import parse_reference
    from stockade.image.registry import Registry
    from stockade.image.settings import registry_config

    ref = parse_reference(text)
    if not _RESOLVING.acquire(blocking=False):
        raise ImageUnavailable("other image tags are being resolved right now; pin the image "
                               "by digest (REGISTRY/REPO@sha256:...) or submit again")
    registry = Registry(registry_config(settings)).within(RESOLVE_S)
    try:
        return str(ref.with_digest(registry.resolve(ref)))
    finally:
        registry.close()
        _RESOLVING.release()


def admission_policy(settings: Settings, local_runner: bool = False) -> AdmissionPolicy:
    """The operator's admission settings, as the control plane takes them (with
    ``local_runner``, the backend of the runner that will take the job)."""
    return AdmissionPolicy(
        oidc_audiences_untrusted=settings.oidc_audiences_untrusted,
        oidc_audiences_trusted=settings.oidc_audiences_trusted,
        oidc_audiences_protected=settings.oidc_audiences_protected,
        egress_untrusted_allow=settings.egress_untrusted_allow,
        image_registries=settings.image_registries,
        runner_backend=settings.sandbox_backend if local_runner else "",
    )


def open_keyring(settings: Settings) -> KeyRing:
    """The control plane's OIDC signing keys (created on first use)."""
    from stockade.secrets.oidc import KeyRing

    return KeyRing(settings.home / "oidc", settings.oidc_issuer)


def open_broker(settings: Settings, store: Store) -> Broker:
    """The secrets broker; the master key is read (or created) only when a value is needed."""

    def vault() -> Vault:
        from stockade.secrets.vault import Vault

        return Vault.open(settings.master_key_path, create=not settings.master_key_file)

    return Broker(store, vault, actor=f"cli:{getpass.getuser()}")


def require_job(control: ControlService, id_or_prefix: str) -> JobView:
    """The job, or a UsageError naming the fix."""
    from stockade.cli.argtypes import ambiguous, check_job_arg

    view = control.view(check_job_arg(id_or_prefix))
    if view is None:
        matches = control.store.job_ids_with_prefix(id_or_prefix, 4)
        if len(matches) > 1:
            raise ambiguous(id_or_prefix, matches)
        raise UsageError(f"no job matches {id_or_prefix!r}", hint="list jobs with: stockade jobs")
    return view


def fleet_service(settings: Settings, control: ControlService) -> FleetService:
    """The control plane's side of runner agents, with the operator's fleet settings."""
    from stockade.api.attestation import AttestationPolicy, code_digest
    from stockade.control.fleet import FleetPolicy, FleetService

    lease, beat = settings.runner_lease_s, settings.runner_heartbeat_s
    if not (1 <= lease <= 3600 and 0.1 <= beat <= lease / 3):
        raise UsageError(f"runner_lease_s {lease:g} and runner_heartbeat_s {beat:g} do not fit",
                         hint="the lease is 1 s to 1 h, and heartbeats come at least three "
                              "times a lease (e.g. 30 s and 2 s, the defaults)")
    if not 60 <= settings.runner_session_s <= 86400 or not 1 <= settings.max_attempts <= 10:
        raise UsageError("runner_session_s is 60 s to 24 h and max_attempts 1 to 10")
    policy = FleetPolicy(
        attestation=AttestationPolicy(settings.attest_stockade_digests,
                                      settings.attest_required_controls),
        session_ttl_s=settings.runner_session_s, lease_s=lease, heartbeat_s=beat,
        max_attempts=settings.max_attempts, log_cap_bytes=settings.log_cap_bytes + 2 * 1024**2,
        artifact_max_total_bytes=settings.artifact_max_total_bytes)
    return FleetService(control, policy, code_digest())


def image_cache() -> tuple[Settings, ImageCache]:
    """The settings and this installation's image cache."""
    from stockade.image.cache import ImageCache

    settings = load_settings()
    ensure_home(settings)
    return settings, ImageCache(settings.home / "images", settings.image_cache_bytes)

