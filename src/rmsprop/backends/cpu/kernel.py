"""The fused CPU kernel (``backends/cpu/csrc``): loading it, its instruction set, and the calls of a step.

The kernel is a CPython extension (``rmsprop.backends.cpu._cpu_kernel``) built when the
package is installed (``setup.py``), or later by ``rmsprop build-kernel`` into
a cache directory. It holds the rule compiled for AVX-512, for AVX2 and for
any CPU, and runs the best one this CPU has; the environment variable
``RMSPROP_CPU_ISA`` (``avx512``, ``avx2`` or ``portable``) or
:func:`select_instruction_set` picks another.

A step's work is spread over ``torch.get_num_threads()`` threads: torch's own OpenMP team where
torch runs its operations on OpenMP (its CPU wheels do), so that a step right after backward
finds those threads awake instead of sharing the cores with them while they wait for more work;
the kernel's own threads elsewhere, in a forked child, or where the environment variable
``RMSPROP_CPU_THREADS`` is ``own``. :func:`threads` says which.

Where it is not built (no compiler at install), :func:`problem` says why,
the fused path declines CPU tensors, and the optimizer steps them with
torch's foreach or for-loop paths, after one warning.

Tensors reach the kernel as addresses (``Tensor.data_ptr()``) with their
element counts, checked beforehand by :mod:`rmsprop.backends.fused`; complex tensors
as pairs of reals.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
import warnings
import weakref
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from rmsprop.backends.cpu import build as kernel_build
from rmsprop.core.hyperparameters import Hyperparameters, KernelScalars
from rmsprop.formats.layout import ABSMAX_SUFFIX, STORED
from rmsprop.formats.maps import SIGNED_MAP, UNSIGNED_MAP

__all__ = [
    "INSTRUCTION_SET_VARIABLE",
    "available_instruction_sets",
    "gather_group",
    "run",
    "build",
    "build_directory",
    "describe",
    "instruction_set",
    "kernel",
    "problem",
    "select_instruction_set",
    "step",
    "step_encoded",
    "stream_step_traffic",
    "threads",
]

INSTRUCTION_SET_VARIABLE = "RMSPROP_CPU_ISA"
THREADS_VARIABLE = "RMSPROP_CPU_THREADS"

# Codes of the extension's Storage and Format enums (backends/cpu/csrc/kernel.h).
_STORAGES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_FORMATS = {"same": 0, "float32": 1, "bf16": 2, "8bit": 3}
_CENTERED, _MOMENTUM, _PLAIN, _COUPLED_WEIGHT_DECAY = 1, 2, 4, 8


def build_directory() -> Path:
    """Where ``rmsprop build-kernel`` puts a kernel for an installation built without one."""
    root = os.environ.get("RMSPROP_KERNEL_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rmsprop"
    return Path(root) / f"cpu-kernel-{kernel_build.source_digest()}"


def _installed_spec() -> importlib.machinery.ModuleSpec | None:
    """The extension built when the package was installed, if it was."""
    return importlib.util.find_spec("rmsprop.backends.cpu._cpu_kernel")


def _load_extension() -> tuple[ModuleType | None, str]:
    """The extension and where it came from, or ``None`` and why there is none."""
    spec = _installed_spec()
    origin = "installed with the package"
    if spec is None:
        path = build_directory() / f"_cpu_kernel{sysconfig.get_config_var('EXT_SUFFIX')}"
        if not path.exists():
            return None, (
                "the fused CPU kernel is not built (no C++ compiler when the package was installed; "
                "`rmsprop build-kernel` builds it)"
            )
        spec = importlib.util.spec_from_file_location(
            "rmsprop.backends.cpu._cpu_kernel", path, loader=importlib.machinery.ExtensionFileLoader("rmsprop.backends.cpu._cpu_kernel", str(path))
        )
        origin = f"built by `rmsprop build-kernel` in {path.parent}"
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as error:
        return None, f"the fused CPU kernel does not load: {error}"
    forced = os.environ.get(INSTRUCTION_SET_VARIABLE)
    if forced:
        try:
            module.select_instruction_set(forced)
        except ValueError as error:
            raise ValueError(f"{INSTRUCTION_SET_VARIABLE}={forced!r}: {error}") from None
    module.set_torch(
        Tensor, torch.nn.Parameter, torch.strided, torch.float32, torch.float64, torch.bfloat16, torch.float16,
        torch.complex64, torch.complex128, torch.uint8,
    )
    module.set_maps(SIGNED_MAP.numpy(), UNSIGNED_MAP.numpy())
    threads_wanted = os.environ.get(THREADS_VARIABLE, "torch")
    if threads_wanted not in ("torch", "own"):
        raise ValueError(f"{THREADS_VARIABLE}={threads_wanted!r}: expected 'torch' or 'own'")
    openmp = _torch_openmp_library()
    if threads_wanted == "torch" and openmp is not None:
        module.use_openmp(str(openmp))
    _use_tensor_handles(module)
    return module, origin


def _torch_library() -> Path | None:
    library = Path(torch.__file__).parent / "lib" / f"libtorch_cpu{'.dylib' if sys.platform == 'darwin' else '.so'}"
    return library if library.exists() else None


def _torch_openmp_library() -> Path | None:
    """torch's CPU library, where torch runs its operations on OpenMP: the kernel finds the
    OpenMP runtime among its dependencies."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    return _torch_library()


