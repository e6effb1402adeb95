"""The fused CPU kernel (rmsprop.backends.cpu.kernel, backends/cpu/csrc): instruction sets, machine code, gathering.

Its results are checked against the for-loop path and the per-tensor
low-precision path in tests/test_fused.py (with every instruction set this
CPU runs). Here: the instruction sets agree with each other, each compiled
variant is vectorised as it should be (read from the library's machine
code, whatever CPU runs the test), the choice of instruction set, and the
gathering of a group's tensors: what it declines, and what it checks again
after a change.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from rmsprop import RMSprop
from rmsprop.backends.cpu import kernel as cpu_kernel
from rmsprop.formats.maps import SIGNED_MAP, UNSIGNED_MAP
from fused_checks import LRS, make_gradients, make_params, run_steps, square_rooting, state_tensors

pytestmark = pytest.mark.skipif(cpu_kernel.kernel() is None, reason="the CPU kernel is not built")

X86 = platform.machine() in ("x86_64", "AMD64")
# Every instruction set is compiled into an x86-64 build, whichever CPU built it.
INSTRUCTION_SETS = ["avx512", "avx2", "portable"] if X86 else ["portable"]


def test_an_x86_build_holds_every_instruction_set_and_picks_the_best_this_cpu_runs():
    extension = cpu_kernel.kernel()
    assert extension.compiled_instruction_sets() == INSTRUCTION_SETS
    available = cpu_kernel.available_instruction_sets()
    assert available[-1] == "portable" and set(available) <= set(INSTRUCTION_SETS)
    assert os.environ.get(cpu_kernel.INSTRUCTION_SET_VARIABLE) or cpu_kernel.instruction_set() == available[0]


def _chosen_in_a_fresh_process(value: str) -> subprocess.CompletedProcess:
    code = "from rmsprop.backends.cpu import kernel as cpu_kernel; print(cpu_kernel.instruction_set())"
    environment = {**os.environ, cpu_kernel.INSTRUCTION_SET_VARIABLE: value}
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True)


def test_the_environment_variable_forces_an_instruction_set():
    result = _chosen_in_a_fresh_process("portable")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "portable"


def test_an_unknown_instruction_set_is_refused_with_the_variable_named():
    result = _chosen_in_a_fresh_process("sse9")
    assert result.returncode != 0
    assert "RMSPROP_CPU_ISA='sse9': unknown instruction set 'sse9' (avx512, avx2 or portable)" in result.stderr


TORCH_ON_OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _threads_in_a_fresh_process(value: str) -> subprocess.CompletedProcess:
    code = "from rmsprop.backends.cpu import kernel as cpu_kernel; print(cpu_kernel.threads())"
    environment = {**os.environ, cpu_kernel.THREADS_VARIABLE: value}
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True)


def test_steps_run_on_torchs_openmp_team_where_torch_runs_on_openmp():
    expected = "torch's OpenMP team" if TORCH_ON_OPENMP else "the kernel's own"
    assert os.environ.get(cpu_kernel.THREADS_VARIABLE) or cpu_kernel.threads() == expected
    assert f"threads: {cpu_kernel.threads()}" in cpu_kernel.describe()


def test_the_environment_variable_keeps_the_kernels_own_threads():
    result = _threads_in_a_fresh_process("own")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "the kernel's own"
    refused = _threads_in_a_fresh_process("many")
    assert refused.returncode != 0
    assert "RMSPROP_CPU_THREADS='many': expected 'torch' or 'own'" in refused.stderr


def _trained_on(threads_of: str | None) -> list[torch.Tensor]:
    """Params after steps on torch's OpenMP team (its library's path) or the kernel's own threads (None)."""
    extension = cpu_kernel.kernel()
    was_openmp = extension.uses_openmp()
    library = cpu_kernel._torch_openmp_library()
    try:
        extension.use_openmp(None if threads_of is None else str(library))
        params = make_params(torch.float32, [(300_001,), (70_000,), (5,)], seed=4)
        optimizer = RMSprop(params, momentum=0.9, centered=True)
        run_steps(optimizer, params, make_gradients(params, len(LRS)), torch.float32)
        return [p.detach() for p in params]
    finally:
        extension.use_openmp(str(library) if was_openmp else None)


