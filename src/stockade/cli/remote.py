"""The CLI's client of ``stockade server``: which server (``--server URL`` or
``STOCKADE_SERVER``), with which API token (``STOCKADE_TOKEN``), and every way a request can
fail turned into an error a person can act on (never a traceback):

    no token, a plain-http URL to another host   UsageError (exit 2)
    401 (unknown, expired, revoked token)        UsageError (exit 2): which token to set
    403                                          UsageError (exit 2): which role is needed
    other 4xx                                    UsageError (exit 2): the server's reason
    unreachable, TLS failure, timeout, 5xx       InfrastructureError (exit 4)

TLS certificates are verified, against the system's CAs or ``STOCKADE_CA_FILE``. Plain
``http://`` is accepted only for a loopback address (``stockade up``), since the token would
travel in the clear. Whatever the server says is control-escaped before it is shown.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

from stockade.errors import InfrastructureError, UsageError
from stockade.text import digits, escape_controls

if TYPE_CHECKING:
    import httpx

TIMEOUT_S = 30.0
UPLOAD_TIMEOUT_S = 600.0
STREAM_READ_S = 60.0  # the server sends a keep-alive line every 15 s
RECONNECT_FOR_S = 60.0  # a follower keeps reconnecting this long (a replica restarts)
BUSY_FOR_S = 3600.0  # ... and asking this long while the server is busy (503: its streams or
# uploads are taken, some by this very token: a CI system's parallel jobs)
MAX_LINE_BYTES = 8 * 1024 * 1024  # an event stream's line (a log chunk is at most 1 MiB)
TOKEN_HINT = "an admin makes one on the server with: stockade token create NAME --role ROLE"


def add_server_argument(p: argparse.ArgumentParser, local: bool = True) -> None:
    """``--server URL`` (default: ``$STOCKADE_SERVER``; neither: the local installation,
    for a command that has one: ``local``)."""
    without = "; without either, this host's state directory" if local else ""
    p.add_argument("--server", metavar="URL", default=None,
                   help=f"talk to this stockade server (default: $STOCKADE_SERVER{without}); "
                   "the API token is $STOCKADE_TOKEN")


def server_url(args: argparse.Namespace) -> str | None:
    """The server ``args`` or the environment name, if any."""
    return getattr(args, "server", None) or os.environ.get("STOCKADE_SERVER") or None


def connect(args: argparse.Namespace) -> Remote | None:
    """A client of the server ``args`` or the environment name (None: work locally)."""
    url = server_url(args)
    if url is None:
        return None
    token = os.environ.get("STOCKADE_TOKEN", "").strip()
    if not token:
        raise UsageError(f"no API token for the server {shown(url)}: set STOCKADE_TOKEN",
                         hint=TOKEN_HINT)
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise UsageError("STOCKADE_TOKEN is not an API token: it holds characters no token "
                         "has (spaces, control or non-ASCII characters)",
                         hint=f"copy the token again as it was shown; {TOKEN_HINT}")
    return Remote(check_url(url), token, os.environ.get("STOCKADE_CA_FILE") or None)


def check_url(url: str) -> str:
    """``url`` without a trailing slash, if it is one the client may send a token to."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:  # (an unclosed IPv6 bracket too)
        parts = urllib.parse.urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or parts.username:
        raise UsageError(f"{shown(url)} is not a server URL",
                         hint="e.g. --server https://stockade.example:8377")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise UsageError(f"{shown(url)} is plain http to another host: the API token would "
                         "travel in the clear", hint="use https:// (plain http only to a "
                         "loopback address, as stockade up prints)")
    return url.strip().rstrip("/")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def shown(text: object, limit: int = 300) -> str:
    """Text from the command line or the server, printable and cut."""
    value = escape_controls(str(text))
    return value if len(value) <= limit else value[:limit] + "..."


