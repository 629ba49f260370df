"""The append-only, hash-chained audit trail.

Every state change of a job (and later every secret access and egress decision) is an
:class:`AuditEvent`: who did what, when, to which job. The store appends events in the same
transaction as the change they record; each event's hash covers the previous event's hash, so
an edited or deleted record breaks the chain (:func:`verify_chain`).
"""

from stockade.audit.events import GENESIS, AuditEvent, chain_hash, verify_chain

__all__ = ["GENESIS", "AuditEvent", "chain_hash", "verify_chain"]
