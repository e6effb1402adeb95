"""Each preset reproduces the optimizer it names.

* ``optax``, ``keras``, ``tf1``: golden vectors written by the frameworks'
  own code (``tools/make_framework_vectors.py``: optax.rmsprop, Keras 3's
  RMSprop on the torch backend, timm's RMSpropTF) are replayed with
  :meth:`RMSprop.from_preset`; with ``-m frameworks`` in ``.venv-frameworks``
  the same cases also run live against the installed frameworks.
* ``pytorch``: torch.optim.RMSprop itself, always installed.
* ``hinton``, ``graves``: no framework; the formulas of the lecture and the
  paper are written out here, in float64.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rmsprop import RMSprop
from rmsprop.core.presets import PRESET_SOURCES, PRESETS, preset_settings

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "frameworks.json").read_text())

# Where our float32 parameters may differ from a framework's: the frameworks
# order the same float32 operations differently (e.g. rsqrt, v + (1-a)(g^2 - v)),
# which moves results by a few ulp per step. The parameters are of order 1.
RTOL, ATOL = 1e-5, 1e-6

PRESET_OF = {"optax": "optax", "keras": "keras", "timm": "tf1"}

# Each framework's argument names -> ours. None: how it runs, not what it computes.
ARGUMENT_NAMES = {
    "optax": {
        "learning_rate": "lr",
        "decay": "alpha",
        "eps": "eps",
        "initial_scale": "initial_scale",
        "eps_in_sqrt": "eps_in_sqrt",
        "centered": "centered",
        "momentum": "momentum",
        "nesterov": "nesterov",
        "bias_correction": "bias_correction",
    },
    "keras": {
        "learning_rate": "lr",
        "rho": "alpha",
        "epsilon": "eps",
        "momentum": "momentum",
        "centered": "centered",
        "weight_decay": "weight_decay",
    },
    "timm": {
        "lr": "lr",
        "alpha": "alpha",
        "eps": "eps",
        "weight_decay": "weight_decay",
        "momentum": "momentum",
        "centered": "centered",
        "decoupled_decay": "decoupled_weight_decay",
        "lr_in_momentum": "lr_in_momentum",
        "foreach": None,
    },
}


def overrides_for(framework: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Our keyword arguments for a framework's, on top of its preset."""
    overrides = {}
    for name, value in kwargs.items():
        ours = ARGUMENT_NAMES[framework][name]
        if ours is None:
            continue
        # optax's momentum=None and Keras' weight_decay=None mean "off".
        overrides[ours] = 0.0 if value is None else value
    return overrides


def run_ours(settings, initial_params, grads, checkpoints, lrs=None, dtype=torch.float32):
    """Parameters of our RMSprop at each checkpoint step, for a fixed gradient sequence."""
    params = [torch.tensor(np.asarray(p), dtype=dtype) for p in initial_params]
    optimizer = RMSprop(params, **settings)
    snapshots = []
    for t, step_grads in enumerate(grads, start=1):
        if lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = lrs[t - 1]
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(np.asarray(g), dtype=dtype)
        optimizer.step()
        if t in checkpoints:
            snapshots.append([p.detach().numpy().copy() for p in params])
    return snapshots


def max_violation(ours, theirs) -> float:
    """max |ours - theirs| / (ATOL + RTOL |theirs|): at most 1 within tolerance."""
    worst = 0.0
    for our_snapshot, their_snapshot in zip(ours, theirs, strict=True):
        for a, b in zip(our_snapshot, their_snapshot, strict=True):
            a, b = a.astype(np.float64), np.asarray(b, dtype=np.float32).astype(np.float64).reshape(a.shape)
            worst = max(worst, float(np.max(np.abs(a - b) / (ATOL + RTOL * np.abs(b)))))
    return worst


def assert_close(ours, theirs, what: str) -> None:
    for step, our_snapshot, their_snapshot in zip(GOLDEN["checkpoints"], ours, theirs, strict=True):
        for index, (a, b) in enumerate(zip(our_snapshot, their_snapshot, strict=True)):
            b = np.asarray(b, dtype=np.float32).reshape(np.shape(a))
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"{what}: tensor {index} after step {step}")


