"""The SLSA v1 provenance statement of a finished job (https://slsa.dev/spec/v1.0/provenance).

Built from what the control plane recorded, never from what the job printed: subjects are
the artifacts with the sha256 the control plane checked when they came in; the resolved
dependencies are the job's spec (sha256 of the normalised spec it admitted) and its image (by
digest once images are pulled by digest; ``image: host`` is named only); the builder is this
control plane, the invocation the job's attempt. The same job gives the same bytes each time.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any

from stockade.store.interface import ArtifactRow, JobRow

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://stockade.dev/provenance/job/v1"
FINISHED = ("succeeded", "failed", "error")


def builder_id(issuer: str) -> str:
    """The id of the builder: this control plane, named by its OIDC issuer."""
    return f"{issuer.rstrip('/')}/builder/v1"


def statement(job: JobRow, artifacts: Sequence[ArtifactRow], builder: str) -> dict[str, Any]:
    """The in-toto Statement v1 of ``job``'s artifacts (the job must be finished)."""
    spec = json.loads(job.spec_json)
    image = str(spec.get("image", "host"))
    image_ref: dict[str, Any] = {"uri": f"stockade:image:{image}", "name": "image"}
    if "@sha256:" in image:
        image_ref = {"uri": f"oci://{image}", "name": "image",
                     "digest": {"sha256": image.rsplit("@sha256:", 1)[1]}}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": a.path, "digest": {"sha256": a.sha256}} for a in artifacts],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"job_name": job.name, "ref": job.ref,
                                       "trust": job.trust},
                "internalParameters": {"job_id": job.id, "attempt": job.attempt,
                                       "runner_id": job.runner_id, "status": job.status},
                "resolvedDependencies": [
                    {"uri": f"stockade:job:{job.id}:spec", "name": "spec",
                     "digest": {"sha256": hashlib.sha256(job.spec_json.encode()).hexdigest()}},
                    image_ref,
                ],
            },
            "runDetails": {
                "builder": {"id": builder},
                "metadata": {"invocationId": f"{job.id}/{job.attempt}",
                             "startedOn": _rfc3339(job.started_at or job.created_at),
                             "finishedOn": _rfc3339(job.finished_at or job.created_at)},
            },
        },
    }


def payload(doc: dict[str, Any]) -> bytes:
    """The statement's bytes as signed: canonical (sorted keys, no blanks, UTF-8)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def _rfc3339(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
