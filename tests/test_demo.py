"""The demo reproduces the mission document's example and agrees with torch.optim.RMSprop."""

import functools
import re
import subprocess
import sys
from pathlib import Path

import torch

from rmsprop import RMSprop
from rmsprop.tools.demo import train

ROOT = Path(__file__).resolve().parents[1]


def test_training_matches_torch_exactly_on_torchs_paths():
    assert train(functools.partial(RMSprop, fused=False), seed=3) == train(torch.optim.RMSprop, seed=3)


def test_training_with_the_default_fused_path_agrees_with_torch():
    """The default takes the fused kernel on CPU: equal to torch within float32 rounding."""
    ours, theirs = train(RMSprop, seed=3), train(torch.optim.RMSprop, seed=3)
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= 1e-6


def test_loss_goes_down():
    losses = train(RMSprop, seed=0, epochs=30)
    assert losses[-1] < 0.8 * losses[0]


def test_cli_demo_prints_every_epoch_and_the_comparison():
    result = subprocess.run([sys.executable, "-m", "rmsprop", "demo", "--seed", "1"], capture_output=True, text=True, check=True)
    epochs = re.findall(r"^Epoch \[(\d+)/10\], Loss: \d+\.\d{4}$", result.stdout, flags=re.MULTILINE)
    assert epochs == [str(k) for k in range(1, 11)]
    assert re.search(r"^Largest difference: \S+ \((bit-identical|agree)\)$", result.stdout, flags=re.MULTILINE)


def test_example_script_differs_from_the_mission_only_in_its_import():
    example = (ROOT / "examples" / "simple_net.py").read_text().splitlines()
    code = [line for line in example if not line.startswith("# ")]
    assert "import rmsprop as optim" in code
    assert "import torch.optim as optim" not in code
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "simple_net.py")], capture_output=True, text=True, check=True)
    assert len(re.findall(r"^Epoch \[\d+/10\], Loss: \d+\.\d{4}$", result.stdout, flags=re.MULTILINE)) == 10
