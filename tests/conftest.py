"""Shared fixtures: where the golden reference outputs are, and skipping without them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The golden cases sit beside the checkout (../shared/golden); QKD_GOLDEN overrides.
GOLDEN_ROOT = Path(os.environ.get("QKD_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))

SIMULATED_CASES = ["tiny", "realistic", "noisy", "fail"]


def golden_case(name: str) -> Path:
    """Return the folder of a golden case, or skip the test with the reason."""
    path = GOLDEN_ROOT / name
    if not path.is_dir():
        pytest.skip(f"golden case {name!r} not found at {path}; set QKD_GOLDEN to the golden folder")
    return path


@pytest.fixture(params=SIMULATED_CASES)
def simulated_case(request) -> Path:
    """Each simulated golden case in turn."""
    return golden_case(request.param)
