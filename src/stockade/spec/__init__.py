"""The job spec (v1): the contract users write.

:func:`load_spec` reads YAML and validates it strictly (pydantic, in :mod:`.model` and
:mod:`.parse`) into a frozen :class:`Job` with every default applied; any problem raises
:class:`stockade.errors.SpecError` naming the path and the fix. The rest of stockade uses
:class:`Job` only, so pydantic is imported only when a spec really has to be validated.
"""

from stockade.spec.job import Job, JobEgress, JobResources, JobStep
from stockade.spec.load import load_spec

__all__ = ["Job", "JobEgress", "JobResources", "JobStep", "load_spec"]
