"""Every test in this folder is marked ``integration``: it needs a broker, Postgres, the fake
embedding API or a worker process (the fixtures that start them are in tests/conftest.py and
start nothing until a test asks). ``pytest tests/unit`` or ``pytest -m "not integration"``
runs the rest without any of them."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


# First, so that -m, which deselects in the same hook, sees the marker.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)
