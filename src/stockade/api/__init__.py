"""The API between the control plane and runners.

Today it holds the protocol models (:mod:`stockade.api.protocol`) through which the in-process
runner of ``stockade run`` talks to the embedded control plane; the HTTP API of
``stockade server`` will carry the same models.
"""
