"""Golden vectors from the frameworks' own RMSProp: optax, Keras 3 and timm's RMSpropTF.

Runs each framework's optimizer on one fixed problem (three float32 tensors of
different shapes and a fixed sequence of gradients, so every framework sees
exactly the same inputs) for several settings, and writes the parameters at a
few checkpoints to ``tests/golden/frameworks.json``. ``tests/test_presets.py``
replays every case with :meth:`rmsprop.RMSprop.from_preset` and, where the
frameworks are installed, also runs them live through :func:`run_case`.

Needs the frameworks, which the project itself does not depend on: run it as
``make golden``, which builds ``.venv-frameworks`` (torch CPU, jax, optax,
keras, and timm installed with ``--no-deps``: timm's own ``__init__`` imports
torchvision, whose PyPI wheel does not load against the CPU build of torch, so
only ``timm/optim/rmsprop_tf.py`` is loaded, see :func:`load_timm_rmsprop_tf`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import sys
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Both must be set before jax and keras are first imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "torch")

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "golden" / "frameworks.json"
SHAPES = ((4,), (2, 3), (2, 2, 2))
STEPS = 30
CHECKPOINTS = (1, 2, 3, 5, 10, 20, 30)

# A step schedule (x1, x0.1, x0.01 of the base rate): where the learning rate
# changes, keeping it inside the momentum buffer or not gives different steps.
LR_DROPS = tuple(1.0 if t <= 10 else 0.1 if t <= 20 else 0.01 for t in range(1, STEPS + 1))

# (framework, case name, keyword arguments of the framework's own optimizer,
# base learning rate of a stepwise schedule or None). Each framework runs its
# defaults first; the rest switch on what it supports.
CASES: tuple[tuple[str, str, dict[str, Any], float | None], ...] = (
    # optax.rmsprop has no default learning rate.
    ("optax", "defaults", {"learning_rate": 1e-3}, None),
    ("optax", "momentum", {"learning_rate": 1e-3, "momentum": 0.9}, None),
    ("optax", "nesterov", {"learning_rate": 1e-3, "momentum": 0.9, "nesterov": True}, None),
    ("optax", "centered", {"learning_rate": 1e-3, "centered": True}, None),
    ("optax", "centered_momentum", {"learning_rate": 3e-3, "decay": 0.95, "centered": True, "momentum": 0.5}, None),
    ("optax", "eps_outside_sqrt", {"learning_rate": 1e-3, "eps_in_sqrt": False}, None),
    ("optax", "initial_scale", {"learning_rate": 1e-2, "initial_scale": 1.0, "eps": 1e-10}, None),
    ("optax", "bias_correction", {"learning_rate": 1e-3, "bias_correction": True}, None),
    ("optax", "bias_correction_nesterov", {"learning_rate": 1e-3, "bias_correction": True, "momentum": 0.9, "nesterov": True}, None),
    # No case is both centered and bias-corrected: the variance estimate v/c - (m/c)^2
    # at step 1 is g^2 - g^2, all rounding, which float32 programs do not share
    # (optax gives NaN where it comes out negative; we clamp it at 0).
    ("optax", "momentum_schedule", {"momentum": 0.9}, 1e-2),
    ("optax", "nesterov_schedule", {"momentum": 0.9, "nesterov": True}, 1e-2),
    ("keras", "defaults", {}, None),
    ("keras", "momentum", {"momentum": 0.9}, None),
    ("keras", "centered", {"centered": True}, None),
    ("keras", "centered_momentum", {"rho": 0.95, "epsilon": 1e-6, "centered": True, "momentum": 0.5}, None),
    ("keras", "weight_decay", {"learning_rate": 1e-2, "weight_decay": 0.5}, None),
    (
        "keras",
        "weight_decay_centered_momentum",
        {"learning_rate": 3e-3, "weight_decay": 0.2, "centered": True, "momentum": 0.9},
        None,
    ),
    ("keras", "momentum_weight_decay_schedule", {"momentum": 0.9, "weight_decay": 0.5}, 1e-2),
    ("timm", "defaults", {}, None),
    ("timm", "momentum", {"momentum": 0.9}, None),
    ("timm", "centered", {"centered": True}, None),
    ("timm", "centered_momentum", {"lr": 1e-3, "alpha": 0.95, "eps": 1e-6, "centered": True, "momentum": 0.9}, None),
    ("timm", "momentum_lr_outside", {"momentum": 0.9, "lr_in_momentum": False}, None),
    ("timm", "weight_decay", {"weight_decay": 0.1}, None),
    ("timm", "decoupled_decay", {"weight_decay": 0.5, "decoupled_decay": True}, None),
    # With initial_scale 1, eps only matters once square_avg has decayed.
    ("timm", "fast_decay_large_eps", {"alpha": 0.5, "eps": 1e-3}, None),
    ("timm", "foreach", {"momentum": 0.9, "centered": True, "weight_decay": 0.1, "foreach": True}, None),
    ("timm", "momentum_schedule", {"momentum": 0.9}, 1e-2),
    ("timm", "momentum_lr_outside_schedule", {"momentum": 0.9, "lr_in_momentum": False}, 1e-2),
)

# The Python packages whose versions are recorded with each framework's vectors.
PACKAGES = {"optax": ("optax", "jax", "jaxlib"), "keras": ("keras", "torch"), "timm": ("timm", "torch")}

# The arguments of each framework's optimizer that have a default and set the update rule.
RULE_ARGUMENTS = {
    "optax": ("decay", "eps", "initial_scale", "eps_in_sqrt", "centered", "momentum", "nesterov", "bias_correction"),
    "keras": ("learning_rate", "rho", "momentum", "epsilon", "centered", "weight_decay"),
    "timm": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "decoupled_decay", "lr_in_momentum"),
}


def make_problem(seed: int = 0, steps: int = STEPS) -> dict[str, Any]:
    """Initial parameters and a gradient sequence, as float32 arrays.

    The gradients have a non-zero mean (so the centered variants differ from
    the plain ones) and three scales: order 1; order 1e-4, where ``eps`` is as
    large as the second moment and its placement matters; and a scale that
    changes by orders of magnitude from step to step.
    """
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
    means = [rng.standard_normal(shape) for shape in SHAPES]
    step_scales = 10.0 ** rng.uniform(-3, 1, size=steps)
    grads = []
    for t in range(steps):
        scales = (1.0, 1e-4, step_scales[t])
        grads.append(
            [
                (scale * (mean + rng.standard_normal(mean.shape))).astype(np.float32)
                for scale, mean in zip(scales, means)
            ]
        )
    return {"params": params, "grads": grads}


def run_optax(kwargs, problem, checkpoints, lrs=None) -> list[list[np.ndarray]]:
    import jax
    import jax.numpy as jnp
    import optax

    if lrs is not None:
        schedule = jnp.asarray(lrs, dtype=jnp.float32)
        kwargs = {**kwargs, "learning_rate": lambda count: schedule[count]}
    tx = optax.rmsprop(**kwargs)
    update = jax.jit(tx.update)
    params = [jnp.asarray(p) for p in problem["params"]]
    state = tx.init(params)
    snapshots = []
    for t, grads in enumerate(problem["grads"], start=1):
        updates, state = update([jnp.asarray(g) for g in grads], state, params)
        params = optax.apply_updates(params, updates)
        if t in checkpoints:
            snapshots.append([np.asarray(p) for p in params])
    return snapshots


def run_keras(kwargs, problem, checkpoints, lrs=None) -> list[list[np.ndarray]]:
    import keras
    import torch

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}; set KERAS_BACKEND=torch before importing it")
    optimizer = keras.optimizers.RMSprop(**kwargs)
    variables = [keras.Variable(p) for p in problem["params"]]
    snapshots = []
    for t, grads in enumerate(problem["grads"], start=1):
        if lrs is not None:
            optimizer.learning_rate = lrs[t - 1]
        optimizer.apply_gradients(zip([torch.from_numpy(g) for g in grads], variables))
        if t in checkpoints:
            snapshots.append([keras.ops.convert_to_numpy(v) for v in variables])
    return snapshots


def load_timm_rmsprop_tf() -> types.ModuleType:
    """``timm.optim.rmsprop_tf`` without running ``timm/__init__.py``.

    timm's package init imports its models and so torchvision; the optimizer
    needs only torch. Bare package modules stand in for ``timm`` and
    ``timm.optim`` so that the file's relative imports resolve.
    """
    if "timm.optim.rmsprop_tf" in sys.modules:
        return sys.modules["timm.optim.rmsprop_tf"]
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'timm'", name="timm")
    package_dir = Path(spec.submodule_search_locations[0])
    for name, path in (("timm", package_dir), ("timm.optim", package_dir / "optim")):
        if name not in sys.modules:
            module_spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            module_spec.submodule_search_locations = [str(path)]
            sys.modules[name] = importlib.util.module_from_spec(module_spec)
    return importlib.import_module("timm.optim.rmsprop_tf")


def run_timm(kwargs, problem, checkpoints, lrs=None) -> list[list[np.ndarray]]:
    import torch

    params = [torch.tensor(p) for p in problem["params"]]
    optimizer = load_timm_rmsprop_tf().RMSpropTF(params, **kwargs)
    snapshots = []
    for t, grads in enumerate(problem["grads"], start=1):
        if lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = lrs[t - 1]
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        optimizer.step()
        if t in checkpoints:
            snapshots.append([p.detach().numpy().copy() for p in params])
    return snapshots


RUNNERS: dict[str, Callable[..., list[list[np.ndarray]]]] = {"optax": run_optax, "keras": run_keras, "timm": run_timm}


def run_case(framework, kwargs, problem, checkpoints=CHECKPOINTS, lrs=None) -> list[list[np.ndarray]]:
    """The parameters after each checkpoint step of the framework's own optimizer.

    ``lrs``, if given, is the learning rate of each step, set between steps as
    a user or a schedule would.
    """
    return RUNNERS[framework](kwargs, problem, checkpoints, lrs)


def schedule(base_lr: float | None) -> list[float] | None:
    return None if base_lr is None else [base_lr * drop for drop in LR_DROPS]


def framework_defaults(framework: str) -> dict[str, Any]:
    """The defaults of the framework optimizer's arguments that set the update rule."""
    if framework == "optax":
        import optax

        function = optax.rmsprop
    elif framework == "keras":
        import keras

        function = keras.optimizers.RMSprop.__init__
    else:
        function = load_timm_rmsprop_tf().RMSpropTF.__init__
    parameters = inspect.signature(function).parameters
    return {name: parameters[name].default for name in RULE_ARGUMENTS[framework]}