@pytest.mark.skipif(not TORCH_ON_OPENMP, reason="torch does not run on OpenMP here")
def test_torchs_openmp_team_and_the_kernels_own_threads_give_the_same_bits():
    with torch.no_grad():
        for openmp, own in zip(_trained_on("openmp"), _trained_on(None), strict=True):
            assert torch.equal(openmp, own)


def test_select_instruction_set_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="unknown instruction set 'neon'"):
        cpu_kernel.select_instruction_set("neon")


def _run_with(instruction_set: str, dtype: torch.dtype, settings: dict) -> list[torch.Tensor]:
    chosen = cpu_kernel.instruction_set()
    cpu_kernel.select_instruction_set(instruction_set)
    try:
        # Over three of the kernel's chunks, ending inside a vector and inside an 8-bit block.
        params = make_params(dtype, [(140_001,), (300,), (5,)])
        optimizer = RMSprop(params, min_8bit_size=256, **settings)
        run_steps(optimizer, params, make_gradients(params, 4), dtype)
    finally:
        cpu_kernel.select_instruction_set(chosen)
    return [p.detach() for p in params] + state_tensors(optimizer, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64], ids=str)
@pytest.mark.parametrize("state_precision", ["full", "bf16", "8bit"])
@pytest.mark.parametrize(
    "settings",
    [{}, {"momentum": 0.9, "centered": True, "nesterov": True}, {"weight_decay": 0.1, "maximize": True, "bias_correction": True}],
    ids=["plain", "momentum-centered-nesterov", "weight-decay-maximize-bias-correction"],
)
def test_avx512_and_avx2_give_the_same_bits(dtype, state_precision, settings):
    """The same operations with fused multiply-adds at the same places: equal bit for bit."""
    available = cpu_kernel.available_instruction_sets()
    if not {"avx512", "avx2"} <= set(available):
        pytest.skip("this CPU does not run both AVX-512 and AVX2")
    settings = {**settings, "state_precision": state_precision}
    for wide, narrow in zip(_run_with("avx512", dtype, settings), _run_with("avx2", dtype, settings), strict=True):
        assert torch.equal(wide.view(torch.uint8), narrow.view(torch.uint8)) if wide.dim() else torch.equal(wide, narrow)


# --- 8-bit codes ------------------------------------------------------------------


