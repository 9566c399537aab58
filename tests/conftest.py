"""Shared test fixtures."""

import pytest

from rnnkern.backends.base import poison_allocations


@pytest.fixture(autouse=True)
def nan_poisoned_allocations():
    """Every buffer a backend allocates through ``backends.base.empty`` starts as NaN, so an
    output element a kernel never writes fails the comparison instead of passing as zero."""
    with poison_allocations():
        yield
