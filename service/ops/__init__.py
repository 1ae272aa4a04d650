"""What an operator watches beside the request path: Prometheus metrics (``metrics``), OpenTelemetry traces
(``tracing``), the audit log (``audit``) and a lone worker's own metrics and health port (``port``).

Separate because both sides of the request path (gateway and worker) report through it and neither owns it; none
of it changes a result. Nothing is imported here: ``port`` needs the worker, and the gateway must not load it.
"""
