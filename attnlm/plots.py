"""PNG plots: loss curves of one or more runs, attention heat maps. Needs the optional
matplotlib (`pip install 'attnlm[plot]'`); figures are drawn without pyplot, so no display or
global state is involved."""

import json
import math
from pathlib import Path

from attnlm.errors import InputError


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'attnlm[plot]'") from None


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def read_metrics(run):
    """(train rows, val rows) of a run's metrics.jsonl, each a list of (step, loss)."""
    path = Path(run) / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        raise InputError(f"{run} holds no metrics.jsonl (is it a run directory?)") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not JSON lines ({err})") from None
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return train, val


def loss_curves(runs, out, log_y=False):
    """Train loss (solid) and val loss (dashed, dots) against step, one colour per run, written
    to the PNG file out; returns the figure."""
    _require_matplotlib()
    fig = _figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        train, val = read_metrics(run)
        colour = f"C{i % 10}"
        name = Path(run).name or str(run)
        if train:
            ax.plot(*zip(*train), color=colour, linewidth=1, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), color=colour, linestyle="--", marker="o", markersize=4,
                    label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(out, dpi=110)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer, (probs, layer_entropies) in enumerate(zip(maps, entropies)):
        path = out_dir / f"attention_layer{layer}.png"
        attention_figure(probs, layer_entropies, tokens, layer).savefig(path, dpi=100)
        paths.append(path)
    return paths
