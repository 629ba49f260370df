"""OCI images for jobs: references (``reference.py``), pulling and pushing over the OCI
distribution API with every digest checked (``registry.py``), applying layers into a root-only
content-addressed cache (``layers.py``)."""
