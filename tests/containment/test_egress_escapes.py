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


def test_the_proxy_listener_is_the_only_way_out(hostile, host) -> None:
    run = hostile(f"""
        ls -la /run/stockade/
        echo "interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ' ')"
        python3 - <<'PY'
        import fcntl, socket, struct
        for addr in (("127.0.0.1", {host.listener.port}),):
            try:
                socket.create_connection(addr, timeout=2)
                print("CONNECTED", addr)
            except OSError as e:
                print("refused", addr, e)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", 3128))
            print("TOOK THE PROXY PORT")
        except OSError as e:
            print("proxy port held", e.errno)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:  # take loopback down: the namespace is not the job's to change
                fcntl.ioctl(u, 0x8914, struct.pack("16sH22x", b"lo", 0))
                print("LOOPBACK DOWN")
            except OSError as e:
                print("loopback stays", e.errno)
        PY
        echo DONE
    """, extra="egress: {mode: block, allow: []}\n",
                  STOCKADE_EGRESS_INTERNAL_ALLOW=f"127.0.0.1/32:{host.listener.port}")
    assert "DONE" in run.log and "CONNECTED" not in run.log
    assert any(line.split()[-2:] == ["interfaces:", "lo"] for line in run.log.splitlines())
    assert "proxy port held 98" in run.log  # EADDRINUSE
    assert "loopback stays 1" in run.log  # EPERM
    assert "TOOK" not in run.log and "LOOPBACK DOWN" not in run.log
    assert "egress.sock" not in run.log