def _dense_scaled_values(signed: bool) -> torch.Tensor:
    """float32 values in [0, 1] (and their negatives for the signed map): every 61st bit pattern,
    and all within 300 ulps of each map value, of each midpoint between two, and of each decade edge."""
    qmap = SIGNED_MAP if signed else UNSIGNED_MAP
    patterns = torch.arange(0, 0x3F800001, 61, dtype=torch.int32)
    edges = torch.tensor([10.0**-k for k in range(8)], dtype=torch.float32)
    anchors = torch.cat([qmap.abs(), (qmap[1:] + qmap[:-1]).abs() / 2, edges]).view(torch.int32)
    near = (anchors.unsqueeze(1) + torch.arange(-300, 301, dtype=torch.int32)).reshape(-1).clamp(0, 0x3F800000)
    values = torch.cat([patterns, near]).view(torch.float32)
    special = torch.tensor([0.0, -0.0, 1.0, float("nan")])
    return torch.cat([values, -values, special]) if signed else torch.cat([values, special])


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_computed_8bit_codes_equal_the_searched_ones(signed):
    """The kernel computes a value's place in the dynamic map instead of searching it: on
    millions of values, dense near every map value and decade edge, each instruction set's codes
    equal the reference's (quantize_blockwise's rule, the map searched by torch.searchsorted)."""
    qmap = SIGNED_MAP if signed else UNSIGNED_MAP
    x = _dense_scaled_values(signed)
    noise = torch.randint(0, 1 << 16, x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    uniforms = noise.float() * 2.0**-16
    lower = torch.searchsorted(qmap, x).clamp_(1, 255).sub_(1)
    low = qmap[lower]
    expected = (lower + (uniforms * (qmap[lower + 1] - low) < x - low)).to(torch.uint8)
    for instruction_set in cpu_kernel.available_instruction_sets():
        codes = torch.empty(x.shape, dtype=torch.uint8)
        cpu_kernel.kernel().encode_codes(signed, x.numpy(), noise.to(torch.uint16).numpy(), codes.numpy(), instruction_set)
        wrong = (codes != expected).nonzero().reshape(-1)
        assert not len(wrong), (instruction_set, x[wrong[:5]], codes[wrong[:5]], expected[wrong[:5]])


def test_maps_of_another_layout_are_refused():
    shifted = UNSIGNED_MAP.clone()
    shifted[100:102] = shifted[100:102].flip(0)
    with pytest.raises(ValueError, match="not the dynamic maps"):
        cpu_kernel.kernel().set_maps(SIGNED_MAP.numpy(), shifted.numpy())
    cpu_kernel.kernel().set_maps(SIGNED_MAP.numpy(), UNSIGNED_MAP.numpy())


# --- machine code -----------------------------------------------------------------


def _functions(listing: str) -> dict[str, str]:
    """objdump's disassembly split into {demangled name: instructions}, the linker's stubs left out."""
    functions, name = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = None if header.group(1).endswith("@plt") else header.group(1)
            if name is not None:
                functions[name] = ""
        elif name is not None:
            functions[name] += line + "\n"
    return functions


@pytest.fixture(scope="module")
def functions() -> dict[str, str]:
    if not X86 or shutil.which("objdump") is None:
        pytest.skip("reads x86 instructions with objdump")
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", cpu_kernel.kernel().__file__],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return _functions(listing)


@pytest.mark.parametrize("instruction_set", ["avx512", "avx2"] if X86 else [])
def test_every_loop_of_the_rule_is_vectorised_in_every_compiled_instruction_set(functions, instruction_set):
    """Structure, not timing, and of every variant in the library whatever CPU runs the test:
    every chunk function (every storage, format and variant) takes packed square roots in the
    instruction set's widest registers, besides the scalar ones of a loop's tail, and fused
    multiply-adds."""
    register = {"avx512": "zmm", "avx2": "ymm"}[instruction_set]
    chunks = _chunk_functions(functions, instruction_set)
    # 4 storages x (same, bf16, 8-bit) + 2 x float32 state, in 12 variants each; 8-bit's 6 variants
    # without centering twice, once storing the rule's own root.
    assert len(chunks) == 14 * 12 + 4 * 6, len(chunks)
    rooting, scalar_only = square_rooting(chunks)
    assert sorted(rooting) == sorted(chunks)
    assert not scalar_only, scalar_only
    narrow = [name for name, body in chunks.items() if not re.search(rf"\bvsqrtp[sd]\s+.*%{register}", body)]
    assert not narrow, narrow
    unfused = [name for name, body in chunks.items() if not re.search(r"\bvfn?m(add|sub)\d+[ps][sd]\b", body)]
    assert not unfused, unfused


def test_the_portable_rule_is_vectorised_for_float32_without_fused_multiply_adds(functions):
    """x86-64's baseline (SSE2): the float32 loops in packed form; no fused multiply-adds,
    which that baseline lacks (its results equal the others within float32 rounding)."""
    if not X86:
        pytest.skip("reads x86 instructions")
    chunks = _chunk_functions(functions, "portable")
    single = {name: body for name, body in chunks.items() if "<double" not in name}
    assert single
    rooting, scalar_only = square_rooting(single)
    assert sorted(rooting) == sorted(single) and not scalar_only, scalar_only
    assert not [name for name, body in chunks.items() if re.search(r"\bvfn?m(add|sub)", body)]


def _chunk_functions(functions: dict[str, str], instruction_set: str) -> dict[str, str]:
    return {
        name: body
        for name, body in functions.items()
        if f"rmsprop_kernel::{instruction_set}::" in name and "_state_chunk<" in name
    }


@pytest.mark.parametrize("instruction_set", ["avx512", "avx2"] if X86 else [])
def test_low_precision_state_is_converted_encoded_and_noised_in_vectors(functions, instruction_set):
    """bf16 state: the noise's hash in 32-bit vector multiplies; 8-bit state: the map lookups
    as gathers from the 1 KB map (the codes' neighbours as one 64-bit pair each) and the noise in
    vectors too."""
    register = {"avx512": "zmm", "avx2": "ymm"}[instruction_set]
    multiply = r"vpmulld"

    def of(kind: str) -> dict[str, str]:
        return {
            name: body
            for name, body in functions.items()
            if f"rmsprop_kernel::{instruction_set}::{kind}<" in name
        }

    bfloat16_state = of("bfloat16_state_chunk")
    assert bfloat16_state and all(re.search(rf"\b{multiply}\b.*%{register}", body) for body in bfloat16_state.values())
    blockwise = of("blockwise_state_chunk")
    lookup = r"\bvgatherdps\b"
    assert blockwise and all(re.search(lookup, body) for body in blockwise.values())
    # The codes, inlined into each or functions of their own.
    coders = {name: body for name, body in functions.items() if f"rmsprop_kernel::{instruction_set}::lookup_codes<" in name}
    assert all(re.search(r"\bvpgatherdq\b", body) for body in (coders or blockwise).values())
    # The encoding, inlined into each or a function of its own.
    encoders = {
        name: body
        for name, body in functions.items()
        if re.search(rf"rmsprop_kernel::{instruction_set}::(encode_block|rounding_noise)\b", name)
    }
    assert all(re.search(rf"\b{multiply}\b", body) for body in (encoders or blockwise).values())
    # float16 converted by integer and float operations (F16C's instructions would take blocks
    # on the stack): its chunk functions are vectorised like the others (test above).
    assert any("Half" in name for name in of("plain_state_chunk"))


def test_the_library_needs_no_torch():
    """Built from the Python headers alone: no torch library among what it links."""
    if shutil.which("readelf") is None:
        pytest.skip("reads the library's dependencies with readelf")
    dynamic = subprocess.run(
        ["readelf", "-d", cpu_kernel.kernel().__file__], capture_output=True, text=True, check=True
    ).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.*)\]", dynamic)
    assert needed and not [name for name in needed if "torch" in name or "c10" in name or "gomp" in name], needed