def versions(framework: str) -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in PACKAGES[framework]}


def _to_json(arrays: list[np.ndarray]) -> list[list[float]]:
    # float32's shortest repr reads back as the same float32: compact and exact.
    return [[float(str(x)) for x in np.asarray(a, dtype=np.float32).ravel()] for a in arrays]


def build(frameworks: list[str], seed: int) -> dict[str, Any]:
    problem = make_problem(seed)
    cases = []
    for framework, name, kwargs, base_lr in CASES:
        if framework not in frameworks:
            continue
        lrs = schedule(base_lr)
        snapshots = run_case(framework, kwargs, problem, lrs=lrs)
        cases.append(
            {
                "framework": framework,
                "name": name,
                "kwargs": kwargs,
                "lr_schedule": lrs,
                "params": [_to_json(snapshot) for snapshot in snapshots],
            }
        )
        print(f"{framework:6s} {name}")
    return {
        "description": "Parameters of each framework's own RMSProp on one fixed problem; see tools/make_framework_vectors.py",
        "python": platform.python_version(),
        "versions": {framework: versions(framework) for framework in frameworks},
        "defaults": {framework: framework_defaults(framework) for framework in frameworks},
        "seed": seed,
        "shapes": [list(shape) for shape in SHAPES],
        "checkpoints": list(CHECKPOINTS),
        "initial_params": _to_json(problem["params"]),
        "grads": [_to_json(grads) for grads in problem["grads"]],
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frameworks", nargs="+", choices=sorted(RUNNERS), default=sorted(RUNNERS))
    args = parser.parse_args(argv)
    golden = build(args.frameworks, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"wrote {len(golden['cases'])} cases to {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
