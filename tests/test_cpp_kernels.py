"""The C++ kernel of the fused CPU path (rmsprop._cpp_kernels, csrc/fused_step.cpp).

Its results are checked against the for-loop path in tests/test_fused.py
(it is the fused CPU path there); here against the numba kernel, which
computes the same operations in the same order in another compiler, so the
two must agree bit for bit, and its gathering: what it declines, and that it
declines before changing anything.
"""

from __future__ import annotations

import itertools
import os
import platform
import re
import shutil
import subprocess
import warnings

import pytest
import torch

import rmsprop.fused
from rmsprop import RMSprop
from rmsprop._cpp_kernels import compiler_missing
from rmsprop._numba_kernels import _has_fused_multiply_add
from rmsprop.functional import Hyperparameters
from fused_checks import square_rooting

pytestmark = pytest.mark.skipif(compiler_missing() is not None, reason="no C++ compiler")

# Over two chunks of the kernel (1 << 16 elements), ending in a part of a vector
# (16-bit tensors are converted 8 at a time), plus a small and an empty tensor.
SHAPES = [(70_003,), (3, 5), (0,)]
# At the start of the large tensor's params, gradients and square averages.
SPECIAL_VALUES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-40, 3e38, 65504.0, 1 + 2**-8, 1 + 2**-11]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64, torch.complex128]
SETTINGS = [
    dict(zip(("centered", "momentum", "nesterov", "lr_in_momentum", "weight_decay", "decoupled_weight_decay"), values))
    for values in itertools.product([False, True], [0.0, 0.9], [False, True], [False, True], [0.0, 0.1], [False, True])
    if values[1] or not (values[2] or values[3])
]


def _hyperparameters(**settings) -> Hyperparameters:
    group = dict(
        lr=0.01,
        alpha=0.9,
        eps=1e-8,
        weight_decay=0.0,
        momentum=0.0,
        centered=False,
        maximize=False,
        eps_in_sqrt=False,
        bias_correction=False,
        nesterov=False,
        decoupled_weight_decay=False,
        lr_in_momentum=False,
        initial_scale=0.0,
    )
    group.update(settings)
    return Hyperparameters.from_group(group)


def _tensors(dtype: torch.dtype, seed: int = 0) -> list[list[torch.Tensor]]:
    """params, grads, square_avgs, grad_avgs, momentum_buffers, steps."""
    generator = torch.Generator().manual_seed(seed)

    def draw(shape, low=-1.0, high=1.0):
        values = torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low
        return values.to(dtype)

    def with_specials(tensors):
        tensors[0][: len(SPECIAL_VALUES)] = torch.tensor(SPECIAL_VALUES, dtype=torch.float64).to(dtype)
        return tensors

    return [
        with_specials([draw(shape) for shape in SHAPES]),
        with_specials([draw(shape) for shape in SHAPES]),
        with_specials([draw(shape, 0.0, 1.0).real.to(dtype) for shape in SHAPES]),
        [draw(shape, -0.1, 0.1) for shape in SHAPES],
        [draw(shape) for shape in SHAPES],
        [torch.tensor(3.0) for _ in SHAPES],
    ]


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("eps_in_sqrt", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_kernel_equals_the_numba_kernel_bit_for_bit(dtype, bias_correction, eps_in_sqrt, maximize):
    kernel = rmsprop.fused.cpu_kernel()
    for settings in SETTINGS:
        hp = _hyperparameters(
            **settings, bias_correction=bias_correction, eps_in_sqrt=eps_in_sqrt, maximize=maximize
        )
        ours, numba = _tensors(dtype), _tensors(dtype)
        for tensors in (ours, numba):
            if not hp.centered:
                tensors[3] = []
            if hp.momentum == 0:
                tensors[4] = []
        for _ in range(2):
            plan = kernel.gather_tensors(*ours)
            kernel.run(plan, rmsprop.fused.cpu_hyperparameters(kernel, hp))
            rmsprop.fused._run_numba(tuple(numba), hp)
        for expected, actual in zip(itertools.chain(*numba), itertools.chain(*ours), strict=True):
            # Bits, NaNs' signs and payloads included (float16 params overflow where the
            # centered variance clamps to 0: inf, then NaN, in both).
            assert torch.equal(_bits(actual), _bits(expected)), settings


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    real = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    return real.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[real.element_size()])