# --- gathering a group ------------------------------------------------------------


@pytest.fixture(params=["torch's stable C functions", "torch's Python bindings"])
def reading(request):
    """The gathering reads tensors through torch's stable C functions (where this torch has them)
    or through its Python bindings."""
    extension = cpu_kernel.kernel()
    handles = extension.uses_tensor_handles()
    if request.param.endswith("C functions"):
        if not handles:
            pytest.skip("this torch's tensors are read through its Python bindings")
    else:
        extension.use_tensor_handles(None)
    yield request.param
    if handles:
        assert cpu_kernel._use_tensor_handles(extension)


def test_tensors_are_read_through_torchs_stable_c_functions_where_torch_has_them():
    has_them = hasattr(getattr(torch._C, "_aoti", None), "unsafe_alloc_void_ptr_from_tensor")
    assert cpu_kernel.kernel().uses_tensor_handles() == has_them
    assert "tensors read through torch's " in cpu_kernel.describe()


def test_negated_and_conjugated_views_are_told_by_their_key_sets_where_tensors_are_read_through_the_c_functions():
    """Found at load from sample views; where it is not (another TensorImpl layout), the bindings
    answer, correctly but slower: this torch is one the kernel knows."""
    extension = cpu_kernel.kernel()
    assert extension.reads_key_sets() == extension.uses_tensor_handles()
    assert ("key sets" in cpu_kernel.describe()) == extension.reads_key_sets()


