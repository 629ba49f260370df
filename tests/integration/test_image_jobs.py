"""Jobs on an OCI image (a static busybox, pushed to a real registry on loopback): the tag is
pinned at admission, the runner pulls and caches the image, steps run on the image's tree with
an /etc of stockade's making and every control of image: host; and what is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.image.registry import Registry, RegistryConfig
from tests.support.images import busybox_image
from tests.support.registry import RunningRegistry
from tests.support.web import InternalService

PROBE = """\
id -u; id -g
cat /etc/os-release
test ! -e /usr/bin/python3 && echo no-host-usr
grep -c '^ci:x:1000:1000:' /etc/passwd
grep -q ubuntu /etc/passwd || echo no-image-user-1000
test ! -e /etc/shadow && echo no-shadow
grep -q evil /etc/hosts || echo our-hosts
touch /bin/x 2>/dev/null || echo read-only-root
touch /etc/x 2>/dev/null || echo read-only-etc
echo built > /workspace/out.txt && cat /workspace/out.txt
readlink /etc/escape
cat /etc/escape 2>/dev/null || echo escape-dangles
mkdir /tmp/m; mount -t tmpfs none /tmp/m 2>/dev/null && echo MOUNTED || echo no-mount
unshare -U true 2>/dev/null && echo USERNS || echo no-userns
mknod /tmp/d c 1 3 2>/dev/null && echo MKNOD || echo no-mknod
echo x | nc -w 1 127.0.0.1 22 2>/dev/null && echo NETWORK || echo no-network
hostname evil 2>/dev/null && echo HOSTNAME || echo no-hostname
chroot / true 2>/dev/null && echo CHROOT || echo no-chroot
echo kcore=$(head -c 16 /proc/kcore 2>/dev/null | wc -c)
"""


@pytest.fixture
def image_env(plain_registry: RunningRegistry, tmp_path: Path) -> dict[str, str]:
    image = busybox_image(tmp_path, extra={"etc/escape": "-> /etc/shadow"})
    client = Registry(RegistryConfig(insecure=frozenset({plain_registry.host})))
    image.push(client, f"{plain_registry.host}/test/busybox:1")
    client.close()
    return {"STOCKADE_IMAGE_REGISTRIES": plain_registry.host,
            "STOCKADE_INSECURE_REGISTRIES": plain_registry.host,
            "DIGEST": image.digest, "HOST": plain_registry.host}


def _spec(image: str, script: str = PROBE) -> str:
    return (f"name: on-image\nimage: {image}\nsteps:\n  - name: probe\n    run: |\n"
            + "".join(f"      {line}\n" for line in script.splitlines()))


def test_a_job_runs_on_its_image_with_our_etc(run_job, image_env: dict[str, str]) -> None:
    host, digest = image_env.pop("HOST"), image_env.pop("DIGEST")
    job = run_job(_spec(f"{host}/test/busybox:1"), **image_env)
    assert job.rc == 0, job.stderr + job.log
    lines = job.log
    for expected in ("ID=stockade-test", "no-host-usr", "no-image-user-1000", "no-shadow",
                     "our-hosts", "read-only-root", "read-only-etc", "built",
                     "escape-dangles", "no-mount", "no-userns", "no-mknod", "no-network",
                     "no-hostname", "no-chroot", "kcore=0"):
        assert expected in lines, (expected, lines)
    assert "1000\n" in lines and "$6$secret" not in lines
    for forbidden in ("MOUNTED", "USERNS", "MKNOD", "NETWORK", "HOSTNAME", "CHROOT"):
        assert forbidden not in lines, forbidden
    assert job.result["image"] == f"{host}/test/busybox@{digest}"
    # (the runner runs only pinned images: the tag was pinned at admission)
    # again, with the registry unknown to this runner: the cached digest still runs
    again = run_job(_spec(f"{host}/test/busybox@{digest}", "cat /etc/os-release"),
                    **{**image_env, "STOCKADE_INSECURE_REGISTRIES": ""})
    assert again.rc == 0 and "ID=stockade-test" in again.log, again.stderr + again.log


def test_a_job_in_a_cached_image_imports_only_what_it_uses(
        run_job, image_env: dict[str, str]) -> None:
    """Start-up is part of every job's start: once the image, the spec and the seccomp filter
    are cached, a job imports no registry client, no network-namespace plumbing (no egress),
    no seccomp profile, no vault, no YAML or pydantic, nothing masking needs (no secrets), no
    OpenSSL (hashlib)."""
    host, digest = image_env.pop("HOST"), image_env.pop("DIGEST")
    spec = _spec(f"{host}/test/busybox@{digest}", "true")
    assert run_job(spec, **image_env).rc == 0  # pulls; compiles the filter; caches the spec
    job = run_job(spec, PYTHONPROFILEIMPORTTIME="1", **image_env)
    assert job.rc == 0, job.stderr
    imported = {line.rpartition("|")[2].strip() for line in job.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"stockade.image.cache", "stockade.runner.attempt"} <= imported  # (the report)
    for heavy in ("stockade.image.registry", "tempfile", "stockade.sandbox.netns", "socket",
                  "stockade.sandbox.seccomp_profile", "stockade.secrets.vault", "yaml",
                  "pydantic", "httpx", "ssl", "ahocorasick_rs", "base64", "shlex", "hashlib"):
        assert heavy not in imported, heavy


def test_images_the_operator_did_not_allow_or_that_are_missing(
        run_job, image_env: dict[str, str]) -> None:
    host = image_env.pop("HOST")
    image_env.pop("DIGEST")
    other = run_job(_spec("registry.example/team/base:1"), **image_env)
    assert other.rc == 3 and other.result["failure_reason"] == "policy_denied"
    assert "image_registries" in other.stderr + json.dumps(other.result)
    missing = run_job(_spec(f"{host}/test/none:1"), **image_env)
    assert missing.rc != 0 and missing.result.get("failure_reason") == "image_unavailable", \
        missing.stderr
    unpinned_missing = run_job(_spec(f"{host}/test/busybox@sha256:" + "1" * 64), **image_env)
    assert unpinned_missing.result["failure_reason"] == "image_unavailable"
    assert unpinned_missing.result["steps"] == []
    assert "Traceback" not in other.stderr + missing.stderr + unpinned_missing.stderr


def test_an_image_whose_etc_is_a_link_gets_ours_only(run_job, plain_registry: RunningRegistry,
                                                       tmp_path: Path) -> None:
    from tests.support.images import APPLETS, BUSYBOX, Image

    files: dict[str, bytes | str] = {"bin/busybox": BUSYBOX.read_bytes(), "etc": "-> /etc"}
    files |= {f"bin/{applet}": "-> busybox" for applet in APPLETS}
    image = Image(tmp_path, "", files=files)
    client = Registry(RegistryConfig(insecure=frozenset({plain_registry.host})))
    image.push(client, f"{plain_registry.host}/test/linked-etc:1")
    client.close()
    job = run_job(_spec(f"{plain_registry.host}/test/linked-etc:1", "cat /etc/passwd /etc/group"),
                  STOCKADE_IMAGE_REGISTRIES=plain_registry.host,
                  STOCKADE_INSECURE_REGISTRIES=plain_registry.host)
    assert job.rc == 0, job.stderr + job.log
    host = Path("/etc/passwd").read_text().splitlines()[1:]  # (root's line may be any image's)
    assert "ci:x:1000:1000:" in job.log
    assert not any(line and line in job.log for line in host), job.log



@pytest.fixture
def web() -> Iterator[int]:
    """An HTTP service on 127.0.0.1; yields its port."""
    service = InternalService()
    yield service.port
    service.close()


def test_a_job_on_an_image_reaches_the_egress_proxy(run_job, image_env: dict[str, str],
                                                    web: int) -> None:
    """No forwarder of the image's is needed: the proxy listens in the job's own network
    namespace. A destination the policy allows is reached, any other is refused."""
    host = image_env.pop("HOST")
    image_env.pop("DIGEST")
    script = "\n".join(
        f"printf 'GET http://{target}/ HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 3128 "
        f"| head -1 | sed 's|^|{target} -> |'" for target in (f"127.0.0.1:{web}",
                                                             "127.0.0.1:22"))
    spec = _spec(f"{host}/test/busybox:1", script + "\necho DONE").replace(
        "steps:", "egress: {mode: block, allow: []}\nsteps:")
    job = run_job(spec, **image_env, STOCKADE_EGRESS_INTERNAL_ALLOW=f"127.0.0.1/32:{web}")
    assert job.rc == 0, job.stderr + job.log
    assert f"127.0.0.1:{web} -> HTTP/1.0 200" in job.log, job.log
    assert "127.0.0.1:22 -> HTTP/1.1 403" in job.log, job.log
    assert job.result["egress"]["allowed"] == [f"127.0.0.1:{web}"]