def golden_grads() -> list[list[np.ndarray]]:
    shapes = GOLDEN["shapes"]
    return [[np.asarray(g, dtype=np.float32).reshape(s) for g, s in zip(step, shapes)] for step in GOLDEN["grads"]]


def golden_initial_params() -> list[np.ndarray]:
    return [np.asarray(p, dtype=np.float32).reshape(s) for p, s in zip(GOLDEN["initial_params"], GOLDEN["shapes"])]


def case_id(case: dict[str, Any]) -> str:
    return f"{case['framework']}-{case['name']}"


# --- golden vectors: always run -------------------------------------------


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("case", GOLDEN["cases"], ids=case_id)
def test_preset_replays_framework_golden_vectors(case, foreach):
    framework = case["framework"]
    settings = preset_settings(PRESET_OF[framework], **overrides_for(framework, case["kwargs"]), foreach=foreach)
    ours = run_ours(settings, golden_initial_params(), golden_grads(), GOLDEN["checkpoints"], case["lr_schedule"])
    assert_close(ours, case["params"], case_id(case))


def preset_value(preset: str, name: str) -> Any:
    """What preset ``preset`` sets ``name`` to, explicitly or by our default."""
    return PRESETS[preset].get(name, inspect.signature(RMSprop).parameters[name].default)


@pytest.mark.parametrize("framework", sorted(PRESET_OF))
def test_preset_equals_framework_defaults(framework):
    """The preset's values are the framework's defaults, as recorded from its signature."""
    for name, default in GOLDEN["defaults"][framework].items():
        ours = ARGUMENT_NAMES[framework][name]
        actual = preset_value(PRESET_OF[framework], ours)
        expected = 0.0 if default is None else default
        assert actual == expected, f"{framework}: preset {ours}={actual!r}, framework default {name}={default!r}"


def test_golden_cases_move_the_parameters_far_beyond_the_tolerance():
    """A replay that did nothing would fail: every case moves some parameter by > 1000 x ATOL."""
    initial = golden_initial_params()
    for case in GOLDEN["cases"]:
        final = case["params"][-1]
        moved = max(float(np.max(np.abs(np.asarray(f) - p.ravel()))) for f, p in zip(final, initial))
        assert moved > 1000 * ATOL, case_id(case)


# The preset conventions that the golden cases pin down, and the wrong value of each.
CONVENTIONS = {
    "eps_in_sqrt": lambda value: not value,
    "lr_in_momentum": lambda value: not value,
    "initial_scale": lambda value: 1.0 - value,
    "decoupled_weight_decay": lambda value: not value,
    "alpha": lambda value: 0.99 if value != 0.99 else 0.9,
    "eps": lambda value: value * 100,
}


@pytest.mark.parametrize(
    "framework, convention",
    # optax.rmsprop has no weight decay.
    [(f, c) for f in sorted(PRESET_OF) for c in sorted(CONVENTIONS) if (f, c) != ("optax", "decoupled_weight_decay")],
)
def test_golden_cases_tell_each_convention_apart(framework, convention):
    """With one convention of the preset switched, some case of the framework fails."""
    worst = 0.0
    for case in GOLDEN["cases"]:
        if case["framework"] != framework:
            continue
        settings = preset_settings(PRESET_OF[framework], **overrides_for(framework, case["kwargs"]))
        current = settings.get(convention, preset_value(PRESET_OF[framework], convention))
        settings[convention] = CONVENTIONS[convention](current)
        ours = run_ours(settings, golden_initial_params(), golden_grads(), GOLDEN["checkpoints"], case["lr_schedule"])
        worst = max(worst, max_violation(ours, case["params"]))
    assert worst > 10, f"switching {convention} stays within tolerance of every {framework} case"


# --- live against the frameworks: pytest -m frameworks ----------------------


