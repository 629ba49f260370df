"""What a pull can fail with, apart from the registry client (``registry.py``), so that a job
whose image is cached never imports the client."""

from __future__ import annotations

from stockade.errors import InfrastructureError, StockadeError


class ImageUnavailable(InfrastructureError):
    """No source had the image (or none answered): the job fails ``image_unavailable``."""


class ImageRefused(StockadeError):
    """A registry sent content that does not match what was asked for (a changed manifest or
    blob, a size over a bound): the job fails ``image_unverified``."""
