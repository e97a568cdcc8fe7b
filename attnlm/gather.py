"""Many runs gathered: found on disk, read, and put into one table.

A row per finished run directory: the config values that differ between the runs gathered, the
figures of its summary.json, and those of an eval.json beside it (the output of
`attnlm eval RUN --json > RUN/eval.json`), prefixed `eval_`. A path that holds no run, a run not
finished, or one whose files are corrupt is left out with a warning; the others still count.
"""

import csv
import glob
import io
import json
import os
from pathlib import Path

from attnlm import config as config_mod
from attnlm.errors import InputError

CONFIG = "config.yaml"  # what makes a folder a run directory


def _runs_under(path):
    """path itself if it is a run, else every run below it at any depth, sorted (symbolic links
    to folders are not followed, so a link loop cannot list a run twice)."""
    if (path / CONFIG).is_file():
        return [path]
    runs = []
    for folder, subfolders, files in os.walk(path):
        if CONFIG in files:
            runs.append(Path(folder))
            subfolders.clear()  # a run holds no other runs
    return sorted(runs)


def find_runs(patterns, warn):
    """Run directories (those holding a config.yaml), in order, each once: a pattern is a run
    directory, a folder of them (folders of folders too), or a glob matching either. A pattern
    that finds none is reported to warn(message) and skipped; none at all is an InputError."""
    runs = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        found = [run for match in matches for run in _runs_under(Path(match))]
        if not found:
            warn(f"{pattern}: no run directory there (none holds a {CONFIG}); skipped")
        runs += [run for run in found if run not in runs]
    if not runs:
        raise InputError(f"no run directory found (none holds a {CONFIG})")
    return runs


def read_config(run):
    """A run's resolved config, validated like any other (InputError if it is not)."""
    return config_mod.build_config(config_mod.read_yaml(Path(run) / CONFIG))


def _read_json(path):
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(found, dict):
        raise InputError(f"{path} is not a JSON object")
    return found


def _flat(tree, prefix=""):
    """{'model.n_head': 4, ...} from nested mappings."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _row(run):
    """(config, summary, eval figures) of a finished run, flat; InputError if one is corrupt."""
    config = _flat(config_mod.to_dict(read_config(run)))
    summary = _read_json(run / "summary.json")
    eval_path = run / "eval.json"
    found = _read_json(eval_path) if eval_path.is_file() else {}
    # Nested parts (the attention report) do not fit in a cell.
    return config, summary, {f"eval_{k}": v for k, v in found.items() if not isinstance(v, (dict, list))}


def table(runs, warn):
    """(columns, rows) for run directories. A run without summary.json (still running, or
    failed) or with a corrupt file is reported to warn(message) and left out."""
    kept, configs, summaries, evals = [], [], [], []
    for run in runs:
        if not (run / "summary.json").is_file():
            warn(f"{run} has no summary.json (still running or failed); left out")
            continue
        try:
            config, summary, evaluation = _row(run)
        except InputError as err:
            warn(f"{run} left out: {err}")
            continue
        kept.append(run)
        configs.append(config)
        summaries.append(summary)
        evals.append(evaluation)
    if not kept:
        raise InputError("no finished run to gather (none holds a readable summary.json)")
    keys = list(dict.fromkeys(k for c in configs for k in c))
    varying = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
    figures = list(dict.fromkeys(k for d in summaries + evals for k in d if k != "out"))
    rows = [{"run": str(run), **{k: c.get(k) for k in varying}, **s, **e}
            for run, c, s, e in zip(kept, configs, summaries, evals)]
    columns = ["run", *varying, *figures]
    return columns, [[row.get(col) for col in columns] for row in rows]


def tokens_per_byte(run):
    """Tokens per UTF-8 byte of a run's val split: from summary.json's val_tokens_per_byte where
    training wrote it, else measured by encoding the split again (with the token cache, fast)."""
    summary_path = Path(run) / "summary.json"
    if summary_path.is_file():
        recorded = _read_json(summary_path).get("val_tokens_per_byte")
        if isinstance(recorded, (int, float)) and recorded > 0:
            return recorded
    from attnlm import tokenizer as tokenizer_mod
    from attnlm.data import prepare_training

    cfg = read_config(run)
    tokenizer = tokenizer_mod.load(Path(run) / "tokenizer.json")
    val = prepare_training(cfg, tokenizer)[1]["val"]
    return len(val) / val.n_bytes


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
