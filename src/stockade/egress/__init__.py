"""Egress control: the per-job network policy and the runner's egress proxy.

A job with ``egress.mode: none`` (the default) has no network at all. With ``block`` or
``audit`` its network namespace still has no route out: its only path is the runner's egress
proxy (:mod:`.proxy`), reached through a Unix socket bind-mounted into the sandbox. The proxy
enforces the allowlist (:mod:`.policy`), resolves names itself (:mod:`.resolver`), refuses
loopback, link-local, private, CGNAT, multicast and unspecified addresses unless one of the
operator's internal entries admits them (a job spec never can), forwards one checked request
per plain-HTTP connection (:mod:`.http`), and reports every decision. :mod:`.admission`
decides what an untrusted job's egress may ask for.
"""
