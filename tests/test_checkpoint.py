"""Checkpoints: save, load into a fresh model and optimizer, continue; nothing is lost."""

import copy
import importlib.util
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from rmsprop import RMSprop, reference
from rmsprop.formats.layout import ABSMAX_SUFFIX, BLOCK_SIZE, ROOTS, mean_weight
from rmsprop.formats.maps import SIGNED_MAP, UNSIGNED_MAP

FIXTURES = Path(__file__).parent / "fixtures"
BOOLEAN_FLAGS = ("centered", "maximize", "eps_in_sqrt", "bias_correction", "decoupled_weight_decay", "lr_in_momentum")
MOMENTUM_MODES = {"none": {}, "heavy_ball": {"momentum": 0.9}, "nesterov": {"momentum": 0.9, "nesterov": True}}


def _all_flag_combinations(momentum_mode: str) -> list[dict]:
    return [
        {**dict(zip(BOOLEAN_FLAGS, values)), **MOMENTUM_MODES[momentum_mode], "weight_decay": 0.01}
        for values in itertools.product([False, True], repeat=len(BOOLEAN_FLAGS))
    ]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _batches(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(5, 4, generator=generator) for _ in range(n)]


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for x in batches:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def _round_trip(obj):
    """Through bytes and back, as a checkpoint file would be, with the safe loader."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _resumed_params(optimizer_class, flags: dict, fresh_flags: dict, k: int, n: int) -> list[torch.Tensor]:
    batches = _batches(n)
    model = _model()
    optimizer = optimizer_class(model.parameters(), **flags)
    _train(model, optimizer, batches[:k])
    checkpoint = _round_trip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    fresh_model = _model(seed=123)
    fresh_optimizer = optimizer_class(fresh_model.parameters(), **fresh_flags)
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    _train(fresh_model, fresh_optimizer, batches[k:])
    return [p.detach() for p in fresh_model.parameters()]


def _uninterrupted_params(optimizer_class, flags: dict, n: int) -> list[torch.Tensor]:
    model = _model()
    _train(model, optimizer_class(model.parameters(), **flags), _batches(n))
    return [p.detach() for p in model.parameters()]


def _assert_identical(actual: list[torch.Tensor], expected: list[torch.Tensor], flags: dict) -> None:
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e), f"resumed run differs from the uninterrupted one for {flags}"


PATHS = {"for-loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("momentum_mode", MOMENTUM_MODES)
def test_resume_is_bit_identical_for_every_flag_combination(momentum_mode, path):
    for flags in _all_flag_combinations(momentum_mode):
        flags = {**flags, **PATHS[path]}
        expected = _uninterrupted_params(RMSprop, flags, n=4)
        _assert_identical(_resumed_params(RMSprop, flags, flags, k=2, n=4), expected, flags)


def test_state_dict_carries_the_flags_into_a_default_optimizer():
    flags = {"lr": 0.05, "momentum": 0.9, "centered": True, "eps_in_sqrt": True, "lr_in_momentum": True}
    expected = _uninterrupted_params(RMSprop, flags, n=5)
    _assert_identical(_resumed_params(RMSprop, flags, {}, k=3, n=5), expected, flags)


@pytest.mark.parametrize("foreach", [False, True])
def test_resume_with_tensor_lr(foreach):
    flags = {"lr": torch.tensor(0.02), "momentum": 0.5, "foreach": foreach}
    expected = _uninterrupted_params(RMSprop, {**flags, "lr": torch.tensor(0.02)}, n=4)
    resumed = _resumed_params(RMSprop, flags, {**flags, "lr": torch.tensor(0.02)}, k=2, n=4)
    _assert_identical(resumed, expected, flags)


@pytest.mark.parametrize("source, target", [(torch.optim.RMSprop, RMSprop), (RMSprop, torch.optim.RMSprop)])
def test_checkpoints_move_between_torch_and_rmsprop(source, target):
    flags = {"lr": 0.02, "momentum": 0.9, "centered": True, "weight_decay": 0.01}

    def settings(optimizer_class):
        # Ours on torch's own path (not the fused default), so that the runs are bit-identical.
        return {**flags, "fused": False} if optimizer_class is RMSprop else flags

    batches = _batches(4)
    model = _model()
    optimizer = source(model.parameters(), **settings(source))
    _train(model, optimizer, batches[:2])
    checkpoint = _round_trip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    fresh_model = _model(seed=5)
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_optimizer = target(fresh_model.parameters(), **settings(target))
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    _train(fresh_model, fresh_optimizer, batches[2:])
    _assert_identical(list(fresh_model.parameters()), _uninterrupted_params(source, settings(source), n=4), flags)


def _load_fixture(version: str) -> tuple[torch.nn.Linear, RMSprop, dict]:
    checkpoint = torch.load(FIXTURES / f"state_dict_v{version}.pt", weights_only=True)
    assert checkpoint["version"] == version
    model = torch.nn.Linear(3, 2)
    model.load_state_dict(checkpoint["model"])
    optimizer = RMSprop([{"params": [model.weight]}, {"params": [model.bias]}])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return model, optimizer, checkpoint


@pytest.mark.parametrize("version", ["0.1.0"])
def test_old_checkpoints_keep_loading_and_stepping(version):
    model, optimizer, checkpoint = _load_fixture(version)
    # Every setting the old version saved is restored.
    for group, saved in zip(optimizer.param_groups, checkpoint["optimizer"]["param_groups"], strict=True):
        assert {key: group[key] for key in saved if key != "params"} == {
            key: value for key, value in saved.items() if key != "params"
        }
    # The next step is the rule applied to the loaded state (NumPy oracle).
    grads = {model.weight: torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4]]), model.bias: torch.tensor([0.2, -0.1])}
    expected = {}
    for group in optimizer.param_groups:
        settings = {key: group[key] for key in _REFERENCE_SETTINGS}
        for p in group["params"]:
            state = optimizer.state[p]
            old_state = reference.RMSpropState(
                step=int(state["step"].item()),
                square_avg=state["square_avg"].double().numpy(),
                grad_avg=state["grad_avg"].double().numpy() if "grad_avg" in state else np.zeros(p.shape),
                momentum_buffer=(
                    state["momentum_buffer"].double().numpy() if "momentum_buffer" in state else np.zeros(p.shape)
                ),
            )
            expected[p], _ = reference.step(
                p.detach().double().numpy(), grads[p].double().numpy(), old_state, **settings
            )
    for p, grad in grads.items():
        p.grad = grad
    optimizer.step()
    for p, value in expected.items():
        np.testing.assert_allclose(p.detach().numpy(), value, rtol=1e-5, atol=1e-7)



def _low_precision_fixture():
    """tests/fixtures/make_low_precision_fixture.py, which builds the model and optimizer of its checkpoint."""
    spec = importlib.util.spec_from_file_location("make_low_precision_fixture", FIXTURES / "make_low_precision_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fused", [False, None])
@pytest.mark.parametrize("version", ["0.1.0"])
def test_low_precision_checkpoints_keep_loading_and_stepping(version, fused):
    fixture = _low_precision_fixture()
    checkpoint = torch.load(FIXTURES / f"state_dict_low_precision_v{version}.pt", weights_only=True)
    model = fixture.make_model()
    model.load_state_dict(checkpoint["model"])
    optimizer = fixture.make_optimizer(model, fused=fused)
    optimizer.load_state_dict(checkpoint["optimizer"])
    # The stored codes and bfloat16 values decode as the version that saved them decoded them.
    decoded = fixture.decoded_state(optimizer)
    for values, saved in zip(decoded, checkpoint["decoded"], strict=True):
        assert values.keys() == saved.keys()
        for key, value in values.items():
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    # The next step is the rule applied to the decoded state (NumPy oracle).
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = dict(zip(model.parameters(), fixture.next_gradients(model), strict=True))
    expected = []
    for p, values in zip(params, decoded, strict=True):
        group = next(group for group in optimizer.param_groups if any(q is p for q in group["params"]))
        zeros = np.zeros(p.shape)
        old_state = reference.RMSpropState(
            step=int(optimizer.state[p]["step"].item()),
            square_avg=values["square_avg"].double().numpy(),
            grad_avg=values["grad_avg"].double().numpy() if "grad_avg" in values else zeros,
            momentum_buffer=values["momentum_buffer"].double().numpy() if "momentum_buffer" in values else zeros,
        )
        settings = {key: group[key] for key in _REFERENCE_SETTINGS}
        expected.append(reference.step(p.detach().double().numpy(), grads[p].double().numpy(), old_state, **settings))
    for p, grad in grads.items():
        p.grad = grad
    optimizer.step()
    for p, (value, _) in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), value, rtol=1e-5, atol=1e-7)
    # The per-tensor path continues the parameters exactly as the version that saved the checkpoint.
    next_step = checkpoint["next_step"]
    if fused is False:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, next_step["model"][key], rtol=0, atol=0)
    # The rounding noise changed after 0.1.0 (16 bits per element, two elements per output of a
    # 32-bit hash), so the state is stored rounded otherwise than 0.1.0 stored it: its values lie
    # within one rounding of the state the NumPy oracle steps to.
    for p, values, (_, new_state) in zip(params, fixture.decoded_state(optimizer), expected, strict=True):
        state = optimizer.state[p]
        group = next(group for group in optimizer.param_groups if any(q is p for q in group["params"]))
        for key, value in values.items():
            exact = getattr(new_state, key)
            tolerance = _one_rounding(state, key, new_state, mean_weight(group, state))
            assert np.all(np.abs(value.double().numpy() - exact) <= tolerance), (key, value, exact)


def _rounding(state: dict, key: str, exact: np.ndarray) -> np.ndarray:
    """How far stored buffer ``key`` may lie from the float64 values ``exact`` it stores,
    per element: a step of its format (one stochastic rounding), or float32 rounding."""
    float32 = 1e-5 * np.abs(exact) + 1e-7
    stored = state[key]
    if key + ABSMAX_SUFFIX in state:
        gap = float(torch.diff(UNSIGNED_MAP if key in ROOTS else SIGNED_MAP).max())
        magnitude = np.sqrt(np.maximum(exact, 0)) if key in ROOTS else np.abs(exact)
        padded = np.concatenate([magnitude.reshape(-1), np.zeros(-magnitude.size % BLOCK_SIZE)])
        block_max = np.repeat(padded.reshape(-1, BLOCK_SIZE).max(axis=1), BLOCK_SIZE)[: magnitude.size]
        step = (gap * block_max * (1 + 1e-5)).reshape(exact.shape)
        # A root r stored within step squares to within 2 r step + step^2.
        return (2 * magnitude * step + step**2 if key in ROOTS else step) + float32
    if stored.dtype == torch.bfloat16:
        # bfloat16 keeps 8 significant bits: its neighbours lie 2^-7 |x| apart at most.
        return 2.0**-7 * np.abs(exact) + float32
    return float32


def _one_rounding(state: dict, key: str, new_state: reference.RMSpropState, weight: float) -> np.ndarray:
    """How far decoded buffer ``key`` may lie from the oracle's ``new_state``. A square_avg
    stored as grad_variance = square_avg - weight grad_avg^2 carries both buffers' roundings."""
    if key != "square_avg" or "grad_variance" not in state:
        return _rounding(state, key, getattr(new_state, key))
    mean = new_state.grad_avg
    variance = np.maximum(new_state.square_avg - weight * mean**2, 0)
    mean_error = _rounding(state, "grad_avg", mean)
    return _rounding(state, "grad_variance", variance) + weight * (2 * np.abs(mean) * mean_error + mean_error**2)

