"""The secrets broker: encrypted store, scoped per-job leases, masking, leak scanning, OIDC.

Values are encrypted at rest with AES-256-GCM (:mod:`.vault`); a job receives only the secrets
its scope allows, as a lease bound to its attempt and revoked when it ends (:mod:`.broker`);
every issued value and its encodings are masked in logs (:mod:`.redact`, the only place that
redacts) and searched for in artifacts before they are published (:mod:`.leaks`); each job can
prove who it is with a short-lived signed OIDC token (:mod:`.oidc`).
"""
