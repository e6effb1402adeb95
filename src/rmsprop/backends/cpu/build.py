"""How the fused CPU kernel (``backends/cpu/csrc``) is compiled: its sources and each instruction set's flags.

Standard library only: ``setup.py`` loads this file to build the kernel when
the package is installed, and ``rmsprop build-kernel`` uses it to build one
for an installation that has none (see docs/design/cpu-kernel.md).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["COMMON_FLAGS", "INSTRUCTION_SET_FLAGS", "MODULE_SOURCE", "SOURCE_DIRECTORY", "build", "compile_units", "source_digest"]

SOURCE_DIRECTORY = Path(__file__).with_name("csrc")
MODULE_SOURCE = "module.cpp"
# -ffp-contract=off: fused multiply-adds only where the rule writes mul_add.
# -fno-math-errno: lets sqrt vectorise. -fopenmp-simd: the loops' simd pragmas, no OpenMP runtime.
COMMON_FLAGS = ["-O3", "-std=c++20", "-fPIC", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno"]
# The translation unit of each instruction set and its flags; module.cpp picks one at run time.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
INSTRUCTION_SET_FLAGS = {
    "isa_avx512.cpp": (
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mprefer-vector-width=512"]
        if _X86
        else None
    ),
    "isa_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"] if _X86 else None,
    "isa_portable.cpp": [],
}


def source_digest() -> str:
    """Twelve hex digits naming the sources and flags (a cached build is valid for them only)."""
    description = [str(COMMON_FLAGS), str(INSTRUCTION_SET_FLAGS), platform.machine(), sysconfig.get_config_var("EXT_SUFFIX")]
    for path in sorted(SOURCE_DIRECTORY.iterdir()):
        description.append(path.name + path.read_text())
    return hashlib.sha256("\n".join(description).encode()).hexdigest()[:12]


def compile_units(compile_unit: Callable[[str, list[str]], list[str]]) -> list[str]:
    """The object files of every translation unit this machine builds: ``compile_unit(name, flags)``
    compiles one (a file of :data:`SOURCE_DIRECTORY`, with its flags after :data:`COMMON_FLAGS`) and
    returns its objects. The units are independent: compiled side by side, one per core."""
    units = {MODULE_SOURCE: [], **{name: flags for name, flags in INSTRUCTION_SET_FLAGS.items() if flags is not None}}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        compiled = pool.map(lambda unit: compile_unit(*unit), units.items())
        return [path for paths in compiled for path in paths]


def build(directory: Path) -> Path:
    """Compile the kernel into ``directory`` with the C++ compiler of ``CXX`` (default ``c++``); its path.

    Raises ``subprocess.CalledProcessError`` (with the compiler's output) or ``FileNotFoundError``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    include = ["-I", sysconfig.get_paths()["include"], "-I", str(SOURCE_DIRECTORY)]
    target = directory / f"_cpu_kernel{sysconfig.get_config_var('EXT_SUFFIX')}"
    with tempfile.TemporaryDirectory(dir=directory) as scratch:

        def compile_unit(name: str, flags: list[str]) -> list[str]:
            output = str(Path(scratch) / (name + ".o"))
            _run([*compiler, *COMMON_FLAGS, *flags, *include, "-c", str(SOURCE_DIRECTORY / name), "-o", output])
            return [output]

        objects = compile_units(compile_unit)
        partial = Path(scratch) / target.name
        _run([*compiler, "-shared", *objects, "-o", str(partial), "-lpthread", "-ldl"])
        # Renamed into place, so that a process never loads a half-written library.
        os.replace(partial, target)
    return target


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)
