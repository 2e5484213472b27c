"""Shared fixtures: the project root on sys.path, ../shared data, and the shipped Predictor."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import app  # noqa: E402,F401  (TensorFlow's CPU kernels as the product sets them, before TF loads)


def shared_or_skip(path, why_needed):
    """``path`` (under ../shared); skipped where absent, but a failure in CI
    (REQUIRE_SHARED_DATA)."""
    if path.exists():
        return path
    if os.environ.get("REQUIRE_SHARED_DATA"):
        pytest.fail(f"{path} is missing but REQUIRE_SHARED_DATA is set (CI must use it)")
    pytest.skip(f"{path} is absent ({why_needed})")


def shared_data_or_skip():
    """The ../shared/data folder of real CT."""
    return shared_or_skip(SHARED_DATA, "real CT tests need the shared data folder")


@pytest.fixture(scope="session")
def shared_data():
    return shared_data_or_skip()


@pytest.fixture(scope="session")
def predictor():
    """The Predictor with the shipped weights (weights/, default precision), loaded once for the
    session. Only for tests that call it without changing it; a test that needs other weights,
    another precision or loading options, or that patches its internals, makes its own."""
    from app.predictor import Predictor
    from app.weights import DEFAULT_WEIGHTS_DIR

    return Predictor(DEFAULT_WEIGHTS_DIR)
