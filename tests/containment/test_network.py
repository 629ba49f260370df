"""Hostile jobs against the network: with egress none there is no way out at all."""

from __future__ import annotations

IMAGE_TOO = True  # these probes run in an image too (see conftest.py)


def test_tcp_to_the_host_loopback_fails(hostile, host) -> None:
    run = hostile("""
        python3 - <<'PY'
        import os, socket
        for addr in ("127.0.0.1", "localhost"):
            try:
                socket.create_connection((addr, int(os.environ["PORT"])), timeout=2)
                print("CONNECTED", addr)
            except OSError as e:
                print("REFUSED", addr, e)
        PY
        curl -s --max-time 2 http://127.0.0.1:$PORT/ && echo CURL-OK; echo DONE
    """)
    assert "DONE" in run.log and "CONNECTED" not in run.log and "CURL-OK" not in run.log


def test_udp_to_the_host_loopback_goes_nowhere(hostile, host) -> None:
    run = hostile("""
        python3 - <<'PY'
        import os, socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):
            try:
                s.sendto(b"x" * 100, ("127.0.0.1", int(os.environ["PORT"])))
            except OSError as e:
                print("SEND-FAILED", e)
        print("SENT")
        PY
    """)
    assert "SENT" in run.log or "SEND-FAILED" in run.log
    assert host.listener.hits == 0


def test_only_an_own_loopback_and_no_routes(hostile) -> None:
    run = hostile("""
        echo "IFACES $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ' ')"
        echo "ROUTES $(tail -n +2 /proc/net/route | wc -l)"
        ip route get 192.0.2.1 2>&1 || echo NO-ROUTE
        getent hosts example.com || echo NO-DNS
    """)
    out = run.output("probe")
    assert "IFACES lo \n" in out + "\n" and "ROUTES 0" in out
    assert "NO-ROUTE" in out and "NO-DNS" in out


def test_abstract_unix_sockets_of_the_host_are_unreachable(hostile) -> None:
    run = hostile("""
        python3 - <<'PY'
        import socket
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect("\\0/org/freedesktop/systemd1/notify")
            print("CONNECTED")
        except OSError as e:
            print("REFUSED", e)
        PY
        ls /run 2>&1; test -S /run/systemd/private && echo SEES-SYSTEMD; echo DONE
    """)
    assert "DONE" in run.log and "CONNECTED" not in run.log and "SEES-SYSTEMD" not in run.log
