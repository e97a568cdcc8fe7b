"""The package: the Python API, a light `import attnlm`, and a wheel that works outside the repo."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

import attnlm
from attnlm.config import RECIPES
from attnlm.errors import ConfigError, InputError
from tests.helpers import TINY, text_file

ROOT = Path(__file__).resolve().parents[1]


def test_import_attnlm_and_load_config_do_not_import_torch():
    code = ("import sys, attnlm; from attnlm import load_config, train_run, load_run, generate, "
            "eval_run, Run; load_config('shakespeare_char', ['train.max_iters=3']); "
            "print('torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_api_names_survive_importing_the_modules_of_the_same_stem():
    import attnlm.evaluate
    import attnlm.train  # noqa: F401  (sets attnlm.train to the module)

    from attnlm import api

    assert {name: getattr(attnlm, name) for name in attnlm.API} == \
           {name: getattr(api, name) for name in attnlm.API}
    assert set(attnlm.API) <= set(dir(attnlm))


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    cfg = attnlm.load_config(None, [f"data.source={text_file(tmp)}", *TINY, "train.max_iters=4",
                                    "sample.max_new_tokens=7", "sample.temperature=0"])
    summary = attnlm.train_run(cfg, tmp / "run", quiet=True)
    assert summary["steps"] == 4
    return tmp / "run"


def greedy_reference(model, tokenizer, prompt, n):
    """Greedy decoding by hand: the whole sequence re-read every step, the likeliest token kept."""
    ids = tokenizer.encode(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return tokenizer.decode(ids[len(tokenizer.encode(prompt)):])


def test_generate_continues_the_prompt_greedily_with_the_runs_sample_defaults(api_run):
    run = attnlm.load_run(api_run, device="cpu")
    with torch.no_grad():
        expected = greedy_reference(run.model, run.tokenizer, "line 1", 7)
    assert attnlm.generate(run, "line 1") == expected  # sample.max_new_tokens=7, temperature=0
    assert attnlm.generate(run, "line 1", max_new_tokens=3) == expected[:3]
    assert attnlm.generate(api_run, "line 1", num_samples=2) == [expected, expected]
    stop = expected[3:5]
    assert attnlm.generate(run, "line 1", stop=stop) == expected[:expected.index(stop)]


def test_generate_reports_a_bad_control_by_its_config_key(api_run):
    run = attnlm.load_run(api_run, device="cpu")
    with pytest.raises(ConfigError, match=r"sample.top_p=2.0 must be in \[0.0001, 1\]"):
        attnlm.generate(run, "line", top_p=2.0)
    with pytest.raises(ConfigError, match="did you mean 'sample.temperature'"):
        attnlm.generate(run, "line", temprature=0.5)


def test_eval_run_gives_the_cli_eval_result(api_run):
    result = attnlm.eval_run(api_run)
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    # chars of ASCII text: one byte per token, so bits per byte is loss / ln 2
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / 0.693147181, rel=1e-6)


def test_train_run_resumes_with_overrides_and_refuses_a_whole_config(api_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(api_run, run)
    assert attnlm.train_run(None, run, overrides=["train.max_iters=6"], resume=True,
                            quiet=True)["steps"] == 6
    with pytest.raises(InputError, match="give the changes as overrides"):
        attnlm.train_run(attnlm.load_config(), run, resume=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from a copy of the source, installed into a fresh virtual environment that
    finds its dependencies in the test environment's site-packages (offline, no download)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info into the tree
    shutil.copytree(ROOT / "attnlm", source / "attnlm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip[:3], "wheel", *pip[3:], "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", tmp / "dist", source], check=True)
    (wheel,) = (tmp / "dist").glob("attnlm-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip[:3], "--python", python, "install", *pip[3:], "--no-deps", "--no-index",
                    wheel], check=True)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(purelib, "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the repo
    return wheel, venv / "bin", env


def test_the_wheel_ships_every_recipe(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    recipes = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert recipes and [n for n in recipes if f"attnlm/recipes/{n}" not in names] == []


def test_the_installed_tool_trains_a_recipe_from_an_empty_directory(installed, tmp_path):
    _, bin_dir, env = installed
    empty = tmp_path / "empty"
    empty.mkdir()

    def tool(*args):
        out = subprocess.run([*args], cwd=empty, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    small = ["data.source=builtin:pydoc", "train.max_iters=3", "train.eval_interval=3",
             "train.eval_iters=1", "train.batch_size=2", "train.threads=1", "model.n_layer=1",
             "model.n_head=2", "model.n_embd=32"]
    summary = json.loads(tool(bin_dir / "attnlm", "train", "--config", "shakespeare_char",
                              *[x for s in small for x in ("--set", s)], "--out", "run", "--json"))
    assert summary["steps"] == 3 and (empty / "run" / "checkpoint.pt").is_file()
    cli_text = tool(bin_dir / "attnlm", "generate", "run", "--prompt", "The ",
                    "--max-new-tokens", "6", "--temperature", "0")
    api = tool(bin_dir / "python", "-c", "import attnlm; print(attnlm.__file__); "
               "print(attnlm.generate('run', 'The ', max_new_tokens=6, temperature=0), end='')")
    where, api_text = api.split("\n", 1)
    assert Path(where).is_relative_to(bin_dir.parent)  # the installed package, not the repo's
    assert cli_text == "The " + api_text + "\n" and len(api_text) == 6
