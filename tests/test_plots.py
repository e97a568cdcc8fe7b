import json
import math
import sys

import pytest
from click.testing import CliRunner

from attnlm import plots
from attnlm.cli import cli
from attnlm.errors import AttnlmError


def fake_run(folder, losses, vals):
    """A run directory with metrics.jsonl (and the config.yaml that marks a run)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {}\n")
    rows = [{"step": s, "loss": l, "lr": 1e-3, "tokens_per_s": 1.0} for s, l in losses]
    rows += [{"step": s, "val_loss": l} for s, l in vals]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def curves(fig):
    """{(colour, linestyle): (xs, ys)} of every curve drawn on the axes."""
    return {(str(line.get_color()), line.get_linestyle()): (list(line.get_xdata()), list(line.get_ydata()))
            for line in fig.axes[0].get_lines()}


def test_loss_curves_draw_train_and_val_of_every_run(tmp_path):
    pytest.importorskip("matplotlib")
    a = fake_run(tmp_path / "a", [(10, 3.0), (20, 2.5), (30, 2.2)], [(20, 2.6), (30, 2.3)])
    b = fake_run(tmp_path / "b", [(10, 2.9), (20, 2.0)], [(20, 2.1)])
    fig = plots.loss_curves([a, b], tmp_path / "loss.png")
    assert curves(fig) == {("C0", "-"): ([10, 20, 30], [3.0, 2.5, 2.2]), ("C0", "--"): ([20, 30], [2.6, 2.3]),
                           ("C1", "-"): ([10, 20], [2.9, 2.0]), ("C1", "--"): ([20], [2.1])}
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["a", "b", "train", "val"]  # a colour per run; the two styles once
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_thirty_runs_get_distinct_colours_and_a_legend_inside_the_image(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [fake_run(tmp_path / "sweep" / f"heads-{h}_pos-{p}_a-long-part-of-the-name",
                     [(10, 3.0 - i / 100), (20, 2.5)], [(20, 2.6)])
            for i, (h, p) in enumerate((h, p) for h in range(6) for p in "abcde")]
    fig = plots.loss_curves(runs, tmp_path / "loss.png")
    colours = {line.get_color() if isinstance(line.get_color(), str) else tuple(line.get_color())
               for line in fig.axes[0].get_lines()}
    assert len(colours) == 30
    fig.canvas.draw()
    figure_box, legend_box = fig.bbox, fig.legends[0].get_window_extent()
    assert figure_box.x0 <= legend_box.x0 and legend_box.x1 <= figure_box.x1
    assert figure_box.y0 <= legend_box.y0 and legend_box.y1 <= figure_box.y1
    axes_box = fig.axes[0].get_window_extent()
    assert not axes_box.overlaps(legend_box)  # beside the curves, not over them
    assert len(fig.legends[0].get_texts()) == 32


def test_bits_per_byte_scales_each_run_by_its_tokens_per_byte(tmp_path):
    pytest.importorskip("matplotlib")
    a = fake_run(tmp_path / "a", [(10, 2.0)], [(10, 2.5)])
    (a / "summary.json").write_text(json.dumps({"val_tokens_per_byte": 0.25}))
    fig = plots.loss_curves([a], tmp_path / "loss.png", y="bits-per-byte")
    scale = 0.25 / math.log(2)
    assert curves(fig) == {("C0", "-"): ([10], [pytest.approx(2.0 * scale)]),
                           ("C0", "--"): ([10], [pytest.approx(2.5 * scale)])}
    assert "bits per byte" in fig.axes[0].get_ylabel()


def test_tokens_per_byte_is_measured_when_the_summary_lacks_it(tmp_path):
    from attnlm import tokenizer as tokenizer_mod
    from attnlm import run as run_mod
    from attnlm.config import build_config
    from attnlm.gather import tokens_per_byte

    text = "éü" * 500  # two bytes a character: half a token per byte wherever val begins
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    run_mod.write_config(run, build_config(overrides=[
        f"data.source={tmp_path / 'text.txt'}", "model.block_size=8", f"data.cache_dir={tmp_path / 'cache'}"]))
    tokenizer_mod.save(tokenizer_mod.CharTokenizer.train([text]), run / "tokenizer.json")
    assert tokens_per_byte(run) == 0.5


@pytest.mark.parametrize("where, message", [
    ("missing/loss.png", "cannot write {out}: No such file or directory"),
    ("file/loss.png", "cannot write {out}: Not a directory"),
])
def test_plot_out_where_it_cannot_be_written_is_one_line(tmp_path, where, message):
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path / "a", [(10, 3.0)], [])
    (tmp_path / "file").write_text("")
    out = tmp_path / where
    result = CliRunner().invoke(cli, ["plot", str(run), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "error: " + message.format(out=out)
    assert not list((tmp_path / "a").glob(".*tmp*"))


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
    assert plots.loss_curves([a], tmp_path / "log.png", log_y=True).axes[0].get_yscale() == "log"


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    run = fake_run(tmp_path / "a", [(10, 3.0)], [])
    with pytest.raises(AttnlmError, match=r"pip install 'attnlm\[plot\]'"):
        plots.loss_curves([run], tmp_path / "x.png")
    result = CliRunner().invoke(cli, ["plot", str(run)])
    assert result.exit_code == 1 and "pip install 'attnlm[plot]'" in result.stderr


def test_a_folder_without_metrics_is_an_input_error(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("{}")
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "r")])
    assert result.exit_code == 2 and "holds no metrics.jsonl" in result.stderr


def test_loss_curves_against_wall_time(tmp_path):
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path / "a", [(10, 3.0), (20, 2.5)], [(20, 2.6)])
    rows = [dict(r, time_s=1.5 * (i + 1)) for i, r in
            enumerate(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plots.loss_curves([run], tmp_path / "loss.png", x="time")
    assert curves(fig) == {("C0", "-"): ([1.5, 3.0], [3.0, 2.5]), ("C0", "--"): ([4.5], [2.6])}
    assert fig.axes[0].get_xlabel() == "wall seconds since the run started"
    old = fake_run(tmp_path / "old", [(10, 3.0)], [])
    result = CliRunner().invoke(cli, ["plot", str(old), "--x", "time"])
    assert result.exit_code == 2 and "has no time_s" in result.output
