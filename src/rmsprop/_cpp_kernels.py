"""The C++ kernel of the fused CPU path (``csrc/fused_step.cpp``), built on first use.

:func:`module` compiles it with ``torch.utils.cpp_extension`` (35-70 s on
2 cores, once) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``); later processes load the built
library in milliseconds. The cache entry's name carries a digest of
everything the build depends on: its source and flags, the CPU's model and
flags (it is built with ``-march=native``), the Python and torch versions
(their headers and ABI), and the paths of the torch and Python installation
and of the compiler, which torch writes into the entry's build files. Two
environments therefore never share, and never rebuild, each other's entry.
The entry builds from its own copy of the source, so reinstalling the package
does not make the build look stale. Whenever a build is about to run, a
warning says so. Its loops run on torch's own intra-op threads
(``at::parallel_for``): no second thread pool competes with torch's.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import time
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

__all__ = ["build_directory", "build_inputs", "build_problem", "compiler_missing", "is_built", "module", "remove_stale_lock"]

SOURCE = Path(__file__).with_name("csrc") / "fused_step.cpp"
# -ffp-contract=off: fused multiply-adds only where the source asks for them (mul_add), at the
# same places as the numba kernel's, so that the two round alike.
# -fno-math-errno: lets sqrt vectorise. -fopenmp: at::parallel_for's OpenMP loop is compiled here.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]


def compiler_missing() -> str | None:
    """Why the kernel cannot be built here (no C++ compiler or ninja), or ``None``."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r}) on PATH: the fused CPU path compiles a C++ kernel, as torch.compile does"
    if _ninja_directory() is None:
        return "ninja is not installed (pip install ninja): torch builds C++ extensions with it"
    return None


@cache
def module() -> ModuleType:
    """The built kernel; compiles it if this machine's cache has no build of this source."""
    from torch.utils import cpp_extension

    ninja = _ninja_directory()
    if ninja is not None and shutil.which("ninja") is None:
        os.environ["PATH"] = f"{ninja}{os.pathsep}{os.environ.get('PATH', '')}"
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_lock(directory)
    source = directory / SOURCE.name
    if not source.exists():
        shutil.copyfile(SOURCE, source)
    if not is_built():
        warnings.warn(
            f"rmsprop: building the fused CPU kernel for this machine and environment in {directory} "
            "(about a minute on 2 cores, once; `rmsprop build-kernel` does it ahead of time)",
            stacklevel=2,
        )
    return cpp_extension.load(
        name=directory.name,
        sources=[str(source)],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
    )


def build_directory() -> Path:
    """This environment's cache entry: where the kernel is built, or will be."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"rmsprop_fused_step_{_build_digest()}"


def is_built() -> bool:
    """Whether this environment's cache entry holds an up-to-date library, so :func:`module` only loads it.

    Up to date as ninja judges it (a dry run, a few milliseconds): a header of
    torch reinstalled since the build, say, makes it rebuild.
    """
    directory = build_directory()
    if not (directory / f"{directory.name}.so").exists():
        return False
    ninja = shutil.which("ninja") or shutil.which("ninja", path=_ninja_directory())
    if ninja is None or not (directory / "build.ninja").exists():
        return True
    dry_run = subprocess.run([ninja, "-n", "-C", str(directory)], capture_output=True, text=True, check=False)
    return dry_run.returncode == 0 and "no work to do" in dry_run.stdout


# A build takes about a minute; a lock this old belongs to a build that was killed.
STALE_LOCK_SECONDS = 600


def remove_stale_lock(directory: Path) -> bool:
    """Remove the lock file a killed build left in ``directory`` (torch would wait on it forever)."""
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    warnings.warn(f"rmsprop: removing {lock}, left {age / 60:.0f} minutes ago by a build that did not finish", stacklevel=3)
    lock.unlink(missing_ok=True)
    return True


@cache
def build_problem() -> str | None:
    """Why the kernel is unavailable (no compiler, or its build failed), or ``None`` once it is loaded."""
    missing = compiler_missing()
    if missing is not None:
        return missing
    try:
        module()
    except (RuntimeError, OSError, ImportError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return f"the C++ kernel failed to build: {lines[0]}"
    return None


def _ninja_directory() -> str | None:
    """Where a ``ninja`` executable is: on PATH, or the one the ``ninja`` package installs."""
    found = shutil.which("ninja")
    if found is not None:
        return os.path.dirname(found)
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


def _build_digest() -> str:
    """Eight hex digits naming what a build depends on: see :func:`build_inputs`."""
    return hashlib.sha256("\n".join(build_inputs()).encode()).hexdigest()[:8]


def build_inputs() -> list[str]:
    """What the built library depends on, and what torch writes into the build files.

    A new source gets a directory of its own, so whether one is built is
    whether its library file exists (torch would version it in place).
    """
    import torch
    from torch.utils import cpp_extension

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    compiler = os.environ.get("CXX", "c++")
    return [
        SOURCE.read_text(),
        " ".join(CFLAGS),
        platform.machine() + platform.processor(),
        "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))})),
        platform.python_version(),
        torch.__version__,
        *cpp_extension.include_paths(),
        *cpp_extension.library_paths(),
        sysconfig.get_path("include"),
        str(shutil.which(compiler) or compiler),
    ]
