"""Shared fixtures: the project root on sys.path, ../shared data, and a weights folder."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def shared_data_or_skip():
    """The ../shared/data folder; skipped where absent, but a failure in CI (REQUIRE_SHARED_DATA)."""
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    if os.environ.get("REQUIRE_SHARED_DATA"):
        pytest.fail(f"{SHARED_DATA} is missing but REQUIRE_SHARED_DATA is set (CI must use it)")
    pytest.skip(f"{SHARED_DATA} is absent (real CT tests need the shared data folder)")


@pytest.fixture(scope="session")
def shared_data():
    return shared_data_or_skip()