def _use_tensor_handles(module: ModuleType) -> bool:
    """Let the gathering read tensors through torch's stable C functions, once the kernel has seen
    that a sample tensor holds the C++ tensor of a handle torch made of it; else it keeps to the
    Python bindings (an older torch, another layout). With them it learns, from sample views, where
    a TensorImpl keeps its storage (to prefetch it) and which bits of its key set mark negated and
    conjugated views (read there instead of through the bindings, where they agree)."""
    library = _torch_library()
    aoti = getattr(torch._C, "_aoti", None)
    if library is None or not hasattr(aoti, "unsafe_alloc_void_ptr_from_tensor"):
        return module.use_tensor_handles(None)
    sample = torch.empty(1)
    base, complex_base = torch.zeros(3), torch.zeros(3, dtype=torch.complex64)
    negations = tuple((base.view(3), torch._neg_view(base)) for _ in range(4))
    conjugations = tuple((complex_base.view(3), complex_base.conj()) for _ in range(4))
    handle = aoti.unsafe_alloc_void_ptr_from_tensor(sample)
    try:
        return module.use_tensor_handles(str(library), sample, handle, sample.untyped_storage()._cdata, negations, conjugations)
    finally:
        aoti.alloc_tensor_by_stealing_from_void_ptr(handle)  # frees the handle


@cache
def _extension() -> tuple[ModuleType | None, str]:
    return _load_extension()


def kernel() -> ModuleType | None:
    """The loaded extension, or ``None`` where it is not built (see :func:`problem`)."""
    return _extension()[0]


def problem() -> str | None:
    """Why there is no fused CPU kernel here, or ``None``."""
    module, text = _extension()
    return None if module is not None else text


@cache
def warn_fallback() -> None:
    """Say once per process that CPU steps take torch's paths for want of the kernel."""
    warnings.warn(f"rmsprop: {problem()}; CPU steps use torch's foreach and for-loop paths", stacklevel=4)


def instruction_set() -> str:
    """The instruction set steps run with: ``"avx512"``, ``"avx2"`` or ``"portable"``."""
    return _required().selected_instruction_set()


def available_instruction_sets() -> list[str]:
    """The instruction sets built in that this CPU runs, best first."""
    return _required().available_instruction_sets()


def select_instruction_set(name: str) -> None:
    """Run later steps with instruction set ``name`` (one of :func:`available_instruction_sets`)."""
    _required().select_instruction_set(name)


def describe() -> str:
    """Where the kernel comes from and which instruction set it runs, in words."""
    module, text = _extension()
    if module is None:
        return text
    reading = "torch's Python bindings"
    if module.uses_tensor_handles():
        reading = "torch's stable C functions"
        if module.reads_key_sets():
            reading += " (negated and conjugated views told by their key sets)"
    return (
        f"fused CPU kernel {text}; instruction set {module.selected_instruction_set()} "
        f"(this CPU runs: {', '.join(module.available_instruction_sets())}); threads: {threads()}; "
        f"tensors read through {reading}"
    )


