"""Hostile jobs with egress enabled: the proxy is the only way out, and it never leads home."""

from __future__ import annotations


def test_proxy_never_reaches_host_loopback_or_metadata(hostile, host) -> None:
    port = host.listener.port
    targets = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}",
               f"[::ffff:127.0.0.1]:{port}", f"127.1:{port}", f"0x7f.0.0.1:{port}",
               f"2130706433:{port}", f"0.0.0.0:{port}", "169.254.169.254:80",
               "[fd00:ec2::254]:80", f"[::]:{port}"]
    probes = "\n".join(
        f"printf 'CONNECT {t} HTTP/1.1\\r\\n\\r\\n' | socat -t 3 - TCP:127.0.0.1:3128 "
        f"| head -1 | sed 's/^/{t} -> /'" for t in targets)
    run = hostile(probes + "\necho DONE", extra="egress: {mode: audit}\n")
    assert "DONE" in run.log
    for target in targets:
        assert f"{target} -> HTTP/1.1 403" in run.log, target
    assert host.listener.hits == 0
    assert run.result["egress"]["allowed"] == []


def test_the_proxy_socket_is_the_only_way_out(hostile, host) -> None:
    run = hostile(f"""
        ls -la /run/stockade/
        python3 - <<'PY'
        import socket
        for addr in (("127.0.0.1", {host.listener.port}),):
            try:
                socket.create_connection(addr, timeout=2)
                print("CONNECTED", addr)
            except OSError as e:
                print("refused", addr, e)
        PY
        echo DONE
    """, extra="egress: {mode: block, allow: []}\n",
                  STOCKADE_EGRESS_INTERNAL_ALLOW=f"127.0.0.1/32:{host.listener.port}")
    assert "DONE" in run.log and "CONNECTED" not in run.log
    assert "egress.sock" in run.log