def _stepped_twice(**settings) -> tuple[list[torch.nn.Parameter], RMSprop]:
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 10)), torch.nn.Parameter(torch.ones(2, 3))]
    optimizer = RMSprop(params, lr=0.01, **settings)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    return params, optimizer


def _gather(optimizer: RMSprop):
    group = optimizer.param_groups[0]
    return rmsprop.fused.cpu_kernel().gather_group(
        group["params"], optimizer.state, group["centered"], group["momentum"] > 0
    )


def test_gather_group_takes_a_group_with_state():
    _, optimizer = _stepped_twice(momentum=0.5, centered=True)
    assert _gather(optimizer).size == 2


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda params, opt: opt.state.pop(params[1]), "parameter 1: has no state yet"),
        (lambda params, opt: setattr(params[0], "grad", params[0].grad.to_sparse()), "parameter 0: its gradient is not a dense"),
        (lambda params, opt: setattr(params[1], "grad", torch.ones(3, 2).t()), "parameter 1: its gradient is not contiguous"),
        (lambda params, opt: _to_float64(params[0]), "parameter 0: its 'square_avg' has another dtype"),
        (lambda params, opt: opt.state[params[0]].update(square_avg=torch.ones(9)), "parameter 0: its 'square_avg' has another shape"),
        (lambda params, opt: setattr(params[1], "grad", torch.ones(2, 3)._neg_view()), "parameter 1: its gradient has its conjugate or negative bit"),
        (lambda params, opt: opt.state[params[0]].pop("grad_avg"), "parameter 0: its 'grad_avg' is not a plain tensor"),
        (lambda params, opt: opt.state[params[1]].update(step=3), "parameter 1: its 'step' is not a 1-element"),
        (lambda params, opt: opt.state[params[1]].update(step=torch.tensor(3)), "parameter 1: its 'step' is not a 1-element"),
        (lambda params, opt: opt.state.update({params[0]: [1]}), "parameter 0: its state is not a dict"),
    ],
)
def test_gather_group_declines_what_it_cannot_step_and_says_why(change, reason):
    params, optimizer = _stepped_twice(centered=True)
    change(params, optimizer)
    declined = _gather(optimizer)
    assert isinstance(declined, str) and declined.startswith(reason)


def _to_float64(param: torch.nn.Parameter) -> None:
    param.data = param.data.double()
    param.grad = torch.ones_like(param)


def test_gather_group_declines_a_tensor_subclass():
    class Tagged(torch.Tensor):
        pass

    params, optimizer = _stepped_twice()
    group = optimizer.param_groups[0]
    group["params"][0] = params[0].as_subclass(Tagged)
    assert _gather(optimizer) == "parameter 0: not a plain tensor"


def test_gather_group_skips_params_without_gradients_and_does_not_add_state():
    params, optimizer = _stepped_twice()
    extra = torch.nn.Parameter(torch.ones(4))
    optimizer.param_groups[0]["params"].append(extra)
    params[1].grad = None
    assert _gather(optimizer).size == 1
    assert extra not in optimizer.state


def test_gather_tensors_refuses_lists_of_different_lengths():
    params, grads, square_avgs, _, _, steps = _tensors(torch.float32)
    declined = rmsprop.fused.cpu_kernel().gather_tensors(params, grads, square_avgs[:1], [], [], steps)
    assert declined == "the lists of tensors differ in length"


def test_a_gathered_step_bumps_the_version_of_the_parameters():
    params, optimizer = _stepped_twice()
    versions = [p._version for p in params]
    optimizer.step()
    assert all(p._version > version for p, version in zip(params, versions, strict=True))


def test_the_kernel_is_built_for_this_cpu_and_loaded_once():
    from rmsprop import _cpp_kernels

    assert _cpp_kernels.module() is _cpp_kernels.module()
    assert _cpp_kernels.module().__name__ == f"rmsprop_fused_step_{_cpp_kernels._build_digest()}"


def test_a_lock_left_by_a_killed_build_is_removed_but_a_fresh_one_is_not(tmp_path):
    import time

    from rmsprop import _cpp_kernels

    assert not _cpp_kernels.remove_stale_lock(tmp_path)
    lock = tmp_path / "lock"
    lock.touch()
    assert not _cpp_kernels.remove_stale_lock(tmp_path) and lock.exists()
    old = time.time() - _cpp_kernels.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="left 11 minutes ago by a build that did not finish"):
        assert _cpp_kernels.remove_stale_lock(tmp_path)
    assert not lock.exists()


