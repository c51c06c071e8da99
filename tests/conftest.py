"""Shared pytest setup for the adala test suite."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same RNG state, so random models and inputs are reproducible."""
    torch.manual_seed(0)
