"""configs/experiments/: one script per claim of the README's "The claims, measured"."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "configs" / "experiments"
CLAIMS = ["temperature", "relative", "additive", "residual", "diversity"]


@pytest.mark.parametrize("claim", CLAIMS)
def test_each_experiment_is_a_bash_script_that_parses(claim):
    script = EXPERIMENTS / f"{claim}.sh"
    assert os.access(script, os.X_OK)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("claim", CLAIMS)
def test_each_experiment_runs_end_to_end_at_a_tiny_size(claim, tmp_path):
    env = dict(os.environ, ATTNLM=f"{sys.executable} -m attnlm", ITERS="4", LAYERS="2",
               EMBD="16", BLOCK="16", BATCH="2", TEMPS="0.1 10", POS="relative learned",
               SCALES="0.5 2", WEIGHTS="0 1", OFFSET="8",
               PYTHONPATH=str(EXPERIMENTS.parent.parent))
    out = tmp_path / claim
    result = subprocess.run(["bash", str(EXPERIMENTS / f"{claim}.sh"), str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = (out / "table.md").read_text().splitlines()[2:]
    assert len(rows) == 2 and (out / "loss.png").exists()
    if claim == "relative":  # the same loss at offset 0 and 8; learned positions refuse
        assert "each window at positions 8.." in result.stdout
        assert "model.pos=learned has positions 0 to 15 only" in result.stderr
