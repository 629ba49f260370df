"""OCI images for jobs: references (``reference.py``), pulling and pushing over the OCI
distribution API with every digest checked (``registry.py``), applying layers into a root-only
content-addressed cache (``layers.py``); cosign-compatible keyed signatures (``signing.py``,
cosign's key files in ``cosign_keys.py``, the operator's trusted keys in ``trust.py``); what
an image holds (``packages.py``), its CycloneDX SBOM (``sbom.py``), and its vulnerabilities
against OSV data (``osv.py`` reads the data, ``vulns.py`` matches in dpkg's version order of
``versions.py``, ``scan.py`` stores reports and holds the runner's policy)."""
