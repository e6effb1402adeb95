"""The Triton kernel of the fused CUDA path (rmsprop.backends.triton_kernel).

Without a GPU, the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``
while its module is imported), which executes the same kernel source with
NumPy on CPU tensors. The ``triton_on_cpu`` fixture hands the fused path's CPU
tensors to the Triton launcher instead of the CPU kernel, so ``RMSprop(fused=True)``
steps through the Triton kernel, and the checks of tests/test_fused.py apply
with its tolerances: against torch's for-loop path (float32 every flag
combination; bfloat16/float16 against the float32 for-loop rounded each step;
complex) and the NumPy reference (float64, every flag combination). The
interpreter takes about 0.1 ms per operation per block, so the blocks are
small (64 elements, one per program; 32, two per program where the loop over
a program's blocks is under test): a tensor of 70 elements spans several
programs.

The low-precision kernel (``step_encoded``: bf16 and 8-bit state, float32
state of 16-bit parameters) is checked against the per-tensor reference path
step by step, with the helper and tolerances of tests/test_fused.py, on a
tensor of two 8-bit blocks and a partial third, two blocks per program.

With a GPU (never in CI), the kernel is compiled for it instead and the CUDA
tests check the dispatch of ``RMSprop`` on CUDA tensors against the for-loop
path on the same tensors; the interpreter tests are skipped there. The
interpreter cannot show GPU-only rounding (fused multiply-adds), which the
float32 tolerance covers.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("triton")

import rmsprop.backends.fused  # noqa: E402
import rmsprop.backends.cpu.kernel  # noqa: E402
import rmsprop.core.optimizer  # noqa: E402
from rmsprop import RMSprop  # noqa: E402
from rmsprop.backends.fused import encoded_unsupported_reason  # noqa: E402
from rmsprop.core.hyperparameters import Hyperparameters  # noqa: E402
from rmsprop.formats.codecs import dequantize_blockwise  # noqa: E402
from rmsprop.formats.maps import SIGNED_MAP, UNSIGNED_MAP  # noqa: E402
from fused_checks import (  # noqa: E402
    FLAG_COMBINATIONS,
    LRS,
    check_float64_against_reference,
    check_low_precision,
    check_same_step,
    combination_id,
    fused_and_loop,
    make_gradients,
    make_params,
    settings_of,
    state_tensors,
    step_by_step,
)

CUDA = torch.cuda.is_available()


def _import_kernels(interpret: bool):
    """``rmsprop.backends.triton_kernel``; with ``interpret``, its kernel is defined for the interpreter."""
    if not interpret:
        from rmsprop.backends import triton_kernel as _triton_kernels

        return _triton_kernels
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit runs, at import
    try:
        from rmsprop.backends import triton_kernel as _triton_kernels

        return _triton_kernels
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


kernels = _import_kernels(interpret=not CUDA)

# A tensor over several programs and one of no elements; the second skips step 2 (see test_fused).
SHAPES = [(3, 5), (70,), (0,)]
# A few flag combinations where the dtype, not the rule, is under test.
SOME_COMBINATIONS = [
    FLAG_COMBINATIONS[0],
    FLAG_COMBINATIONS[-1],
    {**FLAG_COMBINATIONS[0], "centered": True, "bias_correction": True, "weight_decay": 0.2},
    {**FLAG_COMBINATIONS[0], "eps_in_sqrt": True, "momentum": 0.8, "nesterov": True},
]

interpreter_only = pytest.mark.skipif(CUDA, reason="the kernel is compiled for the GPU here; see the CUDA tests")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """The fused path's CPU tensors go to the Triton kernel (in the interpreter), not to the CPU kernel.

    Yields the chunking of the launches, which a test may change.
    """
    calls = []
    chunking = {"block": 64, "blocks_per_chunk": 1}

    def triton_step(lists, hp):
        calls.append(1)
        kernels.rmsprop_step(*lists, hp, float(hp.lr), **chunking)

    monkeypatch.setitem(rmsprop.backends.fused._BACKENDS, "cpu", triton_step)
    # Steps after the first would otherwise go to the CPU kernel, which gathers the tensors itself.
    monkeypatch.setattr(rmsprop.backends.cpu.kernel, "kernel", lambda: None)
    yield chunking
    assert calls, "the Triton kernel was not called"


@pytest.fixture
def two_blocks_per_program(triton_on_cpu):
    triton_on_cpu.update(block=32, blocks_per_chunk=2)


@interpreter_only
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=combination_id)
def test_float32_equals_for_loop_for_every_flag_combination(triton_on_cpu, flags):
    fused, loop = fused_and_loop(flags, torch.float32, torch.float32, shapes=SHAPES)
    assert len(fused) == len(loop)
    for actual, expected in zip(fused, loop, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@interpreter_only
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=combination_id)
def test_float64_equals_numpy_reference_for_every_flag_combination(triton_on_cpu, flags):
    check_float64_against_reference(flags, [(3, 5), (7,)])


@interpreter_only
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 2**-6), (torch.float16, 2**-9)], ids=str)
@pytest.mark.parametrize("flags", SOME_COMBINATIONS, ids=combination_id)
def test_low_precision_equals_float32_for_loop_rounded_each_step(two_blocks_per_program, flags, dtype, rtol):
    shapes = [*SHAPES, ()]
    check_low_precision(fused_and_loop(flags, dtype, torch.float32, round_each_step=True, shapes=shapes), dtype, rtol)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("flags", SOME_COMBINATIONS, ids=combination_id)
def test_complex_equals_for_loop(two_blocks_per_program, flags, dtype):
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (40,)]  # 80 reals: two programs
    start = [torch.randn(shape, dtype=dtype, generator=generator) for shape in shapes]
    gradients = [[torch.randn(shape, dtype=dtype, generator=generator) for shape in shapes] for _ in range(3)]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = RMSprop(params, fused=fused, foreach=None if fused else False, **settings_of(flags))
        for step_gradients in gradients:
            for p, g in zip(params, step_gradients, strict=True):
                p.grad = g
            optimizer.step()
        results.append(state_tensors(optimizer, params))
    for actual, expected in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@interpreter_only
def test_bfloat16_is_rounded_to_nearest_even_like_torch(triton_on_cpu):
    """Exact, as for the CPU kernel: one float32 result per element, rounded once (ties to even; NaN)."""
    generator = torch.Generator().manual_seed(0)
    grad = (torch.randn(256, generator=generator) * torch.logspace(-6, 3, 256)).to(torch.bfloat16)
    square_avg = torch.rand(256, generator=generator).to(torch.bfloat16)
    grad[0] = float("nan")
    param = torch.nn.Parameter(torch.randn(256, generator=generator).to(torch.bfloat16), requires_grad=False)
    param.grad = grad
    optimizer = RMSprop([param], lr=0.0, alpha=0.5, fused=True)
    optimizer.state[param].update(step=torch.zeros(()), square_avg=square_avg.clone())
    optimizer.step()

    g = grad.float()
    expected = (torch.tensor(0.5) * square_avg.float() + torch.tensor(0.5) * (g * g)).to(torch.bfloat16)
    actual = optimizer.state[param]["square_avg"]
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual[~actual.isnan()], expected[~expected.isnan()])


@interpreter_only
def test_one_launch_per_dtype_over_tensors_of_several_dtypes(triton_on_cpu, monkeypatch):
    dtypes = [torch.float32, torch.float64, torch.float32, torch.complex64, torch.float64]
    launches = []
    launch = kernels._rmsprop_kernel
    monkeypatch.setattr(kernels, "_rmsprop_kernel", _Recorder(launch, launches))
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=generator, dtype=torch.float64).to(dtype) for dtype in dtypes]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = RMSprop(params, fused=fused, foreach=None if fused else False, momentum=0.8, centered=True)
        for step in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.5 + step)
            optimizer.step()
        results.append(state_tensors(optimizer, params))
    assert len(launches) == 3 * 3  # float32, float64 and complex64, at each of 3 steps
    for actual, expected in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


class _Recorder:
    """Counts the launches of a Triton kernel (``kernel[grid](...)``)."""

    def __init__(self, kernel, launches: list) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


# Low-precision state: the kernel against the per-tensor path.

# Two 8-bit blocks and a partial third (two programs of two blocks), and a tensor below
# min_8bit_size: fp32 state, which the kernel steps beside a bfloat16 parameter (format "float32").
ENCODED_SHAPES = [(3, 200), (70,)]
# Every flag, in five combinations: none; all; centered with bias correction (the variance's
# weights differ before and after the step) and coupled weight decay; the momentum variants.
ENCODED_COMBINATIONS = [
    *SOME_COMBINATIONS,
    {**FLAG_COMBINATIONS[0], "centered": True, "momentum": 0.8, "lr_in_momentum": True, "maximize": True},
]


@pytest.fixture
def encoded_on_triton(monkeypatch):
    """The fused path's low-precision CPU steps go to the Triton kernel (in the interpreter).

    Yields the formats of its calls.
    """
    formats = []

    def triton_step_encoded(params, states, fmt, param_indices, hp):
        formats.append(fmt)
        kernels.step_encoded(params, states, fmt, param_indices, hp, blocks_per_program=2)

    monkeypatch.setitem(rmsprop.backends.fused._ENCODED_BACKENDS, "cpu", triton_step_encoded)
    # Groups the CPU kernel would gather itself take the Python planning, which calls the backend above.
    monkeypatch.setattr(rmsprop.backends.cpu.kernel, "gather_group", lambda *args: "stepped by the Triton kernel here")
    yield formats
    assert formats, "the Triton kernel was not called"


def _encoded(flags: dict, mode: str) -> dict:
    return {**settings_of(flags), "state_precision": mode, "min_8bit_size": 256}


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["bf16", "8bit"])
@pytest.mark.parametrize("flags", ENCODED_COMBINATIONS, ids=combination_id)
def test_encoded_state_equals_the_per_tensor_path_step_by_step(encoded_on_triton, monkeypatch, flags, mode, dtype):
    step_by_step(monkeypatch, _encoded(flags, mode), dtype, steps=4, shapes=ENCODED_SHAPES)
    expected = {mode, "float32"} if dtype == torch.bfloat16 and mode == "8bit" else {mode}
    assert set(encoded_on_triton) == expected


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["bf16", "8bit"])
def test_encoded_state_of_other_parameter_dtypes_equals_the_per_tensor_path(encoded_on_triton, monkeypatch, mode, dtype):
    step_by_step(monkeypatch, _encoded(FLAG_COMBINATIONS[-1], mode), dtype, steps=3, shapes=ENCODED_SHAPES[:1])


@interpreter_only
def test_8bit_block_of_a_nan_is_non_finite_as_in_the_per_tensor_path(encoded_on_triton):
    """The policy of docs/memory.md: a NaN makes its block non-finite (here the second of three
    blocks, a program's last row), its absmax NaN; the other blocks stay finite."""
    param = torch.nn.Parameter(torch.ones(600))
    optimizer = RMSprop([param], momentum=0.9, centered=True, state_precision="8bit", min_8bit_size=0)
    param.grad = torch.ones(600)
    optimizer.step()  # creates the state, per tensor
    param.grad = torch.linspace(0.1, 1.0, 600)
    param.grad[300] = float("nan")
    optimizer.step()
    state = optimizer.state[param]
    for key, qmap in (("grad_variance", UNSIGNED_MAP), ("grad_avg", SIGNED_MAP), ("momentum_buffer", SIGNED_MAP)):
        absmax = state[f"{key}_absmax"]
        assert absmax[1].isnan() and absmax[[0, 2]].isfinite().all(), key
        decoded = dequantize_blockwise(state[key], absmax, qmap)
        assert decoded[256:512].isnan().all() and decoded[:256].isfinite().all() and decoded[512:].isfinite().all(), key


def test_encoded_state_on_another_device_than_the_parameter_is_refused():
    param = torch.nn.Parameter(torch.ones(300))
    param.grad = torch.ones(300)
    state = {"step": torch.zeros(()), "square_avg": torch.ones(300, dtype=torch.bfloat16, device="meta")}
    assert encoded_unsupported_reason(param, state, "bf16") == (
        "its 'square_avg' is not a plain tensor on the parameter's device (cpu)"
    )
    state["square_avg"] = torch.ones(300, dtype=torch.bfloat16)
    assert encoded_unsupported_reason(param, state, "bf16") is None


# The real dispatch, on a GPU.


def _cuda_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (), (0,), (70_001,), (4096,)]
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64).to(dtype).cuda()) for s in shapes]