def _lazy(view: str, dtype: torch.dtype) -> torch.Tensor:
    base = torch.ones(2, 3, dtype=dtype)
    return {
        "plain": base,
        "negated": base._neg_view(),
        "negation resolved": base._neg_view().resolve_neg(),
        "conjugated": base.conj(),
        "conjugated and negated": base.conj()._neg_view(),
        "conjugation resolved": base.conj().resolve_conj(),
        "negated, then viewed": base._neg_view().view(3, 2).view(2, 3),
    }[view]


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize(
    "view",
    ["plain", "negated", "negation resolved", "conjugated", "conjugated and negated", "conjugation resolved",
     "negated, then viewed"],
)
def test_gather_group_declines_exactly_the_gradients_torch_says_are_lazy_views(view, dtype, reading):
    """A negated view's memory holds the values before negation, a conjugated one's before
    conjugation: the gather must decline those and only those, as torch's is_neg and is_conj say."""
    params = [torch.nn.Parameter(torch.ones(2, 3, dtype=dtype)), torch.nn.Parameter(torch.ones(2, 3, dtype=dtype))]
    optimizer = RMSprop(params, lr=0.01)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    params[1].grad = _lazy(view, dtype)
    lazy = params[1].grad.is_neg() or params[1].grad.is_conj()
    plan = cpu_kernel.gather_group(optimizer, 0)
    if lazy:
        assert isinstance(plan, str) and plan.startswith("parameter 1: its gradient is not"), plan
    else:
        assert len(plan) == 2


def _stepped_twice(**settings) -> tuple[list[torch.nn.Parameter], RMSprop]:
    params = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(3, 2))]
    optimizer = RMSprop(params, lr=0.01, **settings)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    return params, optimizer


def test_gather_group_takes_a_group_with_state(reading):
    _, optimizer = _stepped_twice(momentum=0.5, centered=True)
    assert len(cpu_kernel.gather_group(optimizer, 0)) == 2


def _to_float64(param: torch.nn.Parameter) -> None:
    param.data = param.data.double()
    param.grad = torch.ones_like(param)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda params, opt: opt.state.pop(params[1]), "parameter 1: has no state yet"),
        (lambda params, opt: setattr(params[0], "grad", params[0].grad.to_sparse()), "parameter 0: its gradient is not"),
        (lambda params, opt: setattr(params[1], "grad", torch.ones(2, 3).t()), "parameter 1: its gradient is not"),
        (lambda params, opt: _to_float64(params[0]), "parameter 0: its 'square_avg' is not"),
        (lambda params, opt: opt.state[params[0]].update(square_avg=torch.ones(9)), "parameter 0: its 'square_avg' is not"),
        (lambda params, opt: setattr(opt.state[params[0]]["square_avg"], "data", torch.ones(9)), "parameter 0: its 'square_avg' is not"),
        (lambda params, opt: setattr(params[1], "grad", torch.ones(3, 2)._neg_view()), "parameter 1: its gradient is not"),
        (lambda params, opt: opt.state[params[0]].update(square_avg=torch.ones(2, 3)._neg_view()), "parameter 0: its 'square_avg' is not"),
        # The gradient object checked last time, changed in place: its strides, dtype or shape.
        (lambda params, opt: params[1].grad.t_(), "parameter 1: its gradient is not"),
        (lambda params, opt: params[0].grad.as_strided_((2, 3), (1, 2)), "parameter 0: its gradient is not"),
        (lambda params, opt: setattr(params[0].grad, "data", params[0].grad.double()), "parameter 0: its gradient is not"),
        (lambda params, opt: params[1].grad.resize_(6), "parameter 1: its gradient is not"),
        (lambda params, opt: opt.state[params[0]].pop("grad_avg"), "parameter 0: its 'grad_avg' is missing"),
        (lambda params, opt: opt.state[params[1]].update(step=3), "parameter 1: its 'step' is not a 1-element"),
        (lambda params, opt: opt.state[params[1]].update(step=torch.tensor(3)), "parameter 1: its 'step' is not a 1-element"),
        (lambda params, opt: opt.state.update({params[0]: [1]}), "parameter 0: its state is not a dict"),
    ],
)
def test_gather_group_declines_what_it_cannot_step_and_says_why(change, reason, reading):
    """Also after a gather that checked the same objects: a change behind their back is seen,
    whether the tensors are read through torch's C functions or its Python bindings."""
    params, optimizer = _stepped_twice(centered=True)
    assert not isinstance(cpu_kernel.gather_group(optimizer, 0), str)
    change(params, optimizer)
    declined = cpu_kernel.gather_group(optimizer, 0)
    assert isinstance(declined, str) and declined.startswith(reason), declined


