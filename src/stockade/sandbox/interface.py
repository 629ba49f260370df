"""The sandbox seam: what every execution backend (bwrap today, OCI runtimes later) provides."""

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    import socket

OutputSink = Callable[[bytes], None]


class WorkspaceSource(NamedTuple):
    """The directory copied to /workspace, and the exclude patterns its submitter gave on the
    command line (``--exclude``, gitignore syntax, applied after the ``.stockadeignore`` the
    directory itself holds)."""

    path: Path
    excludes: tuple[str, ...] = ()


class WorkspaceCopy(NamedTuple):
    """What the backend copied into /workspace: files (and links) and their bytes, and the
    paths the excludes left out (an excluded directory counts once: it is not walked)."""

    files: int
    bytes: int
    excluded: int
    excluded_paths: tuple[str, ...] = ()  # the first few, as the workspace names them


class SandboxRequest(NamedTuple):
    """Everything a backend needs to prepare one job's sandbox."""

    job_id: str
    cpus: float
    memory_bytes: int
    pids: int
    tmp_bytes: int
    workspace_bytes: int
    workspace_src: WorkspaceSource | None
    egress: bool = False  # reach the runner's egress proxy through a socket (see bwrap.py)
    identity: bool = False  # an OIDC token file the runner refreshes during the job
    rootfs: Path | None = None  # an image's unpacked tree (None: image host)


class StepRun(NamedTuple):
    """One step to run in a prepared sandbox."""

    name: str
    script: str
    env: Mapping[str, str]
    timeout: float
    secret_files: Mapping[str, bytes] = {}


class StepExit(NamedTuple):
    """How a step ended. ``exit_code`` is None if the step was killed before it exited;
    ``failed_at`` is the line and command of the script that failed, if known (``line 3:
    make test``: the job's own text)."""

    exit_code: int | None
    timed_out: bool
    oom_killed: bool
    duration_s: float
    failed_at: str | None = None


class Finding(NamedTuple):
    """One line of ``stockade doctor``: a hardening control, whether it is active, the remedy."""

    control: str
    ok: bool
    detail: str
    remedy: str = ""
    required: bool = True


class Sandbox(Protocol):
    """A prepared per-job sandbox: run steps in it, then tear it down."""

    @property
    def workspace(self) -> Path:
        """The host path of the job's workspace copy (valid until teardown)."""
        ...

    @property
    def workspace_copy(self) -> WorkspaceCopy | None:
        """What preparing copied into the workspace (None: there was nothing to copy)."""
        ...

    @property
    def host_uid(self) -> int:
        """The unprivileged host uid the job's processes run as (its own while it runs)."""
        ...

    @property
    def egress_listener(self) -> "socket.socket | None":
        """The listening socket the runner's egress proxy serves for this job (or None)."""
        ...

    @property
    def proxy_url(self) -> str | None:
        """The proxy URL for HTTP_PROXY/HTTPS_PROXY inside the sandbox (or None)."""
        ...

    @property
    def identity_token_path(self) -> str | None:
        """Where steps find the job's ID token (None without ``identity``)."""
        ...

    def publish_identity_token(self, token: str) -> None:
        """Replace the job's ID token file atomically (visible to running steps)."""
        ...

    def run(self, step: StepRun, sink: OutputSink) -> StepExit:
        """Run ``step``, streaming its combined output to ``sink``; kill it at its timeout."""
        ...

    def kill(self) -> None:
        """Kill every process of the job now (from another thread)."""
        ...

    def quiesce(self) -> None:
        """Kill every process of the job and verify none is left; SandboxError otherwise."""
        ...

    def memory_peak(self) -> int:
        """The job's peak memory use in bytes, 0 if unknown."""
        ...

    def teardown(self) -> list[str]:
        """Kill, unmount and remove everything of the job; return what could not be removed."""
        ...


class Backend(Protocol):
    """An execution engine: checks the host and prepares sandboxes."""

    name: str

    def check(self) -> list[Finding]:
        """What this host supports and what is active, for ``stockade doctor``."""
        ...

    def reap_orphans(self, ours: Callable[[str], bool]) -> list[str]:
        """Tear down this installation's sandboxes whose runner died, of jobs ``ours``
        confirms; return their job ids."""
        ...

    def warm(self) -> None:
        """A job is about to be prepared: start what makes its first step start sooner (the
        next sandbox prepared takes it over)."""
        ...

    def prepare(self, request: SandboxRequest) -> Sandbox:
        """Create the job's sandbox (filesystems, cgroup); raise SandboxError if it cannot."""
        ...