def _train_cuda(dtype: torch.dtype, settings: dict, **path) -> tuple[RMSprop, list[torch.nn.Parameter]]:
    params = _cuda_params(dtype)
    optimizer = RMSprop(params, alpha=0.9, eps=0.1, **settings, **path)
    generator = torch.Generator().manual_seed(1)
    for lr in (0.05, 0.02, 0.08):
        optimizer.param_groups[0]["lr"] = lr
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype).cuda()
        optimizer.step()
    return optimizer, params


def _triton_launches(monkeypatch) -> list:
    calls = []
    cuda = rmsprop.backends.fused._BACKENDS["cuda"]
    monkeypatch.setitem(rmsprop.backends.fused._BACKENDS, "cuda", lambda *args: (calls.append(1), cuda(*args)))
    return calls


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64], ids=str)
@pytest.mark.parametrize("flags", SOME_COMBINATIONS, ids=combination_id)
def test_cuda_fused_none_takes_the_triton_kernel_and_equals_for_loop(monkeypatch, flags, dtype):
    calls = _triton_launches(monkeypatch)
    fused, fused_params = _train_cuda(dtype, flags)
    assert calls
    loop, loop_params = _train_cuda(dtype, flags, fused=False, foreach=False)
    for actual, expected in zip(state_tensors(fused, fused_params), state_tensors(loop, loop_params), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@cuda_only
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 2**-6), (torch.float16, 2**-9)], ids=str)
def test_cuda_low_precision_is_close_to_float32(dtype, rtol):
    flags = FLAG_COMBINATIONS[-1]
    fused, fused_params = _train_cuda(dtype, flags, fused=True)
    loop, loop_params = _train_cuda(torch.float32, flags, fused=False, foreach=False)
    for actual, expected in zip(state_tensors(fused, fused_params), state_tensors(loop, loop_params), strict=True):
        # Three steps of rounding to the storage type, against none.
        torch.testing.assert_close(actual.float(), expected.float(), rtol=4 * rtol, atol=4 * rtol)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["bf16", "8bit"])
