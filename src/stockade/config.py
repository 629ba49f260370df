"""Runner and control-plane settings: read once, passed down.

Sources, later ones winning: built-in defaults, the TOML file (``$STOCKADE_CONFIG`` or
``$STOCKADE_HOME/config.toml``), then ``STOCKADE_*`` variables. Only this module and the CLI
read ``os.environ``. Job specs can never change these settings.
"""

import os
from pathlib import Path
from typing import Any, NamedTuple

from stockade.errors import ConfigError

MiB = 1024 * 1024


class Settings(NamedTuple):
    """Settings of one stockade installation (state directory, caps, uid pool)."""

    home: Path
    # the state database: empty for the embedded SQLite file in home, or a PostgreSQL URL
    # (postgresql://USER:PASSWORD@HOST:PORT/DATABASE) that stockade server replicas share
    database_url: str = ""
    log_cap_bytes: int = 64 * MiB
    # each concurrently running job gets its own host uid (= gid) from this range
    uid_pool: str = "1600000-1601023"
    cgroup_name: str = "stockade"
    runtime_dir: str = "/run/stockade"
    # how this runner runs jobs: bwrap, oci (runc) or runsc (gVisor; the only one that takes
    # jobs with isolation: strong); stockade doctor says which are usable here
    sandbox_backend: str = "bwrap"
    artifact_max_file_bytes: int = 512 * MiB
    artifact_max_total_bytes: int = 1024 * MiB
    artifact_max_files: int = 10_000
    # operator ceilings: a spec asking for more is refused (exit 2) with the ceiling named
    max_cpus: float = 8.0
    max_memory_bytes: int = 16 * 1024 * MiB
    max_pids: int = 4096
    max_tmp_bytes: int = 8 * 1024 * MiB
    max_workspace_bytes: int = 8 * 1024 * MiB
    max_timeout_s: float = 24 * 3600.0
    master_key_file: str = ""
    oidc_issuer: str = "https://stockade.local"
    oidc_refresh_s: float = 60.0
    # the ID-token audiences a job of each trust level may ask for ("*": any)
    oidc_audiences_untrusted: tuple[str, ...] = ()
    oidc_audiences_trusted: tuple[str, ...] = ("*",)
    oidc_audiences_protected: tuple[str, ...] = ("*",)
    egress_hosts_file: str = ""
    egress_max_connections: int = 64
    # new proxy connections a job's proxy accepts per second on average (twice as many at
    # once): the proxy is the runner's CPU, not the job's (more wait in the kernel's backlog)
    egress_accept_rate: float = 150.0
    egress_header_timeout_s: float = 10.0
    egress_idle_timeout_s: float = 300.0
    # destinations only the operator can open: CIDR:port entries that may name loopback,
    # link-local or private ranges (a spec never can)
    egress_internal_allow: tuple[str, ...] = ()
    # the most an untrusted job's egress.allow may ask for (each entry must be covered)
    egress_untrusted_allow: tuple[str, ...] = ()
    egress_max_destinations: int = 256
    # a PEM file of the operator's own CA certificates (an internal CA), added to the host's
    # public CA bundle that every job sees at /etc/ssl/certs/ca-certificates.crt
    tls_extra_ca_file: str = ""
    # the fleet (stockade server and runner agents, docs/fleet.md)
    runner_lease_s: float = 30.0  # an attempt is lost this long after its last heartbeat
    runner_heartbeat_s: float = 2.0  # and so a cancel reaches the sandbox within this
    runner_session_s: float = 600.0  # runners attest again at least this often
    max_attempts: int = 2  # a job whose attempt was lost runs again until this many ran
    # accepted sha256 digests of a runner's stockade code ("self": the server's own; "*": any)
    attest_stockade_digests: tuple[str, ...] = ("self",)
    # doctor controls a runner must have active ("*": every control doctor requires)
    attest_required_controls: tuple[str, ...] = ("*",)
    # images (docs/images.md): registries spoken to over plain HTTP (loopback tests only),
    # mirrors as REGISTRY=MIRROR entries (tried in order, the registry last), credentials in
    # a docker-style config.json ({"auths": {HOST: {"auth": base64(user:password)}}}), an
    # extra CA bundle for registries, and the size the unpacked-image cache may take
    image_registries: tuple[str, ...] = ()  # the registries job specs may name images from
    insecure_registries: tuple[str, ...] = ()
    registry_mirrors: tuple[str, ...] = ()
    registry_auth_file: str = ""
    registry_ca_file: str = ""
    # hosts a registry may send the runner to besides itself: its token service (bearer
    # realm), its blob storage (redirects); any other is refused
    registry_auxiliary_hosts: tuple[str, ...] = ()
    image_cache_bytes: int = 20 * 1024 * MiB
    # image signatures (image/trust.py): PREFIX=PATH entries, PREFIX * or a registry or a
    # repository prefix (the most specific covering an image decides), PATH a cosign.pub;
    # an image a prefix covers must be signed by one of its keys; with require_signed_images
    # every image must be (image: host has no signature: such jobs are refused then)
    image_trusted_keys: tuple[str, ...] = ()
    require_signed_images: bool = False
    # image vulnerabilities (image/scan.py): OSV data (a JSON file, a directory of records or
    # a zip of them; empty: images are not scanned), and the severity at or above which a
    # finding refuses an image (critical, high, medium, low, any; none refuses nothing)
    vulnerability_data: str = ""
    image_refuse_severity: str = "critical"

    @property
    def db_path(self) -> Path:
        """The embedded SQLite database."""
        return self.home / "stockade.db"

    @property
    def logs_dir(self) -> Path:
        """Where stored job logs live."""
        return self.home / "logs"

    @property
    def artifacts_dir(self) -> Path:
        """Where collected artifacts live, one directory per job."""
        return self.home / "artifacts"

    @property
    def master_key_path(self) -> Path:
        """The master key: the operator's file, or one created in the state directory."""
        return Path(self.master_key_file) if self.master_key_file else self.home / "master.key"

    @property
    def cache_dir(self) -> Path:
        """Derived files (compiled seccomp filter, synthetic /etc)."""
        return self.home / "cache"


