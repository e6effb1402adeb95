"""Low-precision optimizer state: codecs against independent computations, and the optimizer with bf16/8-bit state."""

import copy
import io
import itertools
import math

import numpy as np
import pytest
import torch

from rmsprop import RMSprop
from rmsprop.formats.checkpoint import state_bytes
from rmsprop.formats.codecs import dequantize_blockwise, quantize_blockwise, stochastic_round_bf16
from rmsprop.formats.layout import BLOCK_SIZE
from rmsprop.formats.maps import SIGNED_MAP, UNSIGNED_MAP
from rmsprop.formats.noise import rounding_bits, rounding_noise, rounding_seed, uniform_noise

LOW = ["bf16", "8bit"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tensors of a few thousand elements: intra-op threads only add contention (10x slower on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bitsandbytes_dynamic_map(signed):
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8), transcribed from its source."""
    data = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = np.linspace(0.1, 1, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return np.sort(np.array(data, dtype=np.float32))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_are_those_of_bitsandbytes(signed):
    ours = (SIGNED_MAP if signed else UNSIGNED_MAP).numpy()
    expected = _bitsandbytes_dynamic_map(signed)
    if signed:
        # Ours trades the negative value nearest 0 for -1.
        negatives = np.flatnonzero(expected < 0)
        expected = np.sort(np.concatenate([np.delete(expected, negatives[-1]), [-1.0]])).astype(np.float32)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)
    assert ours.min() == (-1.0 if signed else 0.0) and ours.max() == 1.0


def _blocks_numpy(x):
    flat = x.reshape(-1).astype(np.float64)
    padded = np.concatenate([flat, np.zeros(-flat.size % BLOCK_SIZE)])
    return padded.reshape(-1, BLOCK_SIZE), flat.size


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [1, 255, 256, 1000, 4096 + 17])
def test_nearest_quantization_matches_numpy(signed, numel):
    generator = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=generator) * torch.logspace(-6, 0, numel)
    if not signed:
        x = x.abs()
    qmap = SIGNED_MAP if signed else UNSIGNED_MAP
    codes, absmax = quantize_blockwise(x, qmap)

    blocks, n = _blocks_numpy(x.numpy())
    expected_absmax = np.abs(blocks).max(axis=1)
    scaled = blocks / np.where(expected_absmax > 0, expected_absmax, 1)[:, None]
    table = qmap.numpy().astype(np.float64)
    nearest = table[np.abs(scaled[..., None] - table).argmin(axis=-1)]
    expected = (nearest * expected_absmax[:, None]).reshape(-1)[:n]

    np.testing.assert_allclose(absmax.numpy(), expected_absmax, rtol=1e-7)
    np.testing.assert_allclose(dequantize_blockwise(codes, absmax, qmap).numpy(), expected, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_quantization_picks_a_neighbour_and_bounds_the_error(signed):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8192, generator=generator) * torch.logspace(-4, 0, 8192)
    if not signed:
        x = x.abs()
    qmap = SIGNED_MAP if signed else UNSIGNED_MAP
    uniform = torch.rand(x.shape, generator=generator)
    decoded = dequantize_blockwise(*quantize_blockwise(x, qmap, uniform), qmap).double()

    blocks, n = _blocks_numpy(x.numpy())
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    scaled = (blocks / absmax).reshape(-1)[:n]
    table = qmap.numpy().astype(np.float64)
    upper = np.clip(np.searchsorted(table, scaled), 1, 255)
    low = table[upper - 1] * np.repeat(absmax[:, 0], BLOCK_SIZE)[:n]
    high = table[upper] * np.repeat(absmax[:, 0], BLOCK_SIZE)[:n]
    decoded = decoded.numpy()
    tolerance = 1e-6 * np.abs(high)
    assert np.all((np.abs(decoded - low) <= tolerance) | (np.abs(decoded - high) <= tolerance))
    # Relative error within the top decade of each block: at most one bin of 0.9/64 (signed) or 0.9/128, at 0.1.
    top = np.abs(scaled) >= 0.1
    bin_width = 0.9 / (64 if signed else 128)
    relative = np.abs(decoded - x.numpy()) / np.abs(x.numpy())
    assert relative[top].max() <= bin_width / 0.1 + 1e-6


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_stochastic_rounding_is_unbiased(signed):
    """Values a quarter of the way between two map values (times a block absmax whose reciprocal
    is inexact) decode, on average, to themselves."""
    qmap = SIGNED_MAP if signed else UNSIGNED_MAP
    absmax = 3.0
    table = qmap.double()
    targets = [(200, 0.25), (140, 0.6)] + ([(40, 0.3)] if signed else [])
    values = [float(absmax * (table[i] + f * (table[i + 1] - table[i]))) for i, f in targets]
    blocks = 2000
    per_value = (BLOCK_SIZE - 1) // len(values)
    block = torch.tensor([absmax] + sum(([v] * per_value for v in values), []), dtype=torch.float32)
    block = torch.cat([block, torch.zeros(BLOCK_SIZE - block.numel())])
    x = block.repeat(blocks)
    uniform = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    decoded = dequantize_blockwise(*quantize_blockwise(x, qmap, uniform), qmap).double().reshape(blocks, BLOCK_SIZE)
    nearest = dequantize_blockwise(*quantize_blockwise(x, qmap), qmap).double().reshape(blocks, BLOCK_SIZE)
    assert torch.all(decoded[:, 0] == absmax)
    for k, ((i, fraction), value) in enumerate(zip(targets, values, strict=True)):
        columns = slice(1 + k * per_value, 1 + (k + 1) * per_value)
        gap = absmax * float(table[i + 1] - table[i])
        standard_error = gap * math.sqrt(fraction * (1 - fraction) / (blocks * per_value))
        value = float(torch.tensor(value, dtype=torch.float32))
        assert abs(decoded[:, columns].mean().item() - value) < 5 * standard_error
        # Round-to-nearest is off by a quarter of a gap or more, hundreds of standard errors.
        assert abs(nearest[:, columns].mean().item() - value) > 50 * standard_error


@pytest.mark.parametrize("signed", [True, False])
def test_the_largest_magnitude_of_a_block_is_exact_with_any_noise(signed):
    """The block's largest magnitude decodes exactly, whatever the noise, from subnormal absmaxes
    to the largest floats (times a reciprocal rounded to nearest it could miss 1 by an ulp)."""
    qmap = SIGNED_MAP if signed else UNSIGNED_MAP
    generator = torch.Generator().manual_seed(2)
    exponents = torch.randint(-149, 128, (400,), generator=generator).double()
    magnitudes = (torch.rand(400, generator=generator, dtype=torch.float64) + 1) * 2.0**exponents
    magnitudes = magnitudes.float()
    magnitudes = magnitudes[(magnitudes > 0) & magnitudes.isfinite()]
    assert (magnitudes < 2.0**-126).any() and (magnitudes >= 2.0**126).any()
    signs = torch.where(torch.rand(magnitudes.shape, generator=generator) < 0.5, -1.0, 1.0) if signed else 1.0
    largest = magnitudes * signs
    blocks = torch.rand(magnitudes.numel(), BLOCK_SIZE, generator=generator) * largest.unsqueeze(1) * 0.99
    blocks[:, 7] = largest
    for noise in (0.0, 1 - 2.0**-16):
        uniform = torch.full(blocks.shape, noise)
        decoded = dequantize_blockwise(*quantize_blockwise(blocks, qmap, uniform), qmap)
        assert torch.equal(decoded[:, 7], largest)


@pytest.mark.parametrize("signed", [True, False])
def test_a_block_of_subnormal_magnitudes_is_encoded_as_the_same_block_scaled_up(signed):
    """Such a block is multiplied by 2^32 before the reciprocal of its absmax, which would be
    infinite: its codes are those of the block times 2^64, and it decodes within a bin."""
    qmap = SIGNED_MAP if signed else UNSIGNED_MAP
    generator = torch.Generator().manual_seed(3)
    units = torch.randint(1 if not signed else -(1 << 20), 1 << 20, (4 * BLOCK_SIZE,), generator=generator)
    tiny = units.float() * 2.0**-149  # exact subnormals (and normals near 2^-129)
    tiny[:BLOCK_SIZE] *= 2.0**-10
    uniform = torch.rand(tiny.shape, generator=generator)
    codes, absmax = quantize_blockwise(tiny, qmap, uniform)
    assert (absmax < torch.finfo(torch.float32).tiny).all()
    scaled_codes, _ = quantize_blockwise(tiny * 2.0**64, qmap, uniform)
    assert torch.equal(codes, scaled_codes)
    decoded = dequantize_blockwise(codes, absmax, qmap).double()
    exact = tiny.double()
    top = exact.abs() >= 0.1 * absmax.double().repeat_interleave(BLOCK_SIZE)
    bin_width = 0.9 / (64 if signed else 128)
    assert ((decoded - exact).abs()[top] <= bin_width * absmax.double().repeat_interleave(BLOCK_SIZE)[top] * 1.0001).all()


def test_bf16_stochastic_rounding_is_unbiased():
    # 1 + 2^-10 lies a quarter of the way from bfloat16's 1 to 1 + 2^-7.
    x = torch.full((200_000,), 1 + 2**-10)
    noise = torch.randint(0, 1 << 16, x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    rounded = stochastic_round_bf16(x, noise).double()
    assert set(rounded.unique().tolist()) == {1.0, 1 + 2**-7}
    standard_error = 2**-7 * math.sqrt(0.25 * 0.75 / x.numel())
    assert abs(rounded.mean().item() - (1 + 2**-10)) < 5 * standard_error
    # Round-to-nearest would be off by 2^-10, 100 standard errors.
    assert abs(x.to(torch.bfloat16).double().mean().item() - (1 + 2**-10)) > 50 * standard_error


def test_bf16_stochastic_rounding_keeps_signs_and_specials():
    x = torch.tensor([-1 - 2**-9, 0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3e38])
    noise = torch.full(x.shape, (1 << 16) - 1, dtype=torch.int32)
    rounded = stochastic_round_bf16(x, noise).float()
    assert rounded[0].item() == -1 - 2**-7
    assert rounded[1].item() == 0 and rounded[2].item() == 0
    assert rounded[3].item() == float("inf") and rounded[4].item() == float("-inf")
    assert math.isnan(rounded[5].item())
    assert math.isfinite(stochastic_round_bf16(x, torch.zeros_like(noise))[6].item())


@pytest.mark.parametrize("mode", LOW)
def test_small_ema_updates_are_not_lost(mode):
    """alpha=0.999 from square_avg=1 toward g^2 = 2 c^2: v_t = alpha^t + 2 c^2 (1 - alpha^t).

    Rounding to nearest would leave v at 1: each update is below half an ulp."""
    c = torch.linspace(0.8, 1.0, 4096)
    param = torch.zeros(4096, requires_grad=True)
    optimizer = RMSprop([param], lr=0.0, alpha=0.999, initial_scale=1.0, state_precision=mode, min_8bit_size=0)
    steps = 1000
    for _ in range(steps):
        param.grad = math.sqrt(2) * c
        optimizer.step()
    decay = 0.999**steps
    expected = decay + 2 * c.double() ** 2 * (1 - decay)
    square_avg = _decoded(optimizer, param)["square_avg"].double()
    assert abs(square_avg.mean().item() / expected.mean().item() - 1) < 2e-3
    # Each element random-walks by its rounding noise: about 2.3% (bf16) and 0.6% (8-bit) standard deviation here.
    assert ((square_avg / expected - 1).abs() < (0.15 if mode == "bf16" else 0.05)).all()


def _decoded(optimizer, param):
    """The state of ``param`` in fp32 (no bias correction), decoded here from the stored entries and the maps."""
    state = optimizer.state[param]
    out = {}
    for key in ("grad_avg", "momentum_buffer", "square_avg", "grad_variance"):
        if key not in state:
            continue
        value = state[key]
        if value.dtype == torch.uint8:
            root = key in ("square_avg", "grad_variance")
            qmap = UNSIGNED_MAP if root else SIGNED_MAP
            scale = state[key + "_absmax"].repeat_interleave(BLOCK_SIZE)[: value.numel()]
            value = (qmap[value.reshape(-1).long()] * scale).reshape(value.shape)
            value = value**2 if root else value
        out[key] = value.float()
    if "grad_variance" in out:
        out["square_avg"] = out.pop("grad_variance") + out["grad_avg"] ** 2
    return out


def _flag_combinations():
    for momentum, centered, bias_correction, decay, eps_in_sqrt, maximize in itertools.product(
        [0.0, 0.9], [False, True], [False, True], ["none", "coupled", "decoupled"], [False, True], [False, True]
    ):
        base = dict(
            momentum=momentum,
            centered=centered,
            bias_correction=bias_correction,
            weight_decay=0.0 if decay == "none" else 0.01,
            decoupled_weight_decay=decay == "decoupled",
            eps_in_sqrt=eps_in_sqrt,
            maximize=maximize,
        )
        if momentum == 0:
            extra = [dict()]
        else:
            extra = [dict(nesterov=n, lr_in_momentum=m) for n in (False, True) for m in (False, True)]
        for more in extra:
            yield {**base, **more}


FLAG_COMBINATIONS = list(_flag_combinations())


def _train(settings, steps=25, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # A matrix above min_8bit_size with rows of different gradient scales, and a small bias.
    params = [torch.randn(64, 80, generator=generator), torch.randn(80, generator=generator)]
    start = [p.clone() for p in params]
    optimizer = RMSprop(params, lr=1e-2, **settings)
    scales = torch.logspace(-3, 0, 64).unsqueeze(1)
    for _ in range(steps):
        params[0].grad = (params[0] + torch.randn(64, 80, generator=generator)) * scales
        params[1].grad = params[1] + torch.randn(80, generator=generator)
        optimizer.step()
    return start, params, optimizer


@pytest.mark.parametrize("fused", [False, True], ids=["per-tensor", "fused"])
@pytest.mark.parametrize("mode", LOW)
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items() if v))
def test_every_flag_combination_stays_close_to_full_precision(flags, mode, fused):
    foreach = hash(tuple(flags.values())) % 2 == 0
    start, full, _ = _train({**flags, "foreach": foreach})
    path = {"fused": True} if fused else {"foreach": not foreach}
    _, low, optimizer = _train({**flags, **path, "state_precision": mode, "min_8bit_size": 4096})
    for p0, p_full, p_low in zip(start, full, low):
        moved = (p_full - p0).norm()
        assert torch.isfinite(p_low).all()
        assert (p_low - p_full).norm() <= 0.05 * moved
    stored = optimizer.state[low[0]]["grad_variance" if flags["centered"] else "square_avg"].dtype
    assert stored == (torch.bfloat16 if mode == "bf16" else torch.uint8)


@pytest.mark.parametrize("mode", LOW)
def test_centered_denominator_does_not_collapse(mode):
    """Steady gradients (mean >> spread): v - m^2 falls to 1e-4 of v, below what two separately rounded
    bf16 or 8-bit values resolve; stored as square_avg and grad_avg, both modes sent steps to g/eps."""
    generator = torch.Generator().manual_seed(0)
    mean = torch.logspace(-2, 0, 8192)
    settings = dict(lr=1e-3, alpha=0.99, centered=True)
    params = {name: torch.zeros(8192) for name in ("full", mode)}
    optimizers = {name: RMSprop([p], state_precision=name, **settings) for name, p in params.items()}
    for _ in range(300):
        grad = mean * (1 + 0.01 * torch.randn(8192, generator=generator))
        for name, p in params.items():
            before = p.clone()
            p.grad = grad
            optimizers[name].step()
            # In fp32, |g| / sqrt(v - m^2) stays below about 1/0.01 = 100.
            assert ((p - before).abs() / settings["lr"]).max() < 1000, name
    ratio = (params[mode] / params["full"]).double()
    assert ((ratio - 1).abs() < 0.1).all()


def test_square_avg_keeps_small_values_in_a_block():
    """Gradients spanning 5 decades in one block: square_avg spans 10 decades, none decodes to 0."""
    param = torch.zeros(4096)
    optimizer = RMSprop([param], lr=0.0, state_precision="8bit")
    grad = torch.logspace(-5, 0, 4096)[torch.randperm(4096, generator=torch.Generator().manual_seed(0))]
    param.grad = grad
    optimizer.step()
    expected = 0.01 * grad.double() ** 2
    decoded = _decoded(optimizer, param)["square_avg"].double()
    assert (decoded > 0).all()
    # The denominator's relative error: at most one bin, 0.9/128 / 0.1, in the top decade of each block's root ...
    blocks = grad.reshape(-1, BLOCK_SIZE)
    top = (blocks >= 0.1 * blocks.amax(dim=1, keepdim=True)).reshape(-1)
    error = ((decoded / expected).sqrt() - 1).abs()
    assert error[top].max() <= 0.9 / 128 / 0.1
    # ... and within a factor 2 five decades down, where the map has few codes.
    assert error.max() < 1
    # Quantizing square_avg itself would round the smallest elements of a block to 0 (denominator eps).
    naive = dequantize_blockwise(*quantize_blockwise(expected.float(), UNSIGNED_MAP), UNSIGNED_MAP)
    assert (naive == 0).any()


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mode", LOW)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_is_exact_and_resumes_bit_identically(mode, dtype):
    settings = dict(momentum=0.9, centered=True, state_precision=mode, min_8bit_size=1000)
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(50, 40, generator=generator).to(dtype), torch.randn(7, generator=generator).to(dtype)]
    grads = [[torch.randn(p.shape, generator=generator).to(dtype) for p in params] for _ in range(10)]
    optimizer = RMSprop(params, **settings)
    for step_grads in grads[:5]:
        for p, g in zip(params, step_grads):
            p.grad = g
        optimizer.step()

    resumed_params = [p.clone() for p in params]
    resumed = RMSprop(resumed_params, **settings)
    resumed.load_state_dict(_round_trip(optimizer.state_dict()))
    for p, q in zip(params, resumed_params):
        original, loaded = optimizer.state[p], resumed.state[q]
        assert set(original) == set(loaded)
        for key in original:
            assert loaded[key].dtype == original[key].dtype, key
            assert torch.equal(loaded[key], original[key]), key

    for step_grads in grads[5:]:
        for p, q, g in zip(params, resumed_params, step_grads):
            p.grad, q.grad = g, g.clone()
        optimizer.step()
        resumed.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mode", LOW)
def test_switching_to_full_mid_run_decodes_the_state(mode):
    start, params, optimizer = _train(dict(momentum=0.9, centered=True, state_precision=mode))
    decoded = _decoded(optimizer, params[0])
    optimizer.param_groups[0]["state_precision"] = "full"
    for p in params:
        p.grad = torch.zeros_like(p)
    # lr=0 and alpha=1 leave the state as it is, so the conversion itself is visible.
    optimizer.param_groups[0].update(lr=0.0, alpha=1.0, momentum=1.0)
    optimizer.step()
    state = optimizer.state[params[0]]
    for key, value in decoded.items():
        assert state[key].dtype == torch.float32
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-12)
    assert set(state) == {"step", "square_avg", "momentum_buffer", "grad_avg"}


@pytest.mark.parametrize("mode", LOW)
def test_switching_to_low_precision_mid_run_and_back_stays_close(mode):
    start, full, _ = _train(dict(momentum=0.9), steps=40)
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 80, generator=generator), torch.randn(80, generator=generator)]
    optimizer = RMSprop(params, lr=1e-2, momentum=0.9)
    scales = torch.logspace(-3, 0, 64).unsqueeze(1)
    for step in range(40):
        optimizer.param_groups[0]["state_precision"] = mode if 10 <= step < 30 else "full"
        params[0].grad = (params[0] + torch.randn(64, 80, generator=generator)) * scales
        params[1].grad = params[1] + torch.randn(80, generator=generator)
        optimizer.step()
        expected = torch.uint8 if mode == "8bit" else torch.bfloat16
        assert optimizer.state[params[0]]["square_avg"].dtype == (expected if 10 <= step < 30 else torch.float32)
    for p0, p_full, p in zip(start, full, params):
        assert (p - p_full).norm() <= 0.05 * (p_full - p0).norm()


@pytest.mark.parametrize("mode", LOW)
def test_loading_a_full_precision_state_dict_converts_it(mode):
    torch_params = [torch.randn(64, 80)]
    reference = torch.optim.RMSprop(torch_params, lr=1e-2, momentum=0.9, centered=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        torch_params[0].grad = torch.randn(64, 80, generator=generator) + 1
        reference.step()
    optimizer = RMSprop([torch_params[0].clone()], lr=1e-2, momentum=0.9, centered=True, state_precision=mode)
    optimizer.load_state_dict(reference.state_dict())
    loaded = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert loaded["grad_variance"].dtype == (torch.uint8 if mode == "8bit" else torch.bfloat16)
    assert "square_avg" not in loaded and optimizer.param_groups[0]["state_precision"] == mode
    decoded = _decoded(optimizer, optimizer.param_groups[0]["params"][0])
    full = reference.state[torch_params[0]]
    for key in ("square_avg", "grad_avg", "momentum_buffer"):
        scale = full[key].abs().max()
        assert (decoded[key] - full[key]).abs().max() <= 0.02 * scale, key


def test_full_optimizer_loads_torch_state_dict_unchanged():
    params = [torch.randn(64, 80)]
    reference = torch.optim.RMSprop(params, momentum=0.9, centered=True)
    params[0].grad = torch.randn(64, 80)
    reference.step()
    ours = RMSprop([params[0].clone()], momentum=0.9, centered=True)
    ours.load_state_dict(reference.state_dict())
    for key, value in reference.state[params[0]].items():
        assert torch.equal(ours.state[ours.param_groups[0]["params"][0]][key], value)


@pytest.mark.parametrize("numel, stored", [(4095, torch.float32), (4096, torch.uint8)])
def test_min_8bit_size_keeps_small_tensors_in_fp32(numel, stored):
    param = torch.zeros(numel)
    optimizer = RMSprop([param], momentum=0.9, state_precision="8bit")
    param.grad = torch.ones(numel)
    optimizer.step()
    assert optimizer.state[param]["square_avg"].dtype == stored
    assert optimizer.state[param]["momentum_buffer"].dtype == stored


def test_small_tensors_of_bf16_params_keep_fp32_state():
    param = torch.zeros(10, dtype=torch.bfloat16)
    optimizer = RMSprop([param], state_precision="8bit")
    param.grad = torch.ones(10, dtype=torch.bfloat16)
    optimizer.step()
    assert optimizer.state[param]["square_avg"].dtype == torch.float32


def test_complex_params_keep_their_dtype():
    param = torch.zeros(5000, dtype=torch.complex64)
    optimizer = RMSprop([param], state_precision="8bit", min_8bit_size=0)
    param.grad = torch.ones(5000, dtype=torch.complex64)
    optimizer.step()
    assert optimizer.state[param]["square_avg"].dtype == torch.complex64


def test_rounding_noise_depends_on_parameter_buffer_and_step():
    seeds = {args: rounding_seed(*args) for args in [(0, "square_avg", 1), (1, "square_avg", 1), (0, "grad_avg", 1), (0, "square_avg", 2)]}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= seed < 2**64 for seed in seeds.values())
    assert rounding_seed(0, "square_avg", 1) == seeds[(0, "square_avg", 1)]


def _lowbias32_inverse(x: int) -> int:
    """The inverse of lowbias32 as its author published it (https://nullprogram.com/blog/2018/07/31/)."""
    x ^= x >> 16
    x = (x * 0x43021123) & 0xFFFFFFFF
    x ^= (x >> 15) ^ (x >> 30)
    x = (x * 0x1D69E2A5) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_rounding_bits_are_the_hash_of_the_counter():
    """The published inverse of lowbias32 takes each output back to its counter: output o of seed s
    hashes (o + s mod 2^32) mod 2^32 xor s // 2^32, past the low half's wrap too."""
    seed = 0x9E3779B9FFFFFFFD
    bits = rounding_bits(seed, 6)
    assert bits.dtype == torch.int64 and bits.min() >= 0 and bits.max() < 2**32
    counters = [((o + seed) % 2**32) ^ (seed >> 32) for o in range(6)]
    assert [_lowbias32_inverse(value) for value in bits.tolist()] == counters
    assert len(set(bits.tolist())) == 6


def test_rounding_noise_is_the_stream_read_as_16_bit_words():
    outputs = rounding_bits(1234567, 4).tolist()
    words = [(value >> (16 * k)) & 0xFFFF for value in outputs for k in range(2)]
    assert rounding_noise(1234567, (7,)).tolist() == words[:7]
    assert rounding_noise(1234567, (2, 3)).reshape(-1).tolist() == words[:6]


def test_rounding_noise_is_uniform_in_its_ranges():
    noise = rounding_noise(rounding_seed(3, "square_avg", 7), (100_000,))
    assert noise.dtype == torch.int32 and noise.min() >= 0 and noise.max() < 2**16
    uniform = uniform_noise(noise)
    assert uniform.dtype == torch.float32 and uniform.min() >= 0 and uniform.max() < 1
    # Mean and variance of U[0, 1) within 5 standard errors; neighbours (words of one output) uncorrelated.
    n = noise.numel()
    assert abs(uniform.double().mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(uniform.double().var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    centered = uniform.double() - 0.5
    for lag in (1, 2, 3, 4):
        correlation = (centered[:-lag] * centered[lag:]).mean().item() * 12
        assert abs(correlation) < 5 / math.sqrt(n)
    # An element's noise at the next step, and of another buffer, uncorrelated with it.
    for args in [(3, "square_avg", 8), (3, "grad_avg", 7), (4, "square_avg", 7)]:
        other = uniform_noise(rounding_noise(rounding_seed(*args), (100_000,))).double() - 0.5
        assert abs((centered * other).mean().item() * 12) < 5 / math.sqrt(n)


def test_low_precision_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _train(dict(state_precision="bf16", momentum=0.9), steps=3)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(state_precision="fp16"), "Invalid state_precision: 'fp16'"),
        (dict(state_precision=None), "Invalid state_precision: None"),
        (dict(min_8bit_size=-1), "Invalid min_8bit_size: -1"),
        (dict(min_8bit_size=1.5), "Invalid min_8bit_size: 1.5"),
        (dict(min_8bit_size=True), "Invalid min_8bit_size: True"),
        (dict(state_precision="8bit", differentiable=True), "Invalid differentiable: True"),
        (dict(state_precision="bf16", capturable=True), "Invalid capturable: True"),
    ],
)
def test_invalid_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RMSprop([torch.zeros(2)], **settings)
    optimizer = RMSprop([torch.zeros(2)])
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": [torch.zeros(3)], **settings})
    assert len(optimizer.param_groups) == 1


def test_load_with_bad_8bit_entries_fails_cleanly():
    param = torch.zeros(5000)
    optimizer = RMSprop([param], state_precision="8bit")
    param.grad = torch.ones(5000)
    optimizer.step()
    state_dict = copy.deepcopy(optimizer.state_dict())
    state_dict["state"][0]["square_avg_absmax"] = torch.ones(3)
    before = copy.deepcopy(optimizer.state[param])
    with pytest.raises(ValueError, match="'square_avg_absmax' must be a float32 tensor of shape \\(20,\\)"):
        optimizer.load_state_dict(state_dict)
    for key, value in before.items():
        assert torch.equal(optimizer.state[param][key], value)


def test_state_bytes_of_8bit_state_match_the_layout():
    weight, bias = torch.zeros(100, 100), torch.zeros(100)
    optimizer = RMSprop([weight, bias], momentum=0.9, centered=True, state_precision="8bit")
    weight.grad, bias.grad = torch.ones(100, 100), torch.ones(100)
    optimizer.step()
    # Three buffers: 10000 one-byte codes and 40 fp32 absmax for the weight, 100 fp32 for the bias; two fp32 steps.
    expected = 3 * (10000 + 4 * math.ceil(10000 / 256)) + 3 * 4 * 100 + 2 * 4
    assert state_bytes(optimizer.state.values()) == expected


def test_switching_between_low_precisions_keeps_the_state():
    _, params, optimizer = _train(dict(momentum=0.9, centered=True, state_precision="bf16"))
    before = _decoded(optimizer, params[0])
    optimizer.param_groups[0]["state_precision"] = "8bit"
    optimizer.param_groups[0].update(lr=0.0, alpha=1.0, momentum=1.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = optimizer.state[params[0]]
    assert state["grad_variance"].dtype == torch.uint8 and state["momentum_buffer"].dtype == torch.uint8
    after = _decoded(optimizer, params[0])
    for key in ("momentum_buffer", "grad_avg"):
        # One rounding to a signed 8-bit code: at most one bin, 0.9/64 of the block's absmax.
        assert (after[key] - before[key]).abs().max() <= 0.9 / 64 * before[key].abs().max()
    # square_avg is rebuilt from the variance and the mean, each within one code of its own block.
    torch.testing.assert_close(after["square_avg"], before["square_avg"], rtol=0.3, atol=1e-6)


def test_the_largest_magnitude_of_a_block_is_exact_for_either_sign():
    x = torch.tensor([0.5, -3.0, 1.0, 2.0] * 64 + [4.0, -1.0, 0.25, -0.5] * 64)
    decoded = dequantize_blockwise(*quantize_blockwise(x, SIGNED_MAP), SIGNED_MAP)
    assert decoded[1].item() == -3.0 and decoded[256].item() == 4.0


def test_min_8bit_size_accepts_any_integer_type():
    optimizer = RMSprop([torch.zeros(2)], state_precision="8bit", min_8bit_size=np.int64(1))
    assert optimizer.param_groups[0]["min_8bit_size"] == 1


def test_changing_min_8bit_size_mid_run_converts_at_the_next_step():
    param = torch.zeros(5000)
    optimizer = RMSprop([param], state_precision="8bit")
    param.grad = torch.ones(5000)
    optimizer.step()
    assert optimizer.state[param]["square_avg"].dtype == torch.uint8
    optimizer.param_groups[0]["min_8bit_size"] = 10_000
    optimizer.step()
    assert optimizer.state[param]["square_avg"].dtype == torch.float32
    assert "square_avg_absmax" not in optimizer.state[param]