def _vector_tools():
    path = ROOT / "tools" / "make_framework_vectors.py"
    spec = importlib.util.spec_from_file_location("make_framework_vectors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VECTORS = _vector_tools()


def _require(framework: str) -> None:
    if framework != "timm":
        pytest.importorskip(framework)
        return
    try:
        VECTORS.load_timm_rmsprop_tf()
    except ModuleNotFoundError as error:
        pytest.skip(f"timm's RMSpropTF cannot be imported: {error}")


@pytest.mark.frameworks
# Keras' own convert_to_numpy warns under NumPy 2.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:keras")
@pytest.mark.parametrize(
    "framework, kwargs, base_lr",
    [(framework, kwargs, base_lr) for framework, _, kwargs, base_lr in VECTORS.CASES],
    ids=[f"{framework}-{name}" for framework, name, _, _ in VECTORS.CASES],
)
def test_preset_matches_framework_live(framework, kwargs, base_lr):
    """The golden cases again, live, on a problem with another seed."""
    _require(framework)
    problem = VECTORS.make_problem(seed=1)
    lrs = VECTORS.schedule(base_lr)
    theirs = VECTORS.run_case(framework, kwargs, problem, lrs=lrs)
    settings = preset_settings(PRESET_OF[framework], **overrides_for(framework, kwargs))
    ours = run_ours(settings, problem["params"], problem["grads"], VECTORS.CHECKPOINTS, lrs)
    assert_close(ours, theirs, f"{framework} {kwargs}")


@pytest.mark.frameworks
@pytest.mark.parametrize("framework", sorted(PRESET_OF))
def test_framework_defaults_are_the_recorded_ones(framework):
    """The installed framework has the defaults the golden file was made with."""
    _require(framework)
    assert VECTORS.framework_defaults(framework) == GOLDEN["defaults"][framework]


# --- pytorch: torch.optim.RMSprop ------------------------------------------

TORCH_SETTINGS = [
    {},
    {"momentum": 0.9},
    {"centered": True},
    {"weight_decay": 0.1},
    {"lr": 1e-3, "alpha": 0.9, "eps": 1e-6, "momentum": 0.5, "centered": True, "weight_decay": 0.01},
    {"maximize": True, "momentum": 0.9},
]


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("overrides", TORCH_SETTINGS, ids=str)
def test_pytorch_preset_is_torch_optim_rmsprop_bit_for_bit(overrides, foreach):
    initial, grads = golden_initial_params(), golden_grads()
    ours = [torch.tensor(p) for p in initial]
    theirs = [torch.tensor(p) for p in initial]
    our_optimizer = RMSprop.from_preset("pytorch", ours, foreach=foreach, **overrides)
    their_optimizer = torch.optim.RMSprop(theirs, foreach=foreach, **overrides)
    for t, step_grads in enumerate(grads, start=1):
        for a, b, g in zip(ours, theirs, step_grads):
            a.grad, b.grad = torch.tensor(g), torch.tensor(g)
        our_optimizer.step()
        their_optimizer.step()
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), f"tensor {index} differs after step {t}"


def test_pytorch_preset_has_torch_defaults():
    torch_defaults = torch.optim.RMSprop([torch.zeros(1)]).defaults
    for name, value in PRESETS["pytorch"].items():
        assert torch_defaults[name] == value, name


# --- hinton and graves: the formulas, written out ---------------------------


def _float64_problem():
    initial = [p.astype(np.float64) for p in golden_initial_params()]
    grads = [[g.astype(np.float64) for g in step] for step in golden_grads()]
    return initial, grads