_ENV = {
    "STOCKADE_DATABASE_URL": "database_url",
    "STOCKADE_LOG_CAP": "log_cap_bytes",
    "STOCKADE_UID_POOL": "uid_pool",
    "STOCKADE_CGROUP_NAME": "cgroup_name",
    "STOCKADE_RUNTIME_DIR": "runtime_dir",
    "STOCKADE_SANDBOX_BACKEND": "sandbox_backend",
    "STOCKADE_ARTIFACT_MAX_FILE": "artifact_max_file_bytes",
    "STOCKADE_ARTIFACT_MAX_TOTAL": "artifact_max_total_bytes",
    "STOCKADE_MASTER_KEY_FILE": "master_key_file",
    "STOCKADE_OIDC_ISSUER": "oidc_issuer",
    "STOCKADE_OIDC_REFRESH": "oidc_refresh_s",
    "STOCKADE_EGRESS_HOSTS_FILE": "egress_hosts_file",
    "STOCKADE_EGRESS_MAX_CONNECTIONS": "egress_max_connections",
    "STOCKADE_EGRESS_ACCEPT_RATE": "egress_accept_rate",
    "STOCKADE_EGRESS_HEADER_TIMEOUT": "egress_header_timeout_s",
    "STOCKADE_EGRESS_IDLE_TIMEOUT": "egress_idle_timeout_s",
    "STOCKADE_EGRESS_INTERNAL_ALLOW": "egress_internal_allow",
    "STOCKADE_EGRESS_UNTRUSTED_ALLOW": "egress_untrusted_allow",
    "STOCKADE_EGRESS_MAX_DESTINATIONS": "egress_max_destinations",
    "STOCKADE_TLS_EXTRA_CA_FILE": "tls_extra_ca_file",
    "STOCKADE_ARTIFACT_MAX_FILES": "artifact_max_files",
    "STOCKADE_MAX_CPUS": "max_cpus",
    "STOCKADE_MAX_MEMORY": "max_memory_bytes",
    "STOCKADE_MAX_PIDS": "max_pids",
    "STOCKADE_MAX_TMP": "max_tmp_bytes",
    "STOCKADE_MAX_WORKSPACE": "max_workspace_bytes",
    "STOCKADE_MAX_TIMEOUT": "max_timeout_s",
    "STOCKADE_OIDC_AUDIENCES_UNTRUSTED": "oidc_audiences_untrusted",
    "STOCKADE_OIDC_AUDIENCES_TRUSTED": "oidc_audiences_trusted",
    "STOCKADE_OIDC_AUDIENCES_PROTECTED": "oidc_audiences_protected",
    "STOCKADE_RUNNER_LEASE": "runner_lease_s",
    "STOCKADE_RUNNER_HEARTBEAT": "runner_heartbeat_s",
    "STOCKADE_RUNNER_SESSION": "runner_session_s",
    "STOCKADE_MAX_ATTEMPTS": "max_attempts",
    "STOCKADE_ATTEST_STOCKADE_DIGESTS": "attest_stockade_digests",
    "STOCKADE_ATTEST_REQUIRED_CONTROLS": "attest_required_controls",
    "STOCKADE_IMAGE_REGISTRIES": "image_registries",
    "STOCKADE_INSECURE_REGISTRIES": "insecure_registries",
    "STOCKADE_REGISTRY_MIRRORS": "registry_mirrors",
    "STOCKADE_REGISTRY_AUTH_FILE": "registry_auth_file",
    "STOCKADE_REGISTRY_CA_FILE": "registry_ca_file",
    "STOCKADE_REGISTRY_AUXILIARY_HOSTS": "registry_auxiliary_hosts",
    "STOCKADE_IMAGE_CACHE": "image_cache_bytes",
    "STOCKADE_IMAGE_TRUSTED_KEYS": "image_trusted_keys",
    "STOCKADE_REQUIRE_SIGNED_IMAGES": "require_signed_images",
    "STOCKADE_VULNERABILITY_DATA": "vulnerability_data",
    "STOCKADE_IMAGE_REFUSE_SEVERITY": "image_refuse_severity",
}


