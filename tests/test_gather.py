import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from attnlm import config as config_mod, gather, run as run_mod
from attnlm.cli import cli
from attnlm.errors import InputError
from tests.helpers import TINY, text_file

ROOT = Path(__file__).resolve().parent.parent


def test_run_names_are_readable_and_safe():
    assert config_mod.run_name("configs/copy.yaml", ["model.n_head=2", "model.pos=none"]) == "copy_n_head-2_pos-none"
    assert config_mod.run_name(None, []) == "default"
    name = config_mod.run_name(None, ["data.source=synthetic:copy,length=8", "data.source=/tmp/a/ü b.txt"])
    assert name == "default_source-synthetic_copy_length_8_source-_b.txt"
    # seed is a key of two sections, so it keeps its section
    assert config_mod.run_name(None, ["train.seed=1", "sample.seed=2"]) == "default_train.seed-1_sample.seed-2"


def test_long_run_names_are_cut_and_stay_distinct():
    a = config_mod.run_name(None, [f"model.pos={'x' * 200}a"])
    b = config_mod.run_name(None, [f"model.pos={'x' * 200}b"])
    assert len(a) == len(b) == config_mod.MAX_NAME and a != b
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", a)


def test_train_without_out_derives_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = text_file(tmp_path)
    overrides = [x for o in [*TINY, "train.max_iters=2"] for x in ("--set", o)]
    result = CliRunner().invoke(cli, ["train", "--set", f"data.source={source}", *overrides, "--quiet"])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    # many overrides: cut, with a hash of them all at the end
    assert re.fullmatch(r"default_source-corpus\.txt_n_layer-2_n_head-2_.*_[0-9a-f]{10}", run.name)
    assert len(run.name) == config_mod.MAX_NAME
    assert (run / "summary.json").exists()


def fake_run(folder, config, summary, evaluation=None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps({**summary, "out": str(folder)}))
    if evaluation is not None:
        (folder / "eval.json").write_text(json.dumps(evaluation))
    return folder


@pytest.fixture
def runs(tmp_path):
    base = {"model": {"n_layer": 2, "n_head": 1, "pos": "learned"}, "train": {"seed": 1}}
    fake_run(tmp_path / "s" / "a", base, {"steps": 10, "val_loss": 2.5},
             {"loss": 2.4, "exact_match": 0.5, "attention": {"entropy": [[1.0]]}})
    fake_run(tmp_path / "s" / "b", {**base, "model": {**base["model"], "n_head": 4}},
             {"steps": 10, "val_loss": 2.25}, {"loss": 2.2, "exact_match": 0.75})
    fake_run(tmp_path / "s" / "c", base, None)  # unfinished
    return tmp_path / "s"


def test_find_runs_takes_runs_folders_and_globs(runs, tmp_path):
    warnings = []
    assert run_mod.find_runs([str(runs)], warnings.append) == [runs / "a", runs / "b", runs / "c"]
    assert run_mod.find_runs([str(runs / "b"), str(runs / "[ab]")], warnings.append) == [runs / "b", runs / "a"]
    assert warnings == []
    again = [str(runs / "a"), str(runs / "b" / ".." / "a")]  # one run, however it is spelled
    assert run_mod.find_runs(again, warnings.append) == [runs / "a"]
    with pytest.raises(InputError, match="no run directory found"):
        run_mod.find_runs([str(tmp_path / "nothing*")], warnings.append)
    assert warnings == [f"{tmp_path / 'nothing*'}: no run directory there (none holds a config.yaml); skipped"]


def test_a_run_a_pattern_matches_under_two_names_is_found_once(runs):
    (runs / "z-link").symlink_to(runs / "a")
    assert run_mod.find_runs([str(runs / "*")], print) == [runs / "a", runs / "b", runs / "c"]


