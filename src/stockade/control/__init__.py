"""The control plane core: admission, queue, leases and job state.

:class:`~stockade.control.service.ControlService` is the only writer of job state. ``stockade
run`` uses it in-process over the embedded SQLite store; ``stockade server`` will put the same
service behind HTTP. :class:`~stockade.control.service.AdmissionPolicy` carries the operator's
admission settings into it.
"""

from stockade.control.service import AdmissionPolicy, ControlService, JobView

__all__ = ["AdmissionPolicy", "ControlService", "JobView"]