@pytest.mark.parametrize("flags", [FLAG_COMBINATIONS[0], FLAG_COMBINATIONS[-1]], ids=combination_id)
def test_cuda_encoded_state_takes_the_triton_kernel_and_equals_the_per_tensor_path(monkeypatch, flags, mode, dtype):
    """As the interpreter test: a per-tensor twin loads the state before each step, both must agree after it."""
    calls = []
    cuda = rmsprop.backends.fused._ENCODED_BACKENDS["cuda"]
    monkeypatch.setitem(rmsprop.backends.fused._ENCODED_BACKENDS, "cuda", lambda *args: (calls.append(1), cuda(*args)))
    settings = {**_encoded(flags, mode), "min_8bit_size": 4096}
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(dtype, [(70, 73), (80,)])]
    optimizer = RMSprop(params, **settings)
    for step, step_gradients in enumerate(make_gradients(params, 4)):
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        twin = RMSprop(twins, fused=False, **settings)
        twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        twin.param_groups[0]["fused"] = False  # load_state_dict takes the saved group's settings
        for optimizer_, params_ in ((optimizer, params), (twin, twins)):
            optimizer_.param_groups[0]["lr"] = LRS[step]
            for p, g in zip(params_, step_gradients, strict=True):
                p.grad = None if g is None else g.to(dtype).cuda()
        optimizer.step()
        twin.step()
        check_same_step(optimizer, params, twin, twins)
    # The first step creates the state, per tensor; a bfloat16 parameter's float32 state (the
    # tensor below min_8bit_size) is a call of its own, except at the step it has no gradient.
    assert len(calls) == (5 if dtype == torch.bfloat16 and mode == "8bit" else 3)