def threads() -> str:
    """Whose threads a step runs on: ``"torch's OpenMP team"`` or ``"the kernel's own"``."""
    return "torch's OpenMP team" if _required().uses_openmp() else "the kernel's own"


def build() -> Path:
    """Compile the kernel into :func:`build_directory` (for an installation built without a compiler);
    later calls of :func:`kernel` load it."""
    path = kernel_build.build(build_directory())
    _extension.cache_clear()
    return path


def _required() -> ModuleType:
    module = kernel()
    if module is None:
        raise RuntimeError(problem())
    return module


def _variant(hp: Hyperparameters) -> int:
    coupled = hp.weight_decay != 0 and not hp.decoupled_weight_decay
    plain = not hp.maximize and hp.weight_decay == 0 and not hp.bias_correction
    return (
        (_CENTERED if hp.centered else 0)
        | (_MOMENTUM if hp.momentum > 0 else 0)
        | (_PLAIN if plain else 0)
        | (_COUPLED_WEIGHT_DECAY if coupled else 0)
    )


def _addresses(tensors: list[Tensor] | None) -> np.ndarray | None:
    if tensors is None:
        return None
    return np.fromiter(map(Tensor.data_ptr, tensors), np.int64, len(tensors))


def _call(storage_dtype: torch.dtype, fmt: str, hp: Hyperparameters, sizes: np.ndarray, buffers: list, steps: list[Tensor],
          param_indices: list[int] | None, keys: tuple[int, int, int]) -> None:
    _required().step(
        _STORAGES[storage_dtype],
        _FORMATS[fmt],
        _variant(hp),
        KernelScalars.of(hp, float(hp.lr)),
        hp.alpha,
        hp.bias_correction,
        sizes,
        *map(_addresses, buffers),
        _addresses(steps),
        steps[0].dtype == torch.float64,
        None if param_indices is None else np.asarray(param_indices, np.int64),
        keys,
        torch.get_num_threads(),
        None,
    )


def step(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
) -> None:
    """One step of CPU tensors of one dtype and step dtype, the state of the parameters' dtype."""
    dtype = params[0].dtype
    sizes = np.fromiter(map(Tensor.numel, params), np.int64, len(params)) * (2 if dtype.is_complex else 1)
    buffers = [
        params,
        grads,
        square_avgs,
        None,
        grad_avgs if hp.centered else None,
        None,
        momentum_buffers if hp.momentum > 0 else None,
        None,
    ]
    _call(_REAL_OF_COMPLEX.get(dtype, dtype), "same", hp, sizes, buffers, state_steps, None, (0, 0, 0))
    # Writes through raw pointers are invisible to autograd's check that saved tensors are unchanged.
    torch.autograd.graph.increment_version(params)


def step_encoded(params: list[Tensor], states: list[dict], fmt: str, param_indices: list[int], hp: Hyperparameters) -> None:
    """One step of CPU parameters of one dtype whose state is stored as ``fmt``: ``"bf16"``,
    ``"8bit"`` or ``"float32"`` (the "wide" state of 16-bit parameters); ``param_indices`` seed the noise."""
    variance = hp.centered and fmt in ("bf16", "8bit")
    square = "grad_variance" if variance else "square_avg"

    def entries(key: str, used: bool = True) -> list[Tensor] | None:
        return [state[key] for state in states] if used else None

    blockwise = fmt == "8bit"
    buffers = [
        params,
        [p.grad for p in params],
        entries(square),
        entries(square + "_absmax", blockwise),
        entries("grad_avg", hp.centered),
        entries("grad_avg_absmax", blockwise and hp.centered),
        entries("momentum_buffer", hp.momentum > 0),
        entries("momentum_buffer_absmax", blockwise and hp.momentum > 0),
    ]
    sizes = np.fromiter(map(Tensor.numel, params), np.int64, len(params))
    keys = (STORED.index(square), STORED.index("grad_avg"), STORED.index("momentum_buffer"))
    _call(params[0].dtype, fmt, hp, sizes, buffers, entries("step"), param_indices, keys)
    torch.autograd.graph.increment_version(params)


