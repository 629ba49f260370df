"""The runner: claims a job from the control plane, prepares its sandbox, runs its steps with
live and stored logs, collects artifacts, tears everything down and reports the outcome.

It talks to the control plane only through :class:`stockade.api.protocol.ControlPlane`.
"""

from stockade.runner.executor import Runner

__all__ = ["Runner"]