def test_a_build_says_it_is_building_and_a_load_does_not(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    from rmsprop import _cpp_kernels

    built = _cpp_kernels.module()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **arguments: built)
    _cpp_kernels.module.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building the fused CPU kernel for this machine and environment"):
            _cpp_kernels.module()
        directory = _cpp_kernels.build_directory()
        (directory / f"{directory.name}.so").touch()
        _cpp_kernels.module.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _cpp_kernels.module()
    finally:
        _cpp_kernels.module.cache_clear()


def test_a_build_that_ninja_finds_stale_warns_too(tmp_path, monkeypatch):
    """A library whose inputs changed since its build (a reinstalled torch header, say) is rebuilt: not silently."""
    from rmsprop import _cpp_kernels

    built = _cpp_kernels.build_directory()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    copy = _cpp_kernels.build_directory()
    shutil.copytree(built, copy)
    assert _cpp_kernels.is_built()
    os.utime(copy / "fused_step.o", (0, 0))  # older than its source and headers
    assert not _cpp_kernels.is_built()


def test_the_cache_entry_builds_from_its_own_copy_of_the_source():
    """Reinstalling the package gives the source a new mtime; the entry's copy keeps its own."""
    from rmsprop import _cpp_kernels

    _cpp_kernels.module()
    directory = _cpp_kernels.build_directory()
    ninja_file = (directory / "build.ninja").read_text()
    assert f"compile {directory / 'fused_step.cpp'}" in ninja_file
    assert str(_cpp_kernels.SOURCE) not in ninja_file


def test_every_path_of_the_environment_in_the_build_files_names_the_cache_entry():
    """What torch writes into build.ninja, and ninja would rebuild for, must be in the entry's
    name: otherwise two environments sharing one cache rebuild each other's library in turn."""
    from rmsprop import _cpp_kernels

    _cpp_kernels.module()
    directory = _cpp_kernels.build_directory()
    inputs = _cpp_kernels.build_inputs()
    paths = set(re.findall(r"(?:-isystem |-L|-I)(/\S+)", (directory / "build.ninja").read_text()))
    assert paths, "no paths found in build.ninja: its format changed"
    assert not {path for path in paths if path not in inputs}, sorted(paths)
    assert re.search(r"^cxx = (\S+)$", (directory / "build.ninja").read_text(), re.M).group(1) in " ".join(inputs)


def test_another_environment_gets_a_cache_entry_of_its_own(monkeypatch):
    from torch.utils import cpp_extension

    from rmsprop import _cpp_kernels

    here = _cpp_kernels.build_directory()
    assert _cpp_kernels.build_directory() == here  # one environment, one entry
    other_torch = [path.replace("site-packages", "other-site-packages") for path in cpp_extension.include_paths()]
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *args, **kwargs: other_torch)
    assert _cpp_kernels.build_directory() != here
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "g++-12-elsewhere")
    assert _cpp_kernels.build_directory() != here


def _functions(listing: str) -> dict[str, str]:
    """objdump's disassembly split into {demangled name: instructions}."""
    functions, name = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            functions[name] = ""
        elif name is not None:
            functions[name] += line + "\n"
    return functions


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
    reason="reads x86 instructions with objdump",
)
def test_every_loop_of_the_rule_is_vectorised():
    """Structure, not timing: every function of the library that takes square roots (the rule's
    loops, wherever GCC inlined them) takes packed ones, besides the scalar ones of a loop's tail.
    The centered form once stayed scalar on AVX2-only CPUs (5-8x slower) while the AVX-512
    machine it was written on vectorised it: -march=native makes this a property of the machine."""
    library = rmsprop.fused.cpu_kernel().__file__
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", library], capture_output=True, text=True, check=True
    ).stdout
    functions = _functions(listing)
    rooting, scalar_only = square_rooting(functions, prefix="v")
    # 10 variants in float32 and float64 at least, however they are inlined.
    assert len(rooting) >= 20, sorted(rooting)
    assert not scalar_only, scalar_only
    # Fused multiply-adds in every loop where the numba kernel has them too (bit for bit), none elsewhere.
    fused = [name for name in rooting if re.search(r"\bvfn?m(add|sub)\d+[ps][sd]\b", functions[name])]
    assert fused == (rooting if _has_fused_multiply_add() else []), sorted(set(rooting) - set(fused))
