"""Many runs gathered: found on disk, read, and put into one table.

A row per finished run directory: the config values that differ between the runs gathered, the
figures of its summary.json, and those of an eval.json beside it (the output of
`attnlm eval RUN --json > RUN/eval.json`), prefixed `eval_`. A path that holds no run, a run not
finished, or one whose files are corrupt is left out with a warning; the others still count.
"""

import csv
import io
import json
from pathlib import Path

from attnlm import config as config_mod, run as run_mod
from attnlm.errors import InputError


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
    config = _flat(config_mod.to_dict(run_mod.read_config(run)))
    summary = run_mod.read_summary(run)
    found = run_mod.read_eval(run) or {}
    # Nested parts (the attention report) do not fit in a cell.
    return config, summary, {f"eval_{k}": v for k, v in found.items() if not isinstance(v, (dict, list))}


def table(runs, warn):
    """(columns, rows) for run directories. A run without summary.json (still running, or
    failed) or with a corrupt file is reported to warn(message) and left out."""
    kept, configs, summaries, evals = [], [], [], []
    for run in runs:
        try:
            config, summary, evaluation = _row(run)
        except InputError as err:
            warn(f"{run} left out: {err}")
            continue
        if summary is None:
            warn(f"{run} has no {run_mod.SUMMARY} (still running or failed); left out")
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
    recorded = (run_mod.read_summary(run) or {}).get("val_tokens_per_byte")
    if isinstance(recorded, (int, float)) and recorded > 0:
        return recorded
    from attnlm import tokenizer as tokenizer_mod
    from attnlm.data import prepare_training

    cfg = run_mod.read_config(run)
    tokenizer = tokenizer_mod.load(Path(run) / run_mod.TOKENIZER)
    val = prepare_training(cfg, tokenizer)[1]["val"]
    return val.tokens_per_byte


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
    # A pipe would end the cell and a line break the row (stop texts and prompts hold them).
    escapes = {"\\": "\\\\", "|": "\\|", "\n": "\\n", "\r": "\\r"}
    return "".join(escapes.get(c, c) for c in str(value))


def to_markdown(columns, rows):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