def default_home(environ: dict[str, str]) -> Path:
    """``$STOCKADE_HOME`` or ``~/.local/share/stockade``."""
    if environ.get("STOCKADE_HOME"):
        return Path(environ["STOCKADE_HOME"]).absolute()
    return Path(environ.get("HOME", "/root")) / ".local" / "share" / "stockade"


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build the settings from defaults, the TOML file and ``STOCKADE_*`` variables."""
    env = dict(os.environ) if environ is None else environ
    home = default_home(env)
    settings = Settings(home=home)
    path = Path(env["STOCKADE_CONFIG"]) if env.get("STOCKADE_CONFIG") else home / "config.toml"
    if _exists(path):
        settings = _apply(settings, _read_toml(path), str(path))
    overrides = {name: env[var] for var, name in _ENV.items() if env.get(var)}
    _warn_unknown_variables(env)
    settings = _apply(settings, overrides, "environment")
    _check_owned_locations(settings)
    _check_egress_entries(settings)
    _check_backend(settings)
    return settings


SANDBOX_BACKENDS = ("bwrap", "oci", "runsc")  # sandbox.BACKENDS, without importing it


def _check_backend(settings: Settings) -> None:
    """The runner's sandbox backend is one stockade has."""
    if settings.sandbox_backend not in SANDBOX_BACKENDS:
        raise ConfigError(f"sandbox_backend {settings.sandbox_backend[:40]!r} is not a sandbox "
                          "backend", hint=f"use one of {', '.join(SANDBOX_BACKENDS)} (stockade "
                          "doctor says which are usable on this host)")


def _check_egress_entries(settings: Settings) -> None:
    """The operator's egress entries parse (a mistake there would fail every egress job)."""
    for key in ("egress_internal_allow", "egress_untrusted_allow"):
        entries = getattr(settings, key)
        if not entries:
            continue
        from stockade.egress.policy import parse_rule  # only when the operator set some

        for entry in entries:
            try:
                parse_rule(entry, operator=True)
            except ValueError as e:
                raise ConfigError(f"{key}: {str(e)[:300]}",
                                  hint="write CIDR:port entries, e.g. 10.1.2.0/24:5432 "
                                  "(see the settings table in README)") from e


# directories other software owns: the reaper removes what it finds in its runtime directory,
# so that directory must be stockade's alone
_SHARED_DIRS = frozenset({
    "/", "/run", "/var/run", "/run/lock", "/run/user", "/run/shm", "/tmp", "/var/tmp", "/dev",
    "/dev/shm", "/var", "/var/lib", "/var/cache", "/var/log", "/etc", "/usr", "/home", "/root",
    "/boot", "/srv", "/opt", "/mnt", "/media", "/proc", "/sys", "/sys/fs/cgroup",
})
_CGROUP_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def _check_owned_locations(settings: Settings) -> None:
    """Refuse a runtime directory or cgroup name that other software shares."""
    runtime = os.path.normpath(settings.runtime_dir)
    if not os.path.isabs(runtime) or runtime in _SHARED_DIRS \
            or runtime.startswith(("/proc/", "/sys/", "/dev/")):
        raise ConfigError(f"runtime_dir {settings.runtime_dir!r} is not a directory of "
                          "stockade's own (it must be absolute and not a shared system "
                          "directory: stockade removes what it leaves there)",
                          hint="use e.g. /run/stockade (the default)")
    name = settings.cgroup_name
    if not name or len(name) > 64 or not set(name) <= _CGROUP_NAME_CHARS \
            or name.startswith(".") or name.endswith((".slice", ".scope", ".service", ".mount")):
        raise ConfigError(f"cgroup_name {name[:80]!r} is not a cgroup of stockade's own (one "
                          "name of letters, digits, '_', '-', '.', not a systemd unit)",
                          hint="use e.g. stockade (the default)")


