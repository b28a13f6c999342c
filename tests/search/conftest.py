"""The search tests' session fixtures (built in search_fixtures.py)."""
from search_fixtures import stub_demo, synthetic_run  # noqa: F401 (pytest fixtures)
