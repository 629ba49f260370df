"""The append-only, hash-chained audit trail.

Every state change of a job (and later every secret access and egress decision) is an
:class:`AuditEvent`: who did what, when, to which job. The store appends events in the same
transaction as the change they record; each event's hash covers the previous event's hash, so
an edited or deleted record breaks the chain (:func:`verify_chain`). The head of the chain
(count and last hash) is anchored in the database and in a file outside it, so that a removed
tail is detected too (:mod:`stockade.audit.head`).
"""

from stockade.audit.events import GENESIS, AuditEvent, chain_hash, verify_chain
from stockade.audit.head import AuditHead, AuditSnapshot, HeadFile, check_head

__all__ = ["GENESIS", "AuditEvent", "AuditHead", "AuditSnapshot", "HeadFile", "chain_hash",
           "check_head", "verify_chain"]
