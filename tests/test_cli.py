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


def test_eval_keeps_freed_memory_for_its_next_batch(trained, monkeypatch):
    """As training does (see runtime.keep_freed_memory), before the first batch."""
    calls = []
    monkeypatch.setattr("attnlm.evaluate.keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr("attnlm.evaluate.split_loss",
                        lambda *args, **kw: calls.append(2) or 1.0)
    assert run("eval", trained[0], "--json").exit_code == 0 and calls == [1, 2]


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
    (["train", "--config", "missing.yaml"], 2, "--config missing.yaml: no such file, and no recipe"),
    (["train", "--set", "data.source=/no/such/file.txt"], 2, "no such file or folder"),
    (["generate", "/no/such/run"], 2, "no such run directory or checkpoint"),
    (["eval", "/no/such/run"], 2, "no such run directory or checkpoint"),
])
def test_expected_errors_are_one_line_with_exit_code(tmp_path, args, code, message):
    result = run(*args, "--out", tmp_path / "r") if args[0] == "train" else run(*args)
    assert result.exit_code == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_a_bad_value_in_the_checkpoints_own_config_is_named_as_its_key(trained, tmp_path):
    from attnlm import checkpoint

    saved = checkpoint.load(trained[0] / "checkpoint.pt")
    saved["config"]["train"]["threads"] = 2000
    checkpoint.save(saved, tmp_path / "checkpoint.pt")
    result = run("generate", tmp_path, "--threads", 1, "--top-k", 5)
    assert result.exit_code == 2 and "error: train.threads=2000 must be at most 1024" in result.stderr


def test_eval_names_the_source_option_and_what_it_could_not_read(trained, tmp_path):
    result = run("eval", trained[0], "--source", tmp_path / "nope.txt")
    assert result.exit_code == 2 and result.stderr.startswith("error: --source '")
    result = run("eval", trained[0], "--source", "")  # not the val split
    assert result.exit_code == 2 and result.stderr.startswith("error: --source is empty")
    (tmp_path / "e").write_text("$$$ and more text than the window " * 4)  # a short name too
    result = run("eval", trained[0], "--source", tmp_path / "e")
    assert result.exit_code == 2 and f"--source '{tmp_path / 'e'}': text has characters " \
        "not in the vocabulary: '$'" in result.stderr


def test_resume_without_out_says_to_name_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("train", "--resume")
    assert result.exit_code == 2
    assert "no run in runs/default, the default --out for this config" in result.stderr


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


@pytest.mark.parametrize("args, message", [
    # Each names the option typed, not the config value it sets.
    (["--device", "mps"], "error: --device 'mps' must be one of auto, cpu, cuda or cuda:N"),
    (["--device", "foo"], "--device 'foo' must be one of"),
    (["--threads", "-1"], "--threads -1 must not be negative"),
    (["--top-p", "1e-300"], "--top-p 1e-300 must be in [0.0001, 1]"),
    (["--repetition-penalty", "1e-300"], "--repetition-penalty 1e-300 must be in [0.01, 100]"),
    (["--temperature", "1e-300"], "--temperature 1e-300 must be 0 (greedy) or at least"),
    (["--max-new-tokens", str(10**30)], "must be at most 100,000,000 tokens"),
    (["--num-samples", "0"], "--num-samples 0 must be positive"),
    (["--seed", str(2**70)], "--seed 1180591620717411303424 must be in [0, 2**64 - 1]"),
])
def test_bad_generate_options_are_one_line_exit_2(trained, args, message):
    result = run("generate", trained[0], "--prompt", "line", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_cuda_device_this_machine_lacks_is_one_line_exit_2(trained):
    import torch

    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 1}"
    for command in ("generate", "eval"):
        result = run(command, trained[0], "--device", missing)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
        assert "does not exist" in result.stderr or "no CUDA device" in result.stderr


def test_generate_options_override_the_runs_sample_config(trained):
    run_dir, _ = trained
    greedy = run("generate", run_dir, "--prompt", "line", "--max-new-tokens", 12,
                 "--temperature", 0, "--json")
    assert greedy.exit_code == 0, greedy.output
    (sample,) = json.loads(greedy.stdout)["samples"]
    assert sample["tokens"] == 12  # not the run's sample.max_new_tokens (200)
    again = run("generate", run_dir, "--prompt", "line", "--max-new-tokens", 12,
                "--temperature", 0, "--seed", 99, "--json")
    assert json.loads(again.stdout)["samples"] == [sample]  # greedy: the seed changes nothing


def test_generate_into_a_closed_pipe_exits_quietly(trained):
    """`attnlm generate RUN | head -c 1`: the reader leaves; no traceback, no internal error."""
    proc = subprocess.Popen([sys.executable, "-m", "attnlm", "generate", str(trained[0]),
                             "--prompt", "line", "--max-new-tokens", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes anything: its first write meets a closed pipe
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and stderr == ""


def test_attention_map_into_an_unwritable_place_is_one_line(trained, tmp_path):
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("eval", trained[0], "--attention-map", blocker / "maps")
    assert result.exit_code == 2, result.output
    assert f"cannot create folder {blocker / 'maps'}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_prompt_longer_than_the_window_warns_and_keeps_its_end(trained):
    long = "line 1: the quick brown fox jumps over the lazy dog. " * 2  # 106 characters
    result = run("generate", trained[0], "--prompt", long, "--max-new-tokens", 3, "--temperature", 0)
    assert result.exit_code == 0, result.output
    assert result.stderr == ("warning: the prompt is 106 tokens, longer than the model's 32-token "
                             "window; keeping its last 32\n")
    end = run("generate", trained[0], "--prompt", long[-32:], "--max-new-tokens", 3, "--temperature", 0)
    assert result.stdout[len(long):] == end.stdout[32:]  # the same continuation as from the end


@pytest.mark.parametrize("rank, says", [("0", True), ("1", False)])
def test_only_train_runs_under_torchrun(trained, monkeypatch, rank, says):
    """One machine's two processes: its first says it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    result = run("eval", trained[0])
    assert result.exit_code == 2
    assert ("attnlm eval runs in one process" in result.output) == says
    assert "Traceback" not in result.output


def test_sigterm_stops_any_command_as_ctrl_c_does(trained):
    # Training has its own handler; the other commands take SIGTERM as Ctrl-C: exit 130, and
    # what they were writing is cleaned up on the way out.
    proc = subprocess.Popen([sys.executable, "-m", "attnlm", "generate", str(trained[0]),
                             "--max-new-tokens", "100000000", "--prompt", "line"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.read(4) == "line"  # generating
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "interrupted"
