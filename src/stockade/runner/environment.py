"""The environment of a step: documented variables only, nothing of the runner's own."""

from __future__ import annotations

from stockade.spec import Job

BASE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def step_env(spec: Job, job_id: str, attempt: int, step: str) -> dict[str, str]:
    """The whole environment of a step: documented CI/STOCKADE_* variables and the spec's env."""
    return {
        **spec.env,
        "CI": "true",
        "STOCKADE": "true",
        "STOCKADE_JOB_ID": job_id,
        "STOCKADE_JOB_NAME": spec.name,
        "STOCKADE_ATTEMPT": str(attempt),
        "STOCKADE_STEP": step,
        "STOCKADE_WORKSPACE": "/workspace",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "USER": "ci",
        "LOGNAME": "ci",
        "LANG": "C.UTF-8",
        "PATH": BASE_PATH,
    }


def proxy_env(url: str | None) -> dict[str, str]:
    """Proxy variables for the steps (both spellings tools look for); none without egress."""
    if url is None:
        return {}
    no_proxy = "localhost,127.0.0.1,::1"
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
            "NO_PROXY": no_proxy, "no_proxy": no_proxy}
