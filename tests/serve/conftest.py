"""The serve tests' session fixtures (built in serve_fixtures.py)."""
from serve_fixtures import client, serve_demo, space  # noqa: F401 (pytest fixtures)