def test_a_gradient_accumulated_in_place_is_taken_and_stepped_with_its_new_values(reading):
    """backward accumulates into the gradient it left (its version moves, its address stays): the
    gather takes it again and the step reads its new values, as with a new gradient tensor."""
    generator = torch.Generator().manual_seed(3)
    grads = [[torch.randn(5, 7, generator=generator) for _ in range(2)] for _ in range(4)]
    kept = [torch.nn.Parameter(torch.ones(5, 7)) for _ in range(2)]
    fresh = [torch.nn.Parameter(torch.ones(5, 7)) for _ in range(2)]
    kept_optimizer, fresh_optimizer = RMSprop(kept, lr=0.01, momentum=0.5), RMSprop(fresh, lr=0.01, momentum=0.5)
    for step, values in enumerate(grads):
        for p, q, g in zip(kept, fresh, values, strict=True):
            if step == 0:
                p.grad = g.clone()
            else:
                p.grad.mul_(0).add_(g)
            q.grad = g.clone()
        if step > 1:
            assert not isinstance(cpu_kernel.gather_group(kept_optimizer, 0), str)
        kept_optimizer.step()
        fresh_optimizer.step()
    for p, q in zip(kept, fresh, strict=True):
        assert torch.equal(p, q)


def test_gather_group_declines_a_tensor_subclass():
    class Tagged(torch.Tensor):
        pass

    params, optimizer = _stepped_twice()
    optimizer.param_groups[0]["params"][0] = params[0].as_subclass(Tagged)
    assert cpu_kernel.gather_group(optimizer, 0) == "parameter 0: not a plain tensor"


def test_gather_group_skips_params_without_gradients_and_does_not_add_state():
    params, optimizer = _stepped_twice()
    extra = torch.nn.Parameter(torch.ones(4))
    optimizer.param_groups[0]["params"].append(extra)
    params[1].grad = None
    assert len(cpu_kernel.gather_group(optimizer, 0)) == 1
    assert extra not in optimizer.state


def _low_precision_stepped_twice(**settings) -> tuple[list[torch.nn.Parameter], RMSprop]:
    """A bf16-param and an fp32-param tensor of 3 blocks, and a small one (fp32 "wide" state in 8-bit groups)."""
    params = [
        torch.nn.Parameter(torch.ones(3, 200, dtype=torch.bfloat16)),
        torch.nn.Parameter(torch.ones(600)),
        torch.nn.Parameter(torch.ones(10, dtype=torch.bfloat16)),
    ]
    optimizer = RMSprop(params, lr=0.01, min_8bit_size=256, **settings)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("precision", ["bf16", "8bit"])
@pytest.mark.parametrize("settings", [{}, {"momentum": 0.9, "centered": True}], ids=["plain", "momentum+centered"])
def test_gather_group_takes_a_low_precision_group_whose_state_is_stored_as_it_asks(precision, settings):
    _, optimizer = _low_precision_stepped_twice(state_precision=precision, **settings)
    assert len(cpu_kernel.gather_group(optimizer, 0)) == 3