class Refused(UsageError):
    """The server answered 4xx (``status``)."""

    def __init__(self, status: int, message: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status


class ServerFailed(InfrastructureError):
    """The server answered 5xx (``status``), perhaps saying when to try again
    (``retry_after`` seconds, at most a minute; 0 if it did not say)."""

    def __init__(self, status: int, message: str, hint: str = "",
                 retry_after: float = 0.0) -> None:
        super().__init__(message, hint=hint)
        self.status, self.retry_after = status, retry_after


class Event(NamedTuple):
    """A server-sent event: its type (``message`` for log data), id and data."""

    kind: str
    id: str
    data: str


class Remote:
    """An HTTP client of one server, with one API token."""

    def __init__(self, url: str, token: str, ca_file: str | None = None,
                 timeout: float = TIMEOUT_S) -> None:
        self.url, self._token, self._ca_file, self.timeout = url, token, ca_file, timeout
        self._client: httpx.Client | None = None

    def client(self) -> httpx.Client:
        """The connection pool (made on first use)."""
        if self._client is None:
            import ssl

            import httpx

            try:
                verify = ssl.create_default_context(cafile=self._ca_file)
            except (OSError, ssl.SSLError) as e:
                raise UsageError(f"STOCKADE_CA_FILE {shown(self._ca_file)} cannot be used: "
                                 f"{shown(getattr(e, 'strerror', None) or e)}",
                                 hint="give a PEM file of CA certificates") from e
            self._client = httpx.Client(
                base_url=self.url, verify=verify, trust_env=False,
                timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
                headers={"Authorization": f"Bearer {self._token}"})
        return self._client

    def json(self, method: str, path: str, role: str, body: Any = None,
             params: dict[str, Any] | None = None, missing: str | None = None) -> Any:
        """One request with a JSON body and answer; ``missing`` is the message of a 404."""
        with self.request(method, path, role, json=body, params=params,
                          missing=missing) as response:
            response.read()
            return self._parsed(response, method, path) if response.content else None

    def _parsed(self, response: httpx.Response, method: str, path: str) -> Any:
        """The JSON of a successful answer (InfrastructureError if it is none: another web
        server than stockade's answered)."""
        try:
            return response.json()
        except ValueError as e:  # (not UTF-8 either)
            raise InfrastructureError(
                f"{self.url} answered {method} {path} with something that is not JSON "
                f"({shown(response.headers.get('content-type', 'no content type'), 60)})",
                hint="is STOCKADE_SERVER (or --server) the URL of a stockade server?") from e

    @contextmanager
    def request(self, method: str, path: str, role: str, missing: str | None = None,
                timeout: float | None = None, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed request whose answer was a success (errors raised as the module says).
        ``role`` is the one the request needs (named when the server refuses the token's)."""
        import httpx

        if timeout:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=10.0)
        try:
            with self.client().stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    self._refused(response, role, missing)
                yield response
        except httpx.TimeoutException as e:
            raise InfrastructureError(f"the server {self.url} did not answer in time "
                                      f"({type(e).__name__})",
                                      hint="try again; if it persists, check the server") from e
        except httpx.HTTPError as e:
            raise self._unreachable(e) from e

    def _unreachable(self, e: Exception) -> InfrastructureError:
        why = shown(e, 200) or type(e).__name__
        hint = "is the server running? check --server or STOCKADE_SERVER"
        if "CERTIFICATE_VERIFY_FAILED" in why or "certificate" in why.lower():
            hint = "the server's TLS certificate did not verify: set STOCKADE_CA_FILE to " \
                   "the CA that issued it"
        return InfrastructureError(f"cannot reach the stockade server at {self.url}: {why}",
                                   hint=hint)

    def _refused(self, response: httpx.Response, role: str, missing: str | None) -> None:
        from stockade.api.auth import REFS_REFUSED, ROLE_REFUSED

        status, detail = response.status_code, _detail(response)
        if status == 401:
            raise Refused(status, f"the server refused the API token ({detail})",
                          hint=f"set STOCKADE_TOKEN to a valid token; {TOKEN_HINT}")
        if status == 403 and ROLE_REFUSED in detail:
            article = "an" if role[0] in "aeiou" else "a"
            raise Refused(status, f"the server refused this: it needs a token with the {role} "
                          f"role; it said: {detail}",
                          hint=f"put {article} {role}'s token in STOCKADE_TOKEN")
        if status == 403:  # the role was enough: something else the token or runner may not
            hint = "pass --ref with a ref the token allows (stockade token list shows them)" \
                if REFS_REFUSED in detail else ""
            raise Refused(status, f"the server refused this: {detail}", hint=hint)
        if status == 404 and missing:
            kind = response.request.url.path.removeprefix("/api/v1/").split("/", 1)[0]
            raise Refused(status, missing, hint=_LISTS.get(kind, _LISTS["jobs"]))
        if status >= 500:
            after = response.headers.get("retry-after", "")
            raise ServerFailed(status, f"the server failed ({status}): {detail}",
                               hint="try again; if it persists, see the server's log",
                               retry_after=min(60.0, float(after)) if digits(after) else 0.0)
        raise Refused(status, f"the server refused the request ({status}): {detail}")

    def job_id(self, id_or_prefix: str) -> str:
        """The id of the server's job ``id_or_prefix`` names (as the local commands find
        one: the exact id or a unique prefix; UsageError otherwise)."""
        from stockade.cli.argtypes import ambiguous, check_job_arg

        found = self.json("GET", "/api/v1/jobs", "viewer",
                          params={"prefix": check_job_arg(id_or_prefix), "limit": 4})
        ids = [str(j["job_id"]) for j in found]
        if id_or_prefix in ids:
            return id_or_prefix
        if len(ids) > 1:
            raise ambiguous(id_or_prefix, [shown(i, 64) for i in ids])
        if not ids:
            raise UsageError(f"no job matches {id_or_prefix!r} on the server",
                             hint="list jobs with: stockade jobs")
        return check_job_arg(ids[0])

    def upload(self, path: str, role: str, data: Any, headers: dict[str, str]) -> Any:
        """POST a (large) body, asking again while the server says it is busy (503: its
        uploads are taken, perhaps by this token's other uploads) for up to ``BUSY_FOR_S``,
        as soon as it says (``Retry-After``) or after 1, 2, 4 ... 30 s."""
        busy_since, wait = time.monotonic(), 1.0
        while True:
            try:
                with self.request("POST", path, role, content=data, headers=headers,
                                  timeout=UPLOAD_TIMEOUT_S) as response:
                    response.read()
                    return self._parsed(response, "POST", path)
            except ServerFailed as e:
                if e.status != 503 or time.monotonic() - busy_since > BUSY_FOR_S:
                    raise
                if hasattr(data, "seek"):
                    data.seek(0)
                time.sleep(e.retry_after or wait)
                wait = min(30.0, wait * 2)

    def events(self, path: str, role: str, missing: str | None = None) -> Iterator[Event]:
        """The events of a server-sent event stream, reconnecting (with ``Last-Event-ID``)
        when the connection drops, until an ``end`` event."""
        import httpx

        last, failing_since, busy_since = "", None, None
        while True:
            try:
                headers = {"Last-Event-ID": last} if last else {}
                with self.request("GET", path, role, missing=missing, headers=headers,
                                  timeout=STREAM_READ_S) as response:
                    for event in _parse(_lines(response.iter_bytes())):
                        failing_since = None  # a connection that yields nothing counts as
                        if event.id:  # a failure below, so a broken server is given up on
                            last = event.id
                        yield event
                        if event.kind == "end":
                            return
            except (InfrastructureError, httpx.HTTPError) as e:
                if isinstance(e, ServerFailed) and e.status == 503:  # busy (its streams are
                    busy_since = busy_since or time.monotonic()  # taken): ask while it is
                    if time.monotonic() - busy_since > BUSY_FOR_S:
                        raise
                    time.sleep(max(1.0, e.retry_after))
                    continue
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > RECONNECT_FOR_S:
                    if isinstance(e, InfrastructureError):
                        raise
                    raise self._unreachable(e) from e
            else:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > RECONNECT_FOR_S:
                    raise InfrastructureError(f"the server {self.url} keeps ending the log "
                                              "stream before the job's end")
            time.sleep(0.5)

    def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            self._client.close()


_EOL = re.compile(rb"\r\n?|\n")


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """The lines of an event stream, ended by CRLF, LF or CR only (the SSE rules; not at the
    other characters ``str.splitlines`` breaks at, U+2028 and the like, which a log may hold),
    each decoded after it was split off."""
    parts: list[bytes] = []
    size, after_cr = 0, False
    for chunk in chunks:
        if not chunk:
            continue
        if after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split between two chunks
        after_cr, start = False, 0
        for end in _EOL.finditer(chunk):
            parts.append(chunk[start:end.start()])
            yield b"".join(parts).decode("utf-8", errors="replace")
            parts, size, start = [], 0, end.end()
            after_cr = end.group() == b"\r" and start == len(chunk)
        if start < len(chunk):
            parts.append(chunk[start:])
            size += len(chunk) - start
            if size > MAX_LINE_BYTES:
                raise InfrastructureError(f"the server sent a line of more than "
                                          f"{MAX_LINE_BYTES} bytes in an event stream")


def _parse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events from the lines of a stream (the WHATWG rules: data lines joined by
    newlines, comments ignored)."""
    kind, event_id = "message", ""
    data: list[str] = []
    for line in lines:
        if not line:
            if data or kind != "message":
                yield Event(kind, event_id, "\n".join(data))
            kind, event_id, data = "message", "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            kind = value
        elif field == "id":
            event_id = value


_LISTS = {"jobs": "list jobs with: stockade jobs",  # what lists the things a 404 is about
          "runners": "list runners with: stockade runner list",
          "secrets": "list secrets with: stockade secret list"}


def _detail(response: httpx.Response) -> str:
    """The server's reason, printable: its lines (a spec's problems, one a line) kept, each
    without control characters and cut, at most 25 of them."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = response.text[:300]
    if isinstance(detail, list):
        detail = "; ".join(str(d) for d in detail[:5])
    lines = str(detail or response.reason_phrase).splitlines() or [""]
    return "\n".join([shown(line) for line in lines[:25]]
                     + ([f"... ({len(lines) - 25} more lines)"] if len(lines) > 25 else []))
