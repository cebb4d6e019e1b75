"""The HTTP face of the service: FastAPI app, token access control, Prometheus /metrics."""