@cuda_only
def test_cuda_step_counters_stay_on_the_cpu():
    optimizer, params = _train_cuda(torch.float32, {}, fused=True)
    assert all(optimizer.state[p]["step"].device.type == "cpu" and optimizer.state[p]["step"] == 3 for p in params)


@cuda_only
def test_cuda_capturable_falls_back_to_foreach(monkeypatch):
    calls = _triton_launches(monkeypatch)
    _train_cuda(torch.float32, {"capturable": True})
    assert not calls
    with pytest.raises(ValueError, match="Invalid fused: True .*capturable=True"):
        RMSprop(_cuda_params(torch.float32), fused=True, capturable=True)


@cuda_only
def test_cuda_fused_true_without_triton_names_the_argument(monkeypatch):
    monkeypatch.setattr(rmsprop.backends.fused, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="Invalid fused: True .*triton is not installed"):
        RMSprop(_cuda_params(torch.float32), fused=True)
    calls = _triton_launches(monkeypatch)
    _train_cuda(torch.float32, {})  # fused=None: torch's foreach path
    assert not calls


def test_triton_kernel_module_is_imported_only_for_a_cuda_step():
    """Importing rmsprop, or a CPU step, does not import the kernel module.

    (torch imports triton itself, when installed, as it loads torch._dynamo.)
    """
    script = (
        "import sys, torch\n"
        "from rmsprop import RMSprop\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "RMSprop([p]).step()\n"
        "print('rmsprop.backends.triton_kernel' in sys.modules)\n"
    )
    import subprocess
    import sys

    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


