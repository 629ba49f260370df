"""The OCI runtime spec a step runs with: the hardening baseline, spelled out for runc/runsc."""

from __future__ import annotations

import errno

from stockade.sandbox import oci_config, seccomp_profile
from stockade.sandbox.cgroups import Limits
from stockade.sandbox.plumbing import MASKED_PROC, MASKED_PROC_DIRS

STEP = oci_config.StepConfig(
    hostname="job-1", root="/run/stockade/i/.oci-root-host-1",
    args=["/usr/bin/bash", "-e", "-o", "pipefail", "/run/stockade/step.sh"],
    env={"PATH": "/usr/bin:/bin", "A": "b=c"}, job_uid=1600001, setup_uid=1600002,
    root_binds=[("/usr", "/usr"), ("/run/stockade/i/etc-x", "/etc")],
    workspace="/run/stockade/i/job-1/ws", tmp="/run/stockade/i/job-1/tmp",
    files=[("/run/stockade/i/job-1/oci/step/step.sh", "/run/stockade/step.sh")],
    netns=None, userns=None, cgroups_path="/stockade/i-job-1/step-1",
    limits=Limits(memory_bytes=256 << 20, pids=64, cpus=0.5), shm_bytes=1 << 20)


def test_no_capabilities_no_new_privileges_uid_1000() -> None:
    process = oci_config.config(STEP)["process"]
    assert process["capabilities"] == {name: [] for name in
                                       ("bounding", "effective", "inheritable", "permitted",
                                        "ambient")}
    assert process["noNewPrivileges"] is True
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": []}
    assert {"type": "RLIMIT_CORE", "hard": 0, "soft": 0} in process["rlimits"]
    assert process["env"] == ["PATH=/usr/bin:/bin", "A=b=c"]
    assert process["terminal"] is False


def test_the_user_namespace_maps_nothing_to_host_root() -> None:
    linux = oci_config.config(STEP)["linux"]
    for key in ("uidMappings", "gidMappings"):
        assert linux[key] == [{"containerID": 0, "hostID": 1600002, "size": 1},
                              {"containerID": 1000, "hostID": 1600001, "size": 1}]
        assert all(m["hostID"] != 0 for m in linux[key])


def test_every_namespace_is_new_but_a_given_network() -> None:
    types = {n["type"]: n for n in oci_config.config(STEP)["linux"]["namespaces"]}
    assert set(types) == {"pid", "ipc", "uts", "mount", "user", "cgroup", "network"}
    assert all("path" not in n for n in types.values())
    joined = oci_config.config(STEP._replace(netns="/proc/1/task/2/ns/net"))["linux"]
    net = next(n for n in joined["namespaces"] if n["type"] == "network")
    assert net == {"type": "network", "path": "/proc/1/task/2/ns/net"}


def test_the_jobs_own_user_namespace_is_joined_with_its_maps_stated() -> None:
    """runc joins the user namespace the job's host uid made; runc 1.1 still reads the maps
    (the container root's and the job user's host uids), so they stay, unchanged. The core
    limit comes from runc's own process then (runc's prlimit could be refused)."""
    doc = oci_config.config(STEP._replace(userns="/proc/1/fd/7"))
    assert doc["process"]["rlimits"] == []
    linux = doc["linux"]
    types = {n["type"]: n for n in linux["namespaces"]}
    assert types["user"] == {"type": "user", "path": "/proc/1/fd/7"}
    assert all("path" not in n for t, n in types.items() if t != "user")
    assert linux["uidMappings"] == linux["gidMappings"] == [
        {"containerID": 0, "hostID": 1600002, "size": 1},
        {"containerID": 1000, "hostID": 1600001, "size": 1}]
    assert oci_config.id_map(1600001, 1600002) == [(0, 1600002), (1000, 1600001)]


def test_read_only_root_masked_proc_minimal_dev() -> None:
    doc = oci_config.config(STEP)
    assert doc["root"] == {"path": STEP.root, "readonly": True}
    assert doc["hostname"] == "job-1"
    assert set(doc["linux"]["maskedPaths"]) == {*MASKED_PROC, *MASKED_PROC_DIRS}
    assert {"/proc/sys", "/proc/sysrq-trigger", "/run"} <= set(doc["linux"]["readonlyPaths"])
    mounts = {m["destination"]: m for m in doc["mounts"]}
    assert "ro" in mounts["/dev"]["options"] and "ro" in mounts["/usr"]["options"]
    assert "ro" in mounts["/etc"]["options"] and "ro" in mounts["/run/stockade/step.sh"]["options"]
    assert all("nosuid" in m["options"] for m in doc["mounts"] if m["type"] == "bind")
    assert "/sys" not in mounts
    assert doc["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]


def test_limits_and_cgroup() -> None:
    linux = oci_config.config(STEP)["linux"]
    assert linux["cgroupsPath"] == "/stockade/i-job-1/step-1"
    resources = linux["resources"]
    assert resources["memory"] == {"limit": 256 << 20, "swap": 256 << 20}
    assert resources["pids"] == {"limit": 64}
    assert resources["cpu"] == {"quota": 50_000, "period": 100_000}


def test_seccomp_means_what_the_bpf_filter_means() -> None:
    profile = oci_config.seccomp("x86_64")
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == errno.EPERM
    assert profile["architectures"] == ["SCMP_ARCH_X86_64"]
    allowed = profile["syscalls"][0]
    assert allowed == {"names": list(seccomp_profile.ALLOW), "action": "SCMP_ACT_ALLOW"}
    rules = {(tuple(e["names"]), e["action"], e.get("errnoRet"),
              tuple((a["index"], a["op"], a["value"], a["valueTwo"]) for a in e.get("args", [])))
             for e in profile["syscalls"][1:]}
    expected = {((r.syscall,), "SCMP_ACT_ALLOW" if r.errno is None else "SCMP_ACT_ERRNO",
                 r.errno, () if r.condition is None else
                 ((r.condition.arg, f"SCMP_CMP_{r.condition.op}", r.condition.value,
                   r.condition.value_two),)) for r in seccomp_profile.CONDITIONAL}
    assert rules == expected
    assert ((("clone3",), "SCMP_ACT_ERRNO", errno.ENOSYS, ())) in rules
    allowed_names = {n for e in profile["syscalls"] if e["action"] == "SCMP_ACT_ALLOW"
                     for n in e["names"]}
    assert not allowed_names & set(seccomp_profile.REFUSED)
    assert oci_config.seccomp("aarch64")["architectures"] == ["SCMP_ARCH_AARCH64"]


def test_the_backend_names_agree_with_the_settings() -> None:
    from stockade.config import SANDBOX_BACKENDS
    from stockade.sandbox import BACKENDS

    assert tuple(BACKENDS) == SANDBOX_BACKENDS
