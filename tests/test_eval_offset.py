"""eval --offset: the same windows read at later positions, the check that a model knowing only
distances between tokens is shift-equivariant."""

import json

import pytest
from click.testing import CliRunner

from attnlm.cli import cli
from tests.helpers import TINY, text_file


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offset")
    made = {}
    for pos in ("relative", "sinusoidal", "learned"):
        overrides = [f"data.source={text_file(tmp)}", *TINY, "train.max_iters=10",
                     f"model.pos={pos}", "model.attention=naive", "model.rel_buckets=8", "model.rel_max_distance=16"]
        args = [x for o in overrides for x in ("--set", o)]
        result = CliRunner().invoke(cli, ["train", *args, "--out", str(tmp / pos), "--quiet"])
        assert result.exit_code == 0, result.output
        made[pos] = tmp / pos
    return made


def loss_at(run, offset):
    result = CliRunner().invoke(cli, ["eval", str(run), "--offset", str(offset), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_relative_bias_scores_the_same_at_any_offset_and_absolute_positions_do_not(runs):
    at_start = loss_at(runs["relative"], 0)
    assert "offset" not in at_start
    later = loss_at(runs["relative"], 40)
    assert later["offset"] == 40
    assert later["loss"] == pytest.approx(at_start["loss"], rel=1e-6)
    absolute = loss_at(runs["sinusoidal"], 0)["loss"], loss_at(runs["sinusoidal"], 40)["loss"]
    assert absolute[1] != pytest.approx(absolute[0], rel=1e-3)
    text = CliRunner().invoke(cli, ["eval", str(runs["relative"]), "--offset", "40"])
    assert "each window at positions 40.." in text.stdout


def test_learned_positions_refuse_an_offset_past_their_table(runs):
    assert loss_at(runs["learned"], 0)["loss"] > 0
    result = CliRunner().invoke(cli, ["eval", str(runs["learned"]), "--offset", "1"])
    assert result.exit_code == 2
    assert result.stderr == ("error: --offset 1 puts windows at positions up to 32; "
                             "model.pos=learned has positions 0 to 31 only\n")
