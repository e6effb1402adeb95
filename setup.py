"""Builds the fused CPU kernel (src/rmsprop/backends/cpu/csrc) at install time; everything else is in pyproject.toml.

Each instruction set's translation unit gets its own flags, so one build runs
the best code of any x86-64 CPU (AVX-512, AVX2 or neither, chosen at run time).
It needs a C++20 compiler and the Python headers, not torch. Without a
compiler the package still installs and steps with torch's paths (rmsprop.backends.cpu.kernel).
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_spec = importlib.util.spec_from_file_location("kernel_build", Path(__file__).parent / "src/rmsprop/backends/cpu/build.py")
kernel_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_build)

SOURCES = Path("src/rmsprop/backends/cpu/csrc")


class BuildKernel(build_ext):
    """Compiles each translation unit with its instruction set's flags."""

    def build_extension(self, extension: Extension) -> None:
        def compile_unit(name: str, flags: list[str]) -> list[str]:
            return self.compiler.compile(
                [str(SOURCES / name)],
                output_dir=self.build_temp,
                include_dirs=[str(SOURCES)],
                extra_postargs=kernel_build.COMMON_FLAGS + flags,
            )

        objects = kernel_build.compile_units(compile_unit)
        extension.sources = []
        extension.extra_objects = objects
        extension.extra_link_args = ["-lstdc++", "-lpthread", "-ldl"]
        super().build_extension(extension)


setup(
    # optional: where it fails to build (no compiler), setuptools warns and installs the rest.
    ext_modules=[Extension("rmsprop.backends.cpu._cpu_kernel", sources=[str(SOURCES / kernel_build.MODULE_SOURCE)], optional=True)],
    cmdclass={"build_ext": BuildKernel},
)
