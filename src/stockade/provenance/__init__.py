"""SLSA v1 provenance of a job's artifacts: an in-toto Statement v1 (``slsa.py``) signed by the
control plane in a DSSE envelope (``dsse.py``) with a key of its own (``keys.py``), which lives
in the control plane's state directory (0600, never mounted into a sandbox)."""