# Each kernel with every flag off and on, for a Hopper GPU; (kernel, parameter storage, compute type, state).
_COMPILED = [
    ("_rmsprop_kernel", "float32", "float32", None),
    ("_rmsprop_encoded_kernel", "float32", "float32", "BLOCKWISE_STATE"),
    ("_rmsprop_encoded_kernel", "uint16", "float32", "BF16_STATE"),
    ("_rmsprop_encoded_kernel", "uint16", "float32", "FLOAT32_STATE"),
    ("_rmsprop_encoded_kernel", "float64", "float64", "BLOCKWISE_STATE"),
]


def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs the kernels' Python; this compiles them (to sm_90 machine code, with the
    ptxas that triton ships), which only a GPU would otherwise do: it catches what the interpreter
    accepts and the compiler does not (types, scopes, constants)."""
    script = f"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rmsprop.backends import triton_kernel as kernels
FLAGS = ("MAXIMIZE", "DECOUPLED_WEIGHT_DECAY", "CENTERED", "BIAS_CORRECTION", "EPS_IN_SQRT", "MOMENTUM_BUFFER",
         "NESTEROV", "LR_IN_MOMENTUM")  # all but coupled weight decay, which decoupled excludes
POINTERS = {{"table": "*i64", "numbers": "*fp64", "chunks_at": "i64", "signed_map": "*fp32", "unsigned_map": "*fp32"}}
for name, storage, compute, state in {_COMPILED!r}:
    kernel = getattr(kernels, name)
    for on in (False, True):
        constants = {{"STORAGE": getattr(tl, storage), "COMPUTE": getattr(tl, compute), "BLOCK_SIZE": 64, "BLOCKS": 2,
                     "STATE": getattr(kernels, state or "FLOAT32_STATE"), "ROWS": 2}}
        constants["VARIANT"] = sum(getattr(kernels, flag).value for flag in FLAGS) if on else 0
        signature = {{arg: POINTERS.get(arg, "constexpr") for arg in kernel.arg_names}}
        where = {{(i,): constants[arg] for i, arg in enumerate(kernel.arg_names) if arg in constants}}
        compiled = triton.compile(ASTSource(kernel, signature, where), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], (name, storage, state, on)
print("compiled")
"""
    import subprocess
    import sys

    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0 and result.stdout.strip() == "compiled", result.stderr[-3000:]


def test_rmsprop_step_increments_steps_even_without_elements():
    """Empty tensors make no programs (and no launch) but count their step, as torch does."""
    params, grads, square_avgs = [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)]
    steps = [torch.zeros(())]
    hp = Hyperparameters.from_group(RMSprop([torch.nn.Parameter(torch.ones(1))]).defaults)
    kernels.rmsprop_step(params, grads, square_avgs, [], [], steps, hp, 0.01)
    assert steps[0].item() == 1