def _absmax_of(key: str):
    return lambda params, opt: opt.state[params[1]][key + "_absmax"]


@pytest.mark.parametrize(
    ("precision", "change", "reason"),
    [
        # A buffer the settings do not use, or one missing: the Python planning converts or creates.
        ("bf16", lambda params, opt: opt.state[params[0]].update(extra=torch.ones(1)), "parameter 0: its state holds entries"),
        ("8bit", lambda params, opt: opt.state[params[1]].pop("grad_variance_absmax"), "parameter 1: its 'grad_variance_absmax' is missing"),
        ("8bit", lambda params, opt: opt.param_groups[0].update(momentum=0.0), "parameter 0: its state holds entries"),
        ("bf16", lambda params, opt: opt.state[params[1]].update(grad_avg=torch.ones(600)), "parameter 1: its 'grad_avg' is not"),
        ("8bit", lambda params, opt: opt.state[params[1]].update(grad_variance_absmax=torch.ones(2)), "parameter 1: its 'grad_variance_absmax' is not"),
        ("8bit", lambda params, opt: setattr(_absmax_of("momentum_buffer")(params, opt), "data", torch.ones(3, dtype=torch.float64)), "parameter 1: its 'momentum_buffer_absmax' is not"),
        # The group's format changed under state of the old one: the same objects are checked again.
        ("bf16", lambda params, opt: opt.param_groups[0].update(state_precision="8bit"), "parameter 0: its 'grad_variance_absmax' is missing"),
        ("8bit", lambda params, opt: opt.param_groups[0].update(min_8bit_size=1000), "parameter 0: its 'square_avg' is missing"),
        ("bf16", lambda params, opt: opt.param_groups[0].update(state_precision="full"), "parameter 0: its 'square_avg' is missing"),
    ],
)
def test_gather_group_declines_low_precision_state_it_cannot_step_and_says_why(precision, change, reason):
    params, optimizer = _low_precision_stepped_twice(state_precision=precision, momentum=0.9, centered=True)
    assert not isinstance(cpu_kernel.gather_group(optimizer, 0), str)
    change(params, optimizer)
    declined = cpu_kernel.gather_group(optimizer, 0)
    assert isinstance(declined, str) and declined.startswith(reason), declined


