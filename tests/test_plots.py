import json
import sys

import pytest
from click.testing import CliRunner

from attnlm import plots
from attnlm.cli import cli
from attnlm.errors import InputError


def fake_run(folder, losses, vals):
    """A run directory with metrics.jsonl (and the config.yaml that marks a run)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {}\n")
    rows = [{"step": s, "loss": l, "lr": 1e-3, "tokens_per_s": 1.0} for s, l in losses]
    rows += [{"step": s, "val_loss": l} for s, l in vals]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_loss_curves_draw_train_and_val_of_every_run(tmp_path):
    pytest.importorskip("matplotlib")
    a = fake_run(tmp_path / "a", [(10, 3.0), (20, 2.5), (30, 2.2)], [(20, 2.6), (30, 2.3)])
    b = fake_run(tmp_path / "b", [(10, 2.9), (20, 2.0)], [(20, 2.1)])
    fig = plots.loss_curves([a, b], tmp_path / "loss.png")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines) == ["a train", "a val", "b train", "b val"]
    assert list(lines["a train"].get_xdata()) == [10, 20, 30]
    assert list(lines["a train"].get_ydata()) == [3.0, 2.5, 2.2]
    assert list(lines["b val"].get_ydata()) == [2.1]
    assert lines["a val"].get_linestyle() == "--" and lines["a train"].get_linestyle() == "-"
    assert lines["a val"].get_color() == lines["a train"].get_color() != lines["b train"].get_color()
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_command_writes_into_the_run_or_where_told(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    a = fake_run(tmp_path / "runs" / "a", [(10, 3.0), (20, 2.5)], [(20, 2.6)])
    fake_run(tmp_path / "runs" / "b", [(10, 2.9), (20, 2.0)], [(20, 2.1)])
    result = CliRunner().invoke(cli, ["plot", str(a)])
    assert result.exit_code == 0, result.output
    assert imread(a / "loss.png").shape[2] in (3, 4)
    several = CliRunner().invoke(cli, ["plot", str(tmp_path / "runs")])
    assert several.exit_code == 2 and "--out" in several.stderr
    out = tmp_path / "both.png"
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "runs"), "--out", str(out), "--log-y"])
    assert result.exit_code == 0 and imread(out).shape[0] > 100


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    run = fake_run(tmp_path / "a", [(10, 3.0)], [])
    with pytest.raises(InputError, match=r"pip install 'attnlm\[plot\]'"):
        plots.loss_curves([run], tmp_path / "x.png")
    result = CliRunner().invoke(cli, ["plot", str(run)])
    assert result.exit_code == 2 and "pip install 'attnlm[plot]'" in result.stderr


def test_a_folder_without_metrics_is_an_input_error(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("{}")
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "r")])
    assert result.exit_code == 2 and "holds no metrics.jsonl" in result.stderr
