"""The job spec (v1): the contract users write, and treated as hostile input.

:func:`load_spec` reads the file (regular files only, bounded), builds the YAML document
without aliases, deep nesting or exotic tags (:mod:`.yamldoc`) and validates it strictly
(pydantic, in :mod:`.model` and :mod:`.parse`) into a frozen :class:`Job` with every default
applied; any problem raises :class:`stockade.errors.SpecError` naming the path and the fix, as a
bounded, escaped report (:mod:`.problems`). :func:`.ceilings.check` then holds the job to the
operator's resource ceilings. The rest of stockade uses :class:`Job` only, so pydantic is
imported only when a spec really has to be validated.
"""

from stockade.spec.job import Job, JobEgress, JobResources, JobStep
from stockade.spec.load import load_spec

__all__ = ["Job", "JobEgress", "JobResources", "JobStep", "load_spec"]
