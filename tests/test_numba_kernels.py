"""The machine code of rmsprop._numba_kernels. Their results are tested against the per-tensor
path in tests/test_fused.py and tests/test_state_precision.py, and against the C++ kernel in
tests/test_cpp_kernels.py; here, that LLVM vectorised their loops."""

import os
import platform
import re
import subprocess
import sys

import pytest
from fused_checks import square_rooting

# Each low-precision state kernel in its plainest form and with both extra buffers. Two steps:
# the first creates the state per tensor.
STEPS = """
import torch
from rmsprop import RMSprop

for precision in ("bf16", "8bit"):
    for settings in ({}, {"momentum": 0.9, "centered": True}):
        param = torch.randn(10_000, requires_grad=True)
        param.grad = torch.randn(10_000)
        optimizer = RMSprop([param], state_precision=precision, **settings)
        optimizer.step()
        optimizer.step()
"""


def _parallel_loops(dump: str) -> dict[str, str]:
    """NUMBA_DUMP_ASSEMBLY's output split into {name: assembly} for the bodies of prange loops."""
    sections = re.split(r"^-+ASSEMBLY (.+?)-+$", dump, flags=re.MULTILINE)
    named = zip(sections[1::2], sections[2::2], strict=True)
    return {f"{name} #{i}": body for i, (name, body) in enumerate(named) if name.startswith("__numba_parfor_gufunc")}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 instructions")
def test_low_precision_state_kernels_are_vectorised(tmp_path):
    """Structure, not timing: every prange body that takes square roots takes packed ones. The
    bf16 and 8-bit state kernels were scalar on AVX2 (10-15x an fp32 step) while the AVX-512
    machine they were written on vectorised them; a load of a per-tensor value (seed, absmax)
    inside the loop, which the loop's stores might alias, and the 8-bit map lookups kept them so.
    Compiled afresh (an empty cache): numba shows no code it loaded from its cache."""
    environment = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_DUMP_ASSEMBLY": "1"}
    dump = subprocess.run(
        [sys.executable, "-c", STEPS], env=environment, capture_output=True, text=True, check=True
    ).stdout
    rooting, scalar_only = square_rooting(_parallel_loops(dump))
    assert len(rooting) >= 4, sorted(rooting)
    assert not scalar_only, scalar_only
