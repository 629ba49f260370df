"""stockade: a self-hosted CI runner platform, hardened by default.

Jobs are parsed by :mod:`stockade.spec`, admitted and tracked by :mod:`stockade.control`,
executed by :mod:`stockade.runner` inside a :mod:`stockade.sandbox`, persisted by
:mod:`stockade.store` and recorded in the append-only :mod:`stockade.audit` trail.
"""

__version__ = "0.1.0"
