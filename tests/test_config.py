from pathlib import Path

import pytest
import torch
import yaml

from attnlm.config import RunConfig, build_config, dump_yaml, from_dict, load_config, to_dict
from attnlm.errors import ConfigError
from attnlm.model import GPT


def test_defaults_validate():
    assert build_config() == RunConfig()


def test_yaml_then_set_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 3\n  n_head: 2\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(path, ["model.n_layer=5"])
    assert cfg.model.n_layer == 5  # --set wins over the file
    assert cfg.model.n_head == 2  # the file wins over defaults
    assert cfg.train.lr == pytest.approx(1e-3)  # PyYAML reads 1e-3 as a string; typed by field


def test_set_values_are_typed_by_field():
    cfg = build_config(overrides=["model.bias=true", "train.max_iters=2e3", "data.source=a=b.txt",
                                  "model.dropout=0.25"])
    assert cfg.model.bias is True
    assert cfg.train.max_iters == 2000 and isinstance(cfg.train.max_iters, int)
    assert cfg.data.source == "a=b.txt"  # only the first '=' splits
    assert cfg.model.dropout == 0.25


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'model.n_heads' \(did you mean 'model.n_head'\?\)"):
        build_config(overrides=["model.n_heads=4"])
    with pytest.raises(ConfigError, match=r"unknown section 'trian' \(did you mean 'train'\?\)"):
        build_config({"trian": {"lr": 1.0}})


def test_wrong_types_are_errors():
    with pytest.raises(ConfigError, match=r"model.n_layer='four' is not a valid int"):
        build_config(overrides=["model.n_layer=four"])
    with pytest.raises(ConfigError, match=r"model.n_layer=2.5 is not a valid int"):
        build_config({"model": {"n_layer": 2.5}})
    with pytest.raises(ConfigError, match=r"model.bias='maybe' is not a valid bool"):
        build_config(overrides=["model.bias=maybe"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        build_config(overrides=["model.n_layer"])


def test_impossible_combinations_named():
    with pytest.raises(ConfigError, match=r"model.n_embd=100 is not divisible by model.n_head=3"):
        build_config(overrides=["model.n_embd=100", "model.n_head=3"])
    with pytest.raises(ConfigError, match=r"train.min_lr=0.1 must be in \[0, train.lr=0.01\]"):
        build_config(overrides=["train.lr=0.01", "train.min_lr=0.1"])
    with pytest.raises(ConfigError, match=r"model.attention='flash' must be one of"):
        build_config(overrides=["model.attention=flash"])


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as err:
        build_config(overrides=["model.n_layer=0", "train.lr=-1", "model.nope=1", "train.seed=x"])
    assert len(err.value.problems) == 4
    assert "model.n_layer=0 must be positive" in str(err.value)
    assert "train.lr=-1.0 must be a positive number" in str(err.value)


def test_non_mapping_yaml_is_an_error():
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_config(["a", "b"])
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        build_config({"model": 3})


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = build_config(overrides=["model.n_layer=2", "tokenizer.kind=bytes"])
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert from_dict(to_dict(cfg)) == cfg


RECIPES = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))  # wherever pytest runs


def test_the_shipped_recipes_are_found():
    assert {p.stem for p in RECIPES} >= {"copy", "associative_recall", "shakespeare_char"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_config_loads_and_builds_its_model(path):
    with open(path) as f:
        assert isinstance(yaml.safe_load(f), dict)
    cfg = load_config(path)
    model = GPT(cfg.model, vocab_size=50)
    logits, _ = model(torch.zeros(1, cfg.model.block_size, dtype=torch.long))
    assert logits.shape == (1, cfg.model.block_size, 50)
