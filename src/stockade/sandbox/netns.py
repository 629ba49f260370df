"""A job's own network namespace, made and held by the runner (jobs with egress).

It has only loopback. The runner binds the egress proxy's listening socket on
``127.0.0.1:3128`` inside it before any step starts (a socket stays in the namespace it was
made in), and starts each step's bwrap in it (bwrap then unshares every namespace but this
one). So the proxy is reachable from the job's own loopback and from nowhere else, with no
forwarder process inside the sandbox (nothing of the image is needed: jobs on any image get
egress), and no process of the job holds the listener (it cannot close, replace or signal it).

For bwrap (and runsc) the namespace belongs to the host's user namespace, not to the
sandbox's: the job has no capability over it at all (it cannot even take loopback down). It
lives as long as its thread, its listener or a process of the job is in it. runc (``oci``)
joins the job's user namespace first and could then no longer join such a namespace: for it
the namespace is made inside the job's user namespace (``userns.py``) and the thread enters
it (root's capabilities reach every namespace below the host's user namespace) to bring
loopback up and bind the listener; the job, with no capability at all, cannot change it
either.

``unshare(CLONE_NEWNET)`` and ``setns`` act on the calling thread only, so the namespace is
made (or entered) on a thread of the job's own, which stays in it and starts the job's
processes until teardown: no other thread of the runner ever changes namespace, and the
thread that started bwrap outlives it (bwrap's ``--die-with-parent`` fires when that thread
ends, not the runner).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import queue
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from typing import Any

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
BACKLOG = 1024  # a burst of connections waits here for the proxy's slots

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


class JobNetwork:
    """A network namespace with loopback up and a listener on ``127.0.0.1:port`` in it, and
    the thread that lives in it: a new one, or the one open at fd ``join``."""

    def __init__(self, port: int, join: int | None = None) -> None:
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        made: queue.SimpleQueue[socket.socket | BaseException] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._live, args=(port, join, made),
                                        name="netns", daemon=True)
        self._thread.start()
        result = made.get()
        if isinstance(result, BaseException):
            self._thread.join()
            raise result
        self.listener = result

    @property
    def path(self) -> str:
        """The namespace's file (its thread's), for a runtime that joins it by path."""
        return f"/proc/{os.getpid()}/task/{self._tid}/ns/net"

    def _live(self, port: int, join: int | None,
              made: queue.SimpleQueue[socket.socket | BaseException]) -> None:
        self._tid = threading.get_native_id()
        try:
            if join is None:
                _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            else:
                _check(_libc.setns(join, CLONE_NEWNET), "setns(CLONE_NEWNET)")
            _loopback_up()
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.bind(("127.0.0.1", port))
                listener.listen(BACKLOG)
            except OSError:
                listener.close()
                raise
        except BaseException as e:  # handed to the constructor
            made.put(e)
            return
        made.put(listener)
        while (work := self._work.get()) is not None:
            work()

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen`` started by the namespace's thread (the child is in it)."""
        done: queue.SimpleQueue[subprocess.Popen[bytes] | BaseException] = queue.SimpleQueue()

        def spawn() -> None:
            try:
                done.put(subprocess.Popen(*args, **kwargs))
            except BaseException as e:  # handed to the caller
                done.put(e)

        self._work.put(spawn)
        result = done.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        """End the thread, close the listener; the namespace goes once no process is in it."""
        if self._thread.is_alive():
            self._work.put(None)
            self._thread.join()
        self.listener.close()