def _close_float64(ours, expected) -> None:
    for snapshot, expected_snapshot in zip(ours, expected, strict=True):
        for a, b in zip(snapshot, expected_snapshot, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_hinton_preset_follows_the_lecture(foreach):
    """MeanSquare = 0.9 MeanSquare + 0.1 g^2; w -= lr g / sqrt(MeanSquare + eps), lr 1e-3, eps 1e-8."""
    initial, grads = _float64_problem()
    expected = []
    w = [p.copy() for p in initial]
    mean_square = [np.zeros_like(p) for p in initial]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            mean_square[i] = 0.9 * mean_square[i] + 0.1 * g**2
            w[i] = w[i] - 1e-3 * g / np.sqrt(mean_square[i] + 1e-8)
        expected.append([p.copy() for p in w])
    checkpoints = range(1, len(grads) + 1)
    ours = run_ours(
        preset_settings("hinton", foreach=foreach), initial, grads, checkpoints, dtype=torch.float64
    )
    _close_float64(ours, expected)


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_graves_preset_follows_eq_38_to_41(foreach):
    """Graves (2013), eq. 38-41, with aleph=0.95, beth=0.9, gimel=1e-4, daleth=1e-4:

    n = aleph n + (1-aleph) e^2;  g = aleph g + (1-aleph) e;
    Delta = beth Delta - gimel e / sqrt(n - g^2 + daleth);  w = w + Delta.
    """
    aleph, beth, gimel, daleth = 0.95, 0.9, 1e-4, 1e-4
    initial, grads = _float64_problem()
    expected = []
    w = [p.copy() for p in initial]
    n = [np.zeros_like(p) for p in initial]
    g = [np.zeros_like(p) for p in initial]
    delta = [np.zeros_like(p) for p in initial]
    for step_grads in grads:
        for i, e in enumerate(step_grads):
            n[i] = aleph * n[i] + (1 - aleph) * e**2
            g[i] = aleph * g[i] + (1 - aleph) * e
            delta[i] = beth * delta[i] - gimel * e / np.sqrt(n[i] - g[i] ** 2 + daleth)
            w[i] = w[i] + delta[i]
        expected.append([p.copy() for p in w])
    checkpoints = range(1, len(grads) + 1)
    ours = run_ours(
        preset_settings("graves", foreach=foreach), initial, grads, checkpoints, dtype=torch.float64
    )
    _close_float64(ours, expected)


# --- the registry itself ----------------------------------------------------


@pytest.mark.parametrize("lookup", [preset_settings, lambda name: RMSprop.from_preset(name, [torch.zeros(2)])])
def test_unknown_preset_is_a_value_error_listing_the_valid_names(lookup):
    with pytest.raises(ValueError, match="Unknown preset 'adam'") as excinfo:
        lookup("adam")
    for name in PRESETS:
        assert name in str(excinfo.value)


def test_presets_are_read_only():
    with pytest.raises(TypeError):
        PRESETS["mine"] = {"lr": 1.0}
    with pytest.raises(TypeError):
        PRESETS["keras"]["lr"] = 1.0
    with pytest.raises(TypeError):
        PRESET_SOURCES["keras"] = "mine"


def test_every_preset_has_a_source_and_builds_an_optimizer():
    assert set(PRESET_SOURCES) == set(PRESETS)
    for name, settings in PRESETS.items():
        defaults = RMSprop.from_preset(name, [torch.zeros(2)]).defaults
        assert {key: defaults[key] for key in settings} == dict(settings)


def test_overrides_replace_preset_values_and_keep_the_rest():
    optimizer = RMSprop.from_preset("keras", [torch.zeros(2)], lr=0.5, momentum=0.9, centered=True)
    defaults = optimizer.defaults
    assert (defaults["lr"], defaults["momentum"], defaults["centered"]) == (0.5, 0.9, True)
    assert (defaults["alpha"], defaults["eps"], defaults["eps_in_sqrt"]) == (0.9, 1e-7, True)
    assert PRESETS["keras"]["lr"] == 1e-3
    assert "momentum" not in PRESETS["keras"]


def test_overrides_are_validated():
    with pytest.raises(ValueError, match="eps"):
        RMSprop.from_preset("tf1", [torch.zeros(2)], eps=-1.0)
    with pytest.raises(TypeError):
        RMSprop.from_preset("tf1", [torch.zeros(2)], rho=0.9)