_REFERENCE_SETTINGS = (
    "lr",
    "alpha",
    "eps",
    "weight_decay",
    "momentum",
    "centered",
    "maximize",
    "eps_in_sqrt",
    "bias_correction",
    "nesterov",
    "decoupled_weight_decay",
    "lr_in_momentum",
)


def _stepped_optimizer() -> tuple[torch.nn.Module, RMSprop]:
    model = _model()
    optimizer = RMSprop(model.named_parameters(), lr=0.01, momentum=0.9, centered=True)
    _train(model, optimizer, _batches(2))
    return model, optimizer


def _corrupt(state_dict: dict, change) -> dict:
    state_dict = copy.deepcopy(state_dict)
    change(state_dict)
    return state_dict


def _other_model_state_dict(_: dict) -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    optimizer = RMSprop(model.parameters(), lr=0.01, momentum=0.9, centered=True)
    _train(model, optimizer, _batches(1))
    return optimizer.state_dict()


BAD_STATE_DICTS = {
    "other model": (_other_model_state_dict, r"parameter 0 \('0.weight'\).*'square_avg' has shape \(5, 4\)"),
    "missing square_avg": (
        lambda sd: _corrupt(sd, lambda d: d["state"][1].pop("square_avg")),
        r"parameter 1 \('0.bias'\).*'square_avg' is missing",
    ),
    "missing momentum_buffer": (
        lambda sd: _corrupt(sd, lambda d: d["state"][2].pop("momentum_buffer")),
        r"parameter 2 .*'momentum_buffer' is missing",
    ),
    "missing grad_avg": (
        lambda sd: _corrupt(sd, lambda d: d["state"][0].pop("grad_avg")),
        r"'grad_avg' is missing",
    ),
    "missing step": (lambda sd: _corrupt(sd, lambda d: d["state"][0].pop("step")), r"'step' must be"),
    "list instead of tensor": (
        lambda sd: _corrupt(sd, lambda d: d["state"][0].update(square_avg=[0.0] * 12)),
        r"'square_avg' must be a tensor, got list",
    ),
    "transposed buffer": (
        lambda sd: _corrupt(sd, lambda d: d["state"][0].update(momentum_buffer=d["state"][0]["momentum_buffer"].T)),
        r"'momentum_buffer' has shape \(4, 3\), the parameter has \(3, 4\)",
    ),
    "string lr": (lambda sd: _corrupt(sd, lambda d: d["param_groups"][0].update(lr="0.1")), r"Invalid lr"),
    "alpha out of range": (
        lambda sd: _corrupt(sd, lambda d: d["param_groups"][0].update(alpha=1.5)),
        r"Invalid alpha value",
    ),
    "non-bool flag": (
        lambda sd: _corrupt(sd, lambda d: d["param_groups"][0].update(centered="yes")),
        r"Invalid centered",
    ),
    "state of an unknown parameter": (
        lambda sd: _corrupt(sd, lambda d: d["state"].update({7: d["state"][0]})),
        r"parameter id 7",
    ),
    "group of another size": (
        lambda sd: _corrupt(sd, lambda d: d["param_groups"][0].update(params=[0, 1])),
        r"doesn't match the size",
    ),
    "no param_groups": (lambda sd: _corrupt(sd, lambda d: d.pop("param_groups")), r"no 'param_groups' entry"),
    "no state": (lambda sd: _corrupt(sd, lambda d: d.pop("state")), r"no 'state' entry"),
    "group without params": (
        lambda sd: _corrupt(sd, lambda d: d["param_groups"][0].pop("params")),
        r"param group 0 .* no 'params' entry",
    ),
    "not a dict": (lambda sd: [sd], r"must be a dict, got list"),
}


@pytest.mark.parametrize("case", BAD_STATE_DICTS)
def test_bad_state_dict_is_a_clear_error_and_changes_nothing(case):
    make_bad, message = BAD_STATE_DICTS[case]
    model, optimizer = _stepped_optimizer()
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(make_bad(optimizer.state_dict()))
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for index, p_state in after["state"].items():
        assert p_state.keys() == before["state"][index].keys()
        for key, value in p_state.items():
            assert torch.equal(value, before["state"][index][key])
    # Still bound to the model's parameters: it keeps training.
    _train(model, optimizer, _batches(1))


def test_loaded_state_takes_the_parameters_dtype():
    # As torch.optim does: floating state is cast to the parameter's dtype.
    model, optimizer = _stepped_optimizer()
    state_dict = optimizer.state_dict()
    for p_state in state_dict["state"].values():
        p_state["square_avg"] = p_state["square_avg"].double()
    optimizer.load_state_dict(state_dict)
    assert all(state["square_avg"].dtype == torch.float32 for state in optimizer.state.values())