def installation_id(home: Path) -> str:
    """This installation's id (created with the state directory): it names the installation's
    runtime directory and prefixes its cgroups, so that its reaper never touches another's."""
    path = home / "installation-id"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if len(text) == 10 and text.isalnum() and text.islower():
        return text
    from stockade.ids import new_installation_id

    tmp = home / f".installation-id.{os.getpid()}"
    try:
        tmp.write_text(new_installation_id() + "\n")
        try:
            os.link(tmp, path)  # the first of concurrent first runs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        text = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot create {path}: {e.strerror}",
                          hint="set STOCKADE_HOME to a writable directory") from e
    if len(text) != 10 or not text.isalnum():
        raise ConfigError(f"{path} does not hold an installation id",
                          hint="remove the file if no job is running (a new id is made)")
    return text


# read by the CLI's client of a server (cli/remote.py), not settings
_OTHER_VARIABLES = frozenset({"STOCKADE_HOME", "STOCKADE_CONFIG", "STOCKADE_SERVER",
                              "STOCKADE_TOKEN", "STOCKADE_CA_FILE", "STOCKADE_ENROL_TOKEN"})


def _warn_unknown_variables(env: dict[str, str]) -> None:
    """A misspelt STOCKADE_* variable would be ignored: say so (without failing, so that
    variables of newer versions or other tools do not break a command)."""
    known = _OTHER_VARIABLES | _ENV.keys()
    for var in sorted(v for v in env if v.startswith("STOCKADE_") and v not in known):
        import difflib
        import sys

        close = difflib.get_close_matches(var, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        sys.stderr.write(f"stockade: warning: {var[:80]} is not a stockade setting and is "
                         f"ignored{hint}\n")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError as e:
        raise ConfigError(f"cannot look for the settings file {path}: {e.strerror}",
                          hint="set STOCKADE_HOME to a directory you can access") from e


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # only when a settings file exists: keeps CLI start-up lean

    try:
        if not path.is_file():
            raise ConfigError(f"{path}: the settings file is not a regular file",
                              hint="give a TOML file (see the settings table in README)")
        with path.open("rb") as f:
            data = f.read(_MAX_SETTINGS_BYTES + 1)
        if len(data) > _MAX_SETTINGS_BYTES:
            raise ConfigError(f"{path}: the settings file is larger than 1 MiB",
                              hint="a settings file holds a few lines (see README)")
        return tomllib.loads(data.decode("utf-8"))
    except (OSError, ValueError) as e:  # TOMLDecodeError, UnicodeDecodeError, huge numbers
        why = str(e) if isinstance(e, (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError)) \
            else "a number in it has too many digits"
        raise ConfigError(f"{path}: cannot read settings: {why[:200]}",
                          hint="fix or remove the file") from e


def _apply(settings: Settings, values: dict[str, Any], source: str) -> Settings:
    known = {name: type(default).__name__ for name, default in Settings._field_defaults.items()}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"{source}: unknown setting {key!r}", hint=f"known settings: {', '.join(known)}"
            )
        changes[key] = _convert(key, known[key], value, source)
    return settings._replace(**changes)


_MAX_SETTINGS_BYTES = 1 << 20
_MAX_NUMBER = 1 << 62  # beyond any size, count or duration a host has


def _convert(key: str, kind: str, value: Any, source: str) -> Any:
    """One setting's value in its type; sizes (``16Gi``) and durations (``6h``) as users
    write them; lists as TOML arrays or comma-separated text."""
    from stockade.spec.units import parse_duration, parse_size

    try:
        if kind == "bool":
            return _boolean(value)
        if kind == "tuple":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(item).strip() for item in items if str(item).strip())
        if kind == "int" and key.endswith("_bytes") and isinstance(value, str):
            return parse_size(value)
        if kind == "float" and key.endswith("_s") and isinstance(value, str) \
                and not value.replace(".", "", 1).isdigit():
            return parse_duration(value)
        if kind in ("int", "float"):
            if isinstance(value, bool):
                raise TypeError("a boolean is not a number")
            if isinstance(value, str) and len(value) > 40:
                raise ValueError("too many digits")
            number = int(value) if kind == "int" else float(value)
            if not 0 <= number <= _MAX_NUMBER:  # also refuses NaN
                raise ValueError(f"must be from 0 to {_MAX_NUMBER}")
            return number
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{source}: {key} has an invalid value {str(value)[:80]!r}: "
                          f"{str(e)[:200]}",
                          hint="see the settings table in README (State and audit)") from e
    return str(value)


def _boolean(value: Any) -> bool:
    """A TOML boolean, or true/false (yes/no, on/off, 1/0) as text."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError("must be true or false")


def ensure_home(settings: Settings) -> None:
    """Create the state directory tree, private to its owner (0700)."""
    try:
        for d in (settings.home, settings.logs_dir, settings.artifacts_dir, settings.cache_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(settings.home, 0o700)
    except OSError as e:
        raise ConfigError(
            f"cannot create the state directory {settings.home}: {e.strerror}",
            hint="set STOCKADE_HOME to a writable directory",
        ) from e
