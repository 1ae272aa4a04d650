"""The data plane: what every API does, written once.

REST (/v1), the Open Inference Protocol over REST and gRPC, c2p.v1 gRPC and DICOMweb STOW-RS are adapters: each
translates its wire format to these calls and back, and none imports another. Here live the submission path
(``submit``: limits, probe, queue), waiting for a job and reading its outcome (``jobs``), what is served and whether
it is ready (``models``), and the Open Inference Protocol's tensors and parameters, shared by its two transports
(``oip``). Errors are the shared table's (service/errors.py); each adapter only chooses the wire shape.
"""
