"""The run directory: lock, files, metrics, summaries, runs that do not belong together."""

import json
import os
import shutil

import pytest
import yaml

from attnlm import checkpoint, run
from attnlm.errors import AttnlmError, InputError
from attnlm.files import HOST
from attnlm.train import resume_config, train
from tests.helpers import text_file, tiny_config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    source = text_file(tmp)
    train(tiny_config(source, "train.max_iters=2"), tmp / "a", quiet=True)
    train(tiny_config(source, "train.max_iters=2", "model.n_layer=1"), tmp / "b", quiet=True)
    return tmp / "a", tmp / "b"


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_second_process_is_refused(tmp_path):
    with run.lock(tmp_path / "r"):
        with pytest.raises(InputError, match="in use by another attnlm process"):
            with run.lock(tmp_path / "r"):
                pass


def test_a_failed_start_leaves_no_directory_it_created(tmp_path):
    with pytest.raises(InputError):
        with run.lock(tmp_path / "runs" / "r"):
            raise InputError("refused")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_start_leaves_an_existing_directory(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(InputError):
        with run.lock(tmp_path / "r"):
            raise InputError("refused")
    assert (tmp_path / "r").is_dir()


def test_an_out_whose_parent_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="cannot create the run directory"):
        with run.lock(tmp_path / "f" / "r"):
            pass


def test_the_lock_clears_temp_files_of_killed_writers(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    # A temp named after a live process (our parent): only the run lock says it is stale.
    stale = out / f".checkpoint.pt.tmp-{os.getppid()}@{HOST}"
    stale.write_bytes(b"half a checkpoint")
    (out / "checkpoint.pt").write_bytes(b"kept")
    with run.lock(out):
        assert not stale.exists() and (out / "checkpoint.pt").exists()


def write_lines(path, lines):
    path.write_text("".join(lines))


def test_a_torn_last_metrics_line_is_left_out_and_repaired(tmp_path):
    path = tmp_path / run.METRICS
    write_lines(path, ['{"step": 1, "loss": 2.0}\n', '{"step": 2, "loss": 1.5}\n', '{"step": 3, "lo'])
    assert [r["step"] for r in run.read_metrics(tmp_path)] == [1, 2]
    run.MetricsLog(tmp_path).resume(step=1)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'


def test_a_damaged_metrics_line_inside_the_file_is_an_error(tmp_path):
    write_lines(tmp_path / run.METRICS, ['{"step": 1}\n', 'garbage\n', '{"step": 2}\n'])
    with pytest.raises(AttnlmError, match="line 2 is not a metrics record"):
        run.read_metrics(tmp_path)


def test_the_metrics_rewrite_on_resume_is_whole_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / run.METRICS
    before = '{"step": 1}\n{"step": 2}\n'
    path.write_text(before)

    def crash(fd):
        raise OSError(5, "Input/output error")  # the machine goes down before the rename

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(AttnlmError, match="cannot write .*metrics.jsonl: Input/output error"):
        run.MetricsLog(tmp_path).resume(step=1)
    assert path.read_text() == before


def test_summaries_are_valid_json_or_refused(tmp_path):
    run.write_summary(tmp_path, {"val_loss": None, "steps": 3})
    assert run.read_summary(tmp_path) == {"val_loss": None, "steps": 3}
    with pytest.raises(ValueError):
        run.write_summary(tmp_path, {"val_loss": float("nan")})
    assert run.read_summary(tmp_path) == {"val_loss": None, "steps": 3}
    assert run.read_summary(tmp_path / "missing") is None


def test_a_cuda_only_backend_runs_as_tiled_on_the_cpu_and_says_so(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ckpt = checkpoint.load(two_runs[0] / run.CHECKPOINT)
    ckpt["config"]["model"]["attention"] = "triton"
    checkpoint.save(ckpt, tmp_path / "triton.pt")
    model, _, cfg, _ = run.load_model(tmp_path / "triton.pt", "cpu")
    assert cfg.model.attention == "tiled"
    assert "model.attention='triton' needs CUDA; running it with 'tiled'" in capsys.readouterr().err


def test_a_checkpoint_copied_from_another_run_is_refused(two_runs, tmp_path):
    a, b = two_runs
    target = copy_run(a, tmp_path / "a")
    shutil.copy(b / run.CHECKPOINT, target / run.CHECKPOINT)
    with pytest.raises(InputError, match="does not belong with config.yaml: model.n_layer=1"):
        resume_config(target, None, ["train.max_iters=4"])


def test_a_checkpoint_with_another_tokenizer_is_refused(two_runs, tmp_path):
    target = copy_run(two_runs[0], tmp_path / "a")
    state = json.loads((target / run.TOKENIZER).read_text())
    state["chars"] = state["chars"][::-1]
    (target / run.TOKENIZER).write_text(json.dumps(state))
    with pytest.raises(InputError, match="does not belong with tokenizer.json"):
        resume_config(target, None, ["train.max_iters=4"])


def test_hand_edits_to_config_yaml_are_ignored_and_said(two_runs, tmp_path, capsys):
    target = copy_run(two_runs[0], tmp_path / "a")
    tree = yaml.safe_load((target / run.CONFIG).read_text())
    tree["train"]["lr"] = 0.5
    (target / run.CONFIG).write_text(yaml.safe_dump(tree))
    cfg = resume_config(target, None, ["train.max_iters=4"])
    assert cfg.train.lr != 0.5
    err = capsys.readouterr().err
    assert "edits to" in err and "(train.lr) are ignored" in err
    train(cfg, target, resume=True, quiet=True)
    assert run.read_config(target) == cfg  # config.yaml now says what the run used
