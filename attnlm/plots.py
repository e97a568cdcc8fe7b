"""PNG plots: loss curves of one or more runs, attention heat maps. Needs the optional
matplotlib (`pip install 'attnlm[plot]'`); figures are drawn without pyplot, so no display or
global state is involved."""

import math
import os
from pathlib import Path

from attnlm.errors import AttnlmError, InputError
from attnlm.files import atomic_open


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        # exit 1, as for the hf extra: the environment lacks a package, the input is fine
        raise AttnlmError("plotting needs matplotlib: pip install 'attnlm[plot]'") from None


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_png(fig, path, dpi):
    """Write fig as a PNG at path, atomically; InputError naming the path if it cannot be."""
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None


X_AXES = {"step": ("step", "step"), "time": ("time_s", "wall seconds since the run started")}


def read_metrics(run, x="step"):
    """(train rows, val rows) of a run's metrics.jsonl, each a list of (x, loss): x the step, or
    with x="time" the wall seconds since the run started (data preparation included)."""
    from attnlm.run import read_metrics as records

    key = X_AXES[x][0]
    rows = records(run)
    if any(key not in r for r in rows):
        raise InputError(f"{run}: its metrics.jsonl has no {key} (trained by an older attnlm); "
                         f"plot it against step")
    train = [(r[key], r["loss"]) for r in rows if "loss" in r]
    val = [(r[key], r["val_loss"]) for r in rows if "val_loss" in r]
    return train, val


Y_AXES = {"loss": "loss (nats per token)",
          "bits-per-byte": "bits per byte (loss x val tokens per byte / ln 2)"}
LEGEND_ROWS = 24  # runs per legend column
LABEL = 40  # characters of a run's name in the legend


def _colours(count):
    """count distinct colours: the ten of matplotlib's cycle, or evenly spaced along a
    perceptual colour map when there are more runs than that."""
    from matplotlib import colormaps

    if count <= 10:
        return [f"C{i}" for i in range(count)]
    return [colormaps["turbo"](0.05 + 0.9 * i / (count - 1)) for i in range(count)]


def _names(runs):
    """Each run's path below the folder they share (their name alone for one run), cut to
    LABEL characters in the middle, where sweep names differ least."""
    paths = [Path(run).resolve() for run in runs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    names = [str(p.relative_to(common)) if p != common else p.name for p in paths]
    half = (LABEL - 1) // 2
    return [n if len(n) <= LABEL else f"{n[:half]}…{n[-(LABEL - 1 - half):]}" for n in names]


def loss_curves(runs, out, log_y=False, y="loss", x="step"):
    """Train loss (solid) and val loss (dashed, dots) against step (or x="time", wall seconds),
    one colour per run, written to the PNG file out; returns the figure. y="bits-per-byte" scales both by the run's val
    tokens per byte (gather.tokens_per_byte), so runs with different tokenizers compare. The
    legend sits beside the axes: one entry per run, in columns of LEGEND_ROWS, and the two line
    styles explained once."""
    _require_matplotlib()
    from matplotlib.lines import Line2D

    from attnlm.gather import tokens_per_byte

    columns = math.ceil(len(runs) / LEGEND_ROWS)
    fig = _figure(figsize=(8 + 2.6 * columns, 5), layout="constrained")
    ax = fig.add_subplot()
    handles = []
    for run, name, colour in zip(runs, _names(runs), _colours(len(runs))):
        train, val = read_metrics(run, x)
        scale = tokens_per_byte(run) / math.log(2) if y == "bits-per-byte" else 1.0
        if train:
            ax.plot([s for s, _ in train], [v * scale for _, v in train], color=colour, linewidth=1)
        if val:
            ax.plot([s for s, _ in val], [v * scale for _, v in val], color=colour, linestyle="--",
                    marker="o", markersize=4)
        handles.append(Line2D([], [], color=colour, linewidth=3, label=name))
    handles += [Line2D([], [], color="grey", linewidth=1, label="train"),
                Line2D([], [], color="grey", linestyle="--", marker="o", markersize=4, label="val")]
    ax.set_xlabel(X_AXES[x][1])
    ax.set_ylabel(Y_AXES[y])
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside right upper", ncols=columns, fontsize="small")
    save_png(fig, out, dpi=110)
    return fig


def _label(token):
    """A token's text as a short, visible tick label."""
    return token.replace("\n", "⏎").replace(" ", "␣").replace("\t", "⇥") or "∅"


def attention_figure(probs, entropies, tokens, layer):
    """One layer's (H, T, T) attention weights, its heads side by side: rows are query
    positions, columns the keys each gathered from, brighter for more weight."""
    from matplotlib.colors import PowerNorm

    heads, length = probs.size(0), len(tokens)
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    fig = _figure(figsize=(4 * cols + 1, 4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[heads:]:
        ax.set_axis_off()
    for h, ax in zip(range(heads), axes.flat):
        # A square-root colour scale, so that weight spread thinly over many keys stays visible.
        image = ax.imshow(probs[h].numpy(), cmap="viridis", norm=PowerNorm(0.5, 0, 1),
                          interpolation="nearest")
        ax.set_title(f"head {h}: entropy {entropies[h]:.2f} nats", fontsize="medium")
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        if length <= 48:  # beyond that, tick labels would overlap
            labels = [_label(t) for t in tokens]
            ax.set_xticks(range(length), labels, fontsize=6, rotation=90)
            ax.set_yticks(range(length), labels, fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    fig.suptitle(f"layer {layer} attention weights: what each query gathered from which key "
                 "(not why the model decided)")
    return fig


def attention_maps(maps, entropies, tokens, out_dir):
    """out_dir/attention_layerN.png for each layer's weights (see attention_figure); returns
    the paths written."""
    _require_matplotlib()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create folder {out_dir}: {err.strerror or err}") from None
    paths = []
    for layer, (probs, layer_entropies) in enumerate(zip(maps, entropies)):
        path = out_dir / f"attention_layer{layer}.png"
        save_png(attention_figure(probs, layer_entropies, tokens, layer), path, dpi=100)
        paths.append(path)
    return paths
