"""The documented REST API under ``/api/v1`` (FastAPI routers, one module per resource)."""