# The state keys gather_group reads, made once: the buffers, step, then each buffer's 8-bit absmax.
_BUFFER_KEYS = ("square_avg", "grad_variance", "grad_avg", "momentum_buffer")
_GATHERED_KEYS = (*_BUFFER_KEYS, "step", *(key + ABSMAX_SUFFIX for key in _BUFFER_KEYS))
# The buffers' indices in rmsprop.formats.noise.rounding_seed, and gather_group's codes of state_precision.
_SEED_KEYS = tuple(STORED.index(key) for key in _BUFFER_KEYS)
_PRECISIONS = {"full": 0, "bf16": 1, "8bit": 2}


# The last plan of each group of each optimizer: the next gather checks again only what changed.
_last_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gather_group(optimizer: torch.optim.Optimizer, group_index: int, first_index: int = 0) -> object | str:
    """The checked tensors of a group's step (a ``Plan`` for :func:`run`), or why there is none.

    Reads each param's gradient and its state in ``optimizer.state`` and
    checks every tensor as :func:`rmsprop.backends.fused.unsupported_reason`
    (full precision) or :func:`rmsprop.backends.fused.encoded_unsupported_reason`
    (the formats of :func:`rmsprop.formats.layout.target_format`) does, in C;
    params without a gradient are skipped. A low-precision group's state must
    hold exactly the entries its format and settings use (what
    :func:`rmsprop.formats.layout.holds_group_layout` checks); ``first_index``,
    the position of the group's first param among all the optimizer's params,
    seeds its rounding noise. A param and its state tensors that are the
    objects the group's last plan checked, at the same addresses and for the
    same format, are not checked again (the plan holds them until the next
    gather); gradients, new objects at most steps, are checked at every one. A
    missing or unfit tensor anywhere, or a param without state, leaves the
    whole group to the Python planning.
    """
    group = optimizer.param_groups[group_index]
    plans = _last_plans.setdefault(optimizer, {})
    spec = (
        _PRECISIONS[group["state_precision"]],
        group["min_8bit_size"],
        group["centered"],
        group["momentum"] > 0,
        first_index,
        _SEED_KEYS,
    )
    plan = _required().gather_group(group["params"], optimizer.state, spec, _GATHERED_KEYS, plans.get(group_index))
    if isinstance(plan, str):
        plans.pop(group_index, None)
    else:
        plans[group_index] = plan
    return plan


def run(plan: object, hp: Hyperparameters) -> None:
    """Step a :func:`gather_group` plan (increment the steps, apply the rule)."""
    _required().run_plan(plan, _variant(hp), KernelScalars.of(hp, float(hp.lr)), hp.alpha, hp.bias_correction, torch.get_num_threads())
    # Writes through raw pointers are invisible to autograd's check that saved tensors are unchanged.
    torch.autograd.graph.increment_version(plan.params)


def stream_step_traffic(
    params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor], grad_avgs: list[Tensor], momentum_buffers: list[Tensor]
) -> None:
    """The memory traffic of a step and nothing else (the benchmark's bound), in one pass: reads
    ``grads``, reads and writes ``params`` and each buffer. Parameters and gradients are float32;
    each parameter's buffers are float32, or 2- or 1-byte elements (bfloat16 or 8-bit state), one per
    parameter element. Empty ``grad_avgs`` / ``momentum_buffers`` for a step without them."""
    sizes = np.fromiter(map(Tensor.numel, params), np.int64, len(params))
    state_bytes = np.fromiter(map(Tensor.element_size, square_avgs), np.int64, len(square_avgs))
    zeros = np.zeros(len(params), np.int64)
    _required().stream_step_traffic(
        sizes,
        state_bytes,
        _addresses(params),
        _addresses(grads),
        _addresses(square_avgs),
        _addresses(grad_avgs) if grad_avgs else zeros,
        _addresses(momentum_buffers) if momentum_buffers else zeros,
        torch.get_num_threads(),
    )
