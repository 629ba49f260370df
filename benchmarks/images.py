"""Images, side by side in one run, on the minimal image ``stockade image build`` makes
(Debian's Essential packages, from the local package mirror ``make`` fetched), pushed to a
docker-registry on 127.0.0.1:

(a) pull + unpack: ``stockade image pull REF@DIGEST`` into an empty cache versus ``skopeo copy
    docker://REF@DIGEST oci:DIR`` followed by ``umoci unpack`` of the same digest (key
    ``ratio_vs_skopeo_umoci``; target <= 1.0);
(b) a trivial job in the cached image: ``stockade run`` (per sandbox backend) versus a
    locked-down ``podman run`` of the same image (runc, no network, all capabilities dropped,
    read-only, no-new-privileges, pids and memory limits; key ``ratio_vs_podman``; target
    <= 0.75).

Runs are interleaved so both sides see the same machine load. Prints medians and ratios, then
one ``RESULT {json}`` line per configuration. Run as root: ``make bench``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from support.sides import compare, remove_installation  # noqa: E402

from tests.support.registry import start  # noqa: E402  (a registry on loopback, ours)

STOCKADE = str(Path(sys.executable).parent / "stockade")
DEBS = ROOT / ".cache" / "debs"


def main() -> None:
    """Build and push the image, then measure (a) and (b)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="runs of (b); (a) runs n/4")
    parser.add_argument("--backends", default="bwrap,oci", help="sandbox backends for (b)")
    args = parser.parse_args()
    for tool in ("skopeo", "umoci", "podman", "runc", "mmdebstrap"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install skopeo umoci podman runc mmdebstrap")
    if not (DEBS / "Release").exists():
        sys.exit(f"{DEBS} is missing: run make debs")
    work = Path(tempfile.mkdtemp(prefix="stockade-images-bench-"))
    registry = start(tls_and_auth=False)
    env = {**os.environ, "STOCKADE_HOME": str(work / "home"),
           "STOCKADE_IMAGE_REGISTRIES": registry.host,
           "STOCKADE_INSECURE_REGISTRIES": registry.host}
    try:
        reference = build_and_push(work, env, registry.host)
        print(f"image: {reference}")
        pull_and_unpack(work, env, reference, max(5, args.n // 4))
        run_in_image(work, env, reference, args.n, args.backends.split(","))
    finally:
        registry.stop()
        remove_installation(work / "home")
        shutil.rmtree(work, ignore_errors=True)


def cli(env: dict[str, str], *args: str) -> str:
    """``stockade ARGS``; its last line of output."""
    done = subprocess.run([STOCKADE, *args], env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        sys.exit(f"stockade {' '.join(args)} failed: {done.stderr}")
    return done.stdout.splitlines()[-1] if done.stdout else ""


def build_and_push(work: Path, env: dict[str, str], host: str) -> str:
    """The minimal image, built once and pushed: REGISTRY/REPO@sha256:DIGEST."""
    started = time.monotonic()
    built = cli(env, "image", "build", "bench/minimal", "--suite", "bookworm",
                "--mirror", f"deb [trusted=yes] copy://{DEBS} ./")
    print(f"built {built} in {time.monotonic() - started:.1f} s")
    return cli(env, "image", "push", built, f"{host}/bench/minimal:1")


def pull_and_unpack(work: Path, env: dict[str, str], reference: str, n: int) -> None:
    """(a): a pull into an empty cache versus skopeo copy + umoci unpack."""

    def ours() -> None:
        cli(env, "image", "prune", "--all")
        cli(env, "image", "pull", reference)

    def theirs() -> None:
        target = work / "skopeo"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{reference}", f"oci:{target / 'layout'}:bench"],
                       check=True, capture_output=True)
        subprocess.run(["umoci", "unpack", "--image", f"{target / 'layout'}:bench",
                        str(target / "bundle")], check=True, capture_output=True)

    compare("(a) pull + unpack of the minimal image", ours, theirs, n,
            "skopeo copy + umoci unpack", key="ratio_vs_skopeo_umoci", warm=1)
    shutil.rmtree(work / "skopeo", ignore_errors=True)


def run_in_image(work: Path, env: dict[str, str], reference: str, n: int,
                 backends: list[str]) -> None:
    """(b): ``stockade run`` of ``true`` in the cached image versus a locked-down podman run."""
    spec = work / "job.yaml"
    spec.write_text(f"name: trivial\nimage: {reference}\nsteps:\n  - {{name: t, run: 'true'}}\n")
    (work / "ws").mkdir(exist_ok=True)
    subprocess.run(["podman", "pull", "--quiet", "--tls-verify=false", reference], check=True,
                   capture_output=True)
    podman = ["podman", "--runtime", "runc", "run", "--rm", "--network", "none",
              "--cap-drop", "all", "--read-only", "--security-opt", "no-new-privileges",
              "--pids-limit", "64", "--memory", "256m", "--ulimit", "nofile=1024:1024",
              "--ulimit", "nproc=1024:1024", reference, "/bin/true"]

    def theirs() -> None:
        subprocess.run(podman, check=True, stdout=subprocess.DEVNULL)

    try:
        for backend in backends:
            run_env = {**env, "STOCKADE_SANDBOX_BACKEND": backend}
            trial = subprocess.run([STOCKADE, "run", str(spec), "--workspace", str(work / "ws")],
                                   env=run_env, capture_output=True, text=True, check=False)
            if trial.returncode != 0:
                print(f"(b) backend {backend}: cannot run here ({trial.stderr.strip()[-300:]})")
                continue

            def ours(run_env: dict[str, str] = run_env) -> None:
                subprocess.run([STOCKADE, "run", str(spec), "--workspace", str(work / "ws")],
                               env=run_env, check=True, stderr=subprocess.DEVNULL)

            compare("(b) stockade run in the cached image", ours, theirs, n,
                    "locked-down podman run", key="ratio_vs_podman", backend=backend)
    finally:
        subprocess.run(["podman", "rmi", "--force", reference], capture_output=True, check=False)


if __name__ == "__main__":
    os.umask(0o022)
    main()
