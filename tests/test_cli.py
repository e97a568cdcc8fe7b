import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from attnlm.cli import cli
from tests.helpers import TINY, text_file


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def sets(*overrides):
    return [x for o in overrides for x in ("--set", o)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    result = run("train", *sets(f"data.source={text_file(tmp)}", *TINY), "--out", tmp / "run", "--json")
    assert result.exit_code == 0, result.output
    return tmp / "run", json.loads(result.stdout)


def test_train_prints_a_json_summary(trained):
    run_dir, summary = trained
    assert summary["steps"] == 20 and summary["out"] == str(run_dir)
    assert (run_dir / "config.yaml").exists()


def test_generate_from_run_and_from_checkpoint_file(trained):
    run_dir, _ = trained
    a = run("generate", run_dir, "--prompt", "line", "--max-new-tokens", 20, "--seed", 3)
    b = run("generate", run_dir / "checkpoint.pt", "--prompt", "line", "--max-new-tokens", 20, "--seed", 3)
    assert a.exit_code == 0, a.output
    assert a.stdout.startswith("line") and a.stdout == b.stdout


def test_eval_reports_loss_perplexity_bits_per_byte(trained):
    run_dir, _ = trained
    result = run("eval", run_dir, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["perplexity"] == pytest.approx(2.718281828 ** report["loss"], rel=1e-6)
    # chars of ASCII text: one byte per token, so bits per byte is loss / ln 2
    assert report["bits_per_byte"] == pytest.approx(report["loss"] / 0.693147181, rel=1e-6)


def test_eval_on_another_source(trained, tmp_path):
    run_dir, _ = trained
    other = tmp_path / "other.txt"
    other.write_text("the lazy dog jumps over the quick brown fox.\n" * 5)
    result = run("eval", run_dir, "--source", other, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tokens"] == 5 * 45


@pytest.mark.parametrize("args, code, message", [
    (["train", "--set", "model.n_heads=2"], 2, "did you mean 'model.n_head'"),
    (["train", "--set", "model.n_embd=100", "--set", "model.n_head=3"], 2, "not divisible"),
    (["train", "--config", "missing.yaml"], 2, "cannot read config missing.yaml"),
    (["train", "--set", "data.source=/no/such/file.txt"], 2, "no such file or folder"),
    (["generate", "/no/such/run"], 2, "no such run directory or checkpoint"),
    (["eval", "/no/such/run"], 2, "no such run directory or checkpoint"),
])
def test_expected_errors_are_one_line_with_exit_code(tmp_path, args, code, message):
    result = run(*args, "--out", tmp_path / "r") if args[0] == "train" else run(*args)
    assert result.exit_code == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_corrupt_checkpoint_exits_1(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    result = run("eval", tmp_path)
    assert result.exit_code == 1 and "not a readable attnlm checkpoint" in result.stderr


def test_unknown_character_in_prompt_exits_2(trained):
    result = run("generate", trained[0], "--prompt", "Zebra€")
    assert result.exit_code == 2 and "not in the vocabulary" in result.stderr


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "attnlm", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "generate" in result.stdout


def test_triton_without_cuda_is_a_config_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = run("train", "--set", "model.attention=triton", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "needs" in result.stderr, result.output
    assert not (tmp_path / "r" / "config.yaml").exists()
