"""Sweeps: run directory names derived from overrides, and many runs gathered into one table.
A row per run directory: the config values that differ between the runs gathered, the figures of
its summary.json, and those of an eval.json beside it (the output of
`attnlm eval RUN --json > RUN/eval.json`), prefixed `eval_`."""

import csv
import glob
import hashlib
import io
import json
import re
from pathlib import Path

import yaml

from attnlm.errors import InputError


MAX_NAME = 100  # characters; a longer run name is cut and ends in a hash of the whole


def run_name(config_path, overrides):
    """A run directory name from a config file and --set overrides, readable and safe in any file
    system: `copy_n_head-2_pos-sinusoidal`. A key is named by its last part unless two sections
    share that (train.seed, sample.seed); a path stands for its last part (`source-input.txt`);
    characters other than letters, digits and `.+-` become `_`; a name too long is cut and ends
    in a hash of the overrides. Overrides can still share a name (two files called input.txt),
    never silently: training refuses a directory that already holds a run."""
    from attnlm.config import KEYS

    names = [key.rsplit(".", 1)[-1] for key in KEYS]
    parts = [Path(config_path).stem if config_path else "default"]
    for item in overrides:
        key, _, value = (s.strip() for s in item.partition("="))
        name = key.rsplit(".", 1)[-1]
        parts.append(f"{key if names.count(name) > 1 else name}-{value.rstrip('/').rsplit('/', 1)[-1]}")
    text = re.sub(r"[^A-Za-z0-9.+-]+", "_", "_".join(parts), flags=re.ASCII).strip("._")
    if len(text) > MAX_NAME:
        digest = hashlib.sha256("\0".join(overrides).encode()).hexdigest()[:10]
        text = f"{text[:MAX_NAME - 11]}_{digest}"
    return text


def find_runs(patterns):
    """Run directories (those holding a config.yaml), in order: each pattern is a run directory,
    a folder of run directories, or a glob matching either."""
    runs = []
    for pattern in patterns:
        is_glob = any(c in pattern for c in "*?[")
        matches = sorted(glob.glob(pattern)) if is_glob else [pattern]
        found = []
        for match in map(Path, matches):
            if (match / "config.yaml").is_file():
                found.append(match)
            elif match.is_dir():
                found += sorted(p.parent for p in match.glob("*/config.yaml"))
        if not found:
            raise InputError(f"{pattern}: no run directory there (none holds a config.yaml)")
        runs += [run for run in found if run not in runs]
    return runs


def _flat(tree, prefix=""):
    """{'model.n_head': 4, ...} from nested mappings."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not JSON ({err})") from None


def table(runs):
    """(columns, rows, left out) for run directories: runs without a summary.json (still running,
    or failed) are left out of the rows."""
    kept = [run for run in runs if (run / "summary.json").is_file()]
    configs, summaries, evals = [], [], []
    for run in kept:
        configs.append(_flat(yaml.safe_load((run / "config.yaml").read_text()) or {}))
        summaries.append(_read_json(run / "summary.json"))
        eval_path = run / "eval.json"
        found = _read_json(eval_path) if eval_path.is_file() else {}
        # Nested parts (the attention report) do not fit in a cell.
        evals.append({f"eval_{k}": v for k, v in found.items() if not isinstance(v, (dict, list))})
    if not kept:
        raise InputError("no finished run to gather (none holds a summary.json)")
    keys = list(dict.fromkeys(k for c in configs for k in c))
    varying = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
    figures = list(dict.fromkeys(k for d in summaries + evals for k in d if k != "out"))
    rows = [{"run": str(run), **{k: c.get(k) for k in varying}, **s, **e}
            for run, c, s, e in zip(kept, configs, summaries, evals)]
    columns = ["run", *varying, *figures]
    left_out = [run for run in runs if run not in kept]
    return columns, [[row.get(col) for col in columns] for row in rows], left_out


def to_csv(columns, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def to_markdown(columns, rows):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