@pytest.mark.parametrize("precision", ["bf16", "8bit"])
def test_a_gathered_low_precision_group_is_seeded_by_its_params_position_among_all_params(precision):
    """Two groups: the second's noise is seeded from its params' positions after the first group's,
    as the per-tensor path seeds it; a wrong position would change the rounding of most elements."""
    generator = torch.Generator().manual_seed(3)
    shapes = [(3, 200), (600,)]
    fused_params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes * 2]
    loop_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    settings = {"state_precision": precision, "min_8bit_size": 256, "momentum": 0.9, "centered": True}
    optimizers = [
        RMSprop([{"params": params[:2]}, {"params": params[2:]}], fused=fused, **settings)
        for params, fused in ((fused_params, None), (loop_params, False))
    ]
    for step in range(4):
        for p, q in zip(fused_params, loop_params, strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        if step > 0:
            assert all(not isinstance(cpu_kernel.gather_group(optimizers[0], i, 2 * i), str) for i in (0, 1))
        for optimizer in optimizers:
            optimizer.step()
    for p, q in zip(fused_params, loop_params, strict=True):
        state, expected = optimizers[0].state[p], optimizers[1].state[q]
        for key, value in state.items():
            if value.dtype == torch.uint8:
                assert (value.int() - expected[key].int()).abs().max() <= 1, key
                assert (value != expected[key]).float().mean() < 0.01, key
            elif value.dtype == torch.bfloat16:
                assert (value != expected[key]).float().mean() < 0.01, key
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_gathered_step_bumps_the_version_of_the_parameters_with_gradients():
    params, optimizer = _stepped_twice()
    params[1].grad = None
    versions = [p._version for p in params]
    optimizer.step()
    assert params[0]._version > versions[0] and params[1]._version == versions[1]


def test_a_state_tensor_moved_to_new_memory_is_stepped_there(reading):
    """The gather trusts an object it checked only at the address it checked it at."""
    params, optimizer = _stepped_twice(momentum=0.9)
    buffer = optimizer.state[params[0]]["momentum_buffer"]
    old = buffer.data
    buffer.data = old.clone()
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert not torch.equal(buffer, old)


def test_steps_from_two_python_threads_at_once_equal_steps_one_after_the_other():
    """The kernel releases the GIL: two optimizers stepped from two threads share its thread pool."""
    import threading

    def trained(threads: bool) -> list[torch.Tensor]:
        runs = []
        for seed in (0, 1):
            params = make_params(torch.float32, [(200_001,)], seed=seed)
            runs.append((params, RMSprop(params, momentum=0.9)))

        def train(params, optimizer):
            run_steps(optimizer, params, make_gradients(params, 4), torch.float32)

        if threads:
            workers = [threading.Thread(target=train, args=run) for run in runs]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        else:
            for run in runs:
                train(*run)
        return [p.detach() for params, _ in runs for p in params]

    for concurrent, serial in zip(trained(True), trained(False), strict=True):
        assert torch.equal(concurrent, serial)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("buffers", [1, 2, 3])
def test_the_traffic_loop_of_the_bound_moves_every_element_of_every_buffer_in_its_own_width(instruction_set, state_dtype, buffers):
    """The benchmark's bound reads each gradient and reads and writes back each element of the
    params and buffers, in each instruction set: with finite gradients nothing changes, and where
    a gradient is NaN each of them is written (float32: NaN; 2- and 1-byte state: its bits one
    more); memory past the tensors stays as it was."""
    generator = torch.Generator().manual_seed(0)
    sizes = [1, 300, (1 << 16) + 17, 1 << 17]  # a chunk's edge crossed, the pool woken for the large ones
    padding = 64

    def padded(size: int, dtype: torch.dtype) -> torch.Tensor:
        if dtype.is_floating_point:
            return torch.randn(size + padding, generator=generator).to(dtype)
        return torch.randint(0, 255, (size + padding,), generator=generator, dtype=dtype)

    params, grads = ([padded(size, torch.float32) for size in sizes] for _ in range(2))
    state = [[padded(size, state_dtype) for size in sizes] for _ in range(buffers)]
    marked = [torch.tensor(sorted({0, size // 2, size - 1})) for size in sizes]
    for grad, where in zip(grads, marked, strict=True):
        grad[where] = float("nan")
    before = [[t.clone() for t in kind] for kind in (params, *state)]
    cut = [[t[:size] for t, size in zip(kind, sizes, strict=True)] for kind in (params, grads, *state)]
    cpu_kernel.stream_step_traffic(*cut, *[[]] * (3 - buffers))
    for kind, old in zip((params, *state), before, strict=True):
        for t, o, where in zip(kind, old, marked, strict=True):
            if t.dtype == torch.float32:
                expected = o.clone()
                expected[where] = float("nan")
                assert torch.equal(t.isnan(), expected.isnan())
                assert torch.equal(t.nan_to_num(), expected.nan_to_num())
            else:  # 2- and 1-byte state moves as integers
                bits, old_bits = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x for x in (t, o))
                expected = old_bits.clone()
                expected[where] += 1
                assert torch.equal(bits, expected)


def test_the_traffic_loop_refuses_a_state_width_it_does_not_move():
    params = [torch.zeros(8)]
    with pytest.raises(ValueError, match="state_bytes must be 4, 2 or 1, not 8"):
        cpu_kernel.stream_step_traffic(params, [torch.zeros(8)], [torch.zeros(8, dtype=torch.float64)], [], [])
