"""The REST gateway (FastAPI)."""