def test_a_path_that_is_not_a_run_is_skipped_with_a_warning(runs, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes.txt").write_text("not a run")
    warnings = []
    found = run_mod.find_runs([str(tmp_path / "notes"), str(runs / "a"), str(tmp_path / "notes.txt")],
                             warnings.append)
    assert found == [runs / "a"]
    assert [w.split(":")[0] for w in warnings] == [str(tmp_path / "notes"), str(tmp_path / "notes.txt")]
    result = CliRunner().invoke(cli, ["gather", str(tmp_path / "notes"), str(runs)])
    assert result.exit_code == 0 and "notes: no run directory there" in result.stderr
    assert str(runs / "b") in result.stdout


def test_a_folder_of_folders_of_runs_is_searched_at_any_depth(runs, tmp_path):
    fake_run(tmp_path / "s" / "deeper" / "sweep2" / "d", {"model": {"n_layer": 3}}, {"steps": 5})
    (tmp_path / "s" / "a" / "checkpoints").mkdir()  # folders inside a run hold no runs
    found = run_mod.find_runs([str(tmp_path / "s")], print)
    assert found == [runs / "a", runs / "b", runs / "c", runs / "deeper" / "sweep2" / "d"]


def test_table_has_varying_config_summary_and_eval_columns(runs):
    warnings = []
    columns, rows = gather.table(run_mod.find_runs([str(runs)], warnings.append), warnings.append)
    assert columns == ["run", "model.n_head", "steps", "val_loss", "eval_loss", "eval_exact_match"]
    assert rows == [[str(runs / "a"), 1, 10, 2.5, 2.4, 0.5], [str(runs / "b"), 4, 10, 2.25, 2.2, 0.75]]
    assert warnings == [f"{runs / 'c'} has no summary.json (still running or failed); left out"]


@pytest.mark.parametrize("corrupt", [
    {"config.yaml": "model: [unclosed"},  # not YAML
    {"config.yaml": "model:\n  n_layer: many\n"},  # not a valid config
    {"config.yaml": "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                    "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
                    "model: {n_layer: *f}\n"},  # an alias bomb
    {"config.yaml": ""},  # emptied: not the defaults
    {"summary.json": '{"steps": 10, "val_'},  # torn
    {"eval.json": "[1, 2]"},  # not an object
])
def test_one_corrupt_run_is_left_out_with_a_warning_and_the_rest_gathered(runs, corrupt):
    ((name, text),) = corrupt.items()
    (runs / "a" / name).write_text(text)
    result = CliRunner().invoke(cli, ["gather", str(runs), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert f"warning: {runs / 'a'} left out: " in result.stderr and len(result.stderr) < 500
    (header, row) = list(csv.reader(io.StringIO(result.stdout)))
    assert row[0] == str(runs / "b")


def test_gather_prints_csv_and_markdown(runs):
    result = CliRunner().invoke(cli, ["gather", str(runs), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert list(csv.reader(io.StringIO(result.stdout))) == [
        ["run", "model.n_head", "steps", "val_loss", "eval_loss", "eval_exact_match"],
        [str(runs / "a"), "1", "10", "2.5", "2.4", "0.5"],
        [str(runs / "b"), "4", "10", "2.25", "2.2", "0.75"]]
    assert f"{runs / 'c'} has no summary.json" in result.stderr
    markdown = CliRunner().invoke(cli, ["gather", str(runs)]).stdout.splitlines()
    assert markdown[0] == "| run | model.n_head | steps | val_loss | eval_loss | eval_exact_match |"
    assert markdown[1] == "|---|---|---|---|---|---|"
    assert markdown[3] == f"| {runs / 'b'} | 4 | 10 | 2.25 | 2.2 | 0.75 |"


def test_a_markdown_cell_keeps_its_line_breaks_and_pipes_inside_it(tmp_path):
    for name, stop in [("a", "\n\n"), ("b", "END|")]:
        fake_run(tmp_path / name, {"sample": {"stop": stop}}, {"steps": 1})
    lines = CliRunner().invoke(cli, ["gather", str(tmp_path)]).stdout.splitlines()
    assert lines[2:] == [f"| {tmp_path / 'a'} | \\n\\n | 1 |", f"| {tmp_path / 'b'} | END\\| | 1 |"]


def test_gather_without_finished_runs_exits_2(tmp_path):
    fake_run(tmp_path / "r", {"model": {}}, None)
    result = CliRunner().invoke(cli, ["gather", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no finished run" in result.stderr


@pytest.mark.parametrize("heads, pos", [("1 2", "none"),
                                        pytest.param("1 2", "learned rope alibi", marks=pytest.mark.slow)])
def test_example_sweep_runs_end_to_end(tmp_path, heads, pos):
    out = tmp_path / "sweep"
    env = {**os.environ, "HEADS": heads, "POS": pos, "ITERS": "3", "LAYERS": "1", "EMBD": "8",
           "BLOCK": "8", "BATCH": "2", "JOBS": "2", "ATTNLM": f"{sys.executable} -m attnlm"}
    result = subprocess.run(["bash", str(ROOT / "configs" / "sweep_heads_pos.sh"), str(out)],
                            env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((out / "table.csv").open()))
    grid = {(int(h), p) for h in heads.split() for p in pos.split()}
    configs = {}
    for row in rows:
        run = Path(row["run"])
        config = yaml.safe_load((run / "config.yaml").read_text())
        configs[config["model"]["n_head"], config["model"]["pos"]] = row
        assert run.name == f"heads-{config['model']['n_head']}_pos-{config['model']['pos']}"
        assert config["train"]["threads"] == 1 and config["data"]["source"] == "builtin:pydoc"
        for key in ("model.n_head", "model.pos"):  # shown where they vary
            assert row.get(key, str(config["model"][key[6:]])) == str(config["model"][key[6:]])
        summary = json.loads((run / "summary.json").read_text())
        evaluation = json.loads((run / "eval.json").read_text())
        assert row["steps"] == "3" and float(row["val_loss"]) == summary["val_loss"]
        assert float(row["eval_loss"]) == evaluation["loss"]
    assert len(rows) == len(configs) and set(configs) == grid  # one row per run
    assert result.stdout.startswith("| run | model.")  # the Markdown table, shown at the end
