import os

import pytest
from hypothesis import settings

import rmsprop.backends.cpu.kernel

# CI explores the same examples on every run, so that a red CI is a regression, not a new draw;
# a developer's run draws new examples each time (and keeps failures in .hypothesis/).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(params=["avx512", "avx2", "portable"])
def instruction_set(request):
    """Each instruction set the kernel is built for, where this CPU runs it."""
    if request.param not in rmsprop.backends.cpu.kernel.available_instruction_sets():
        pytest.skip(f"this CPU does not run {request.param}")
    chosen = rmsprop.backends.cpu.kernel.instruction_set()
    rmsprop.backends.cpu.kernel.select_instruction_set(request.param)
    yield request.param
    rmsprop.backends.cpu.kernel.select_instruction_set(chosen)
