"""Command line: attnlm train | generate | eval. Parses, builds the config, calls the library and
maps expected errors to one line and an exit code (0 ok, 1 runtime, 2 usage/input, 130 interrupt)."""

import json
import traceback
from pathlib import Path

import click
import yaml

from attnlm import config as config_mod
from attnlm.errors import AttnlmError, InputError


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AttnlmError as err:
            self._fail(ctx, f"error: {err}", err.exit_code)
        except KeyboardInterrupt:
            self._fail(ctx, "interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as err:  # a bug: say so in one line unless --debug asks for the trace
            self._fail(ctx, f"internal error: {type(err).__name__}: {err} (rerun with --debug "
                            "for the traceback)", 1)

    @staticmethod
    def _fail(ctx, message, code):
        if ctx.obj and ctx.obj.get("debug"):
            traceback.print_exc()
        click.echo(message, err=True)
        ctx.exit(code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="attnlm")
@click.pass_context
def cli(ctx, debug):
    """Train, sample and evaluate small causal Transformer language models."""
    ctx.obj = {"debug": debug}


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="YAML config file (see configs/).")
set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override one config value; repeatable. Wins over --config.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines.")


def _run_name(config_path, overrides):
    from attnlm.sweep import run_name

    return "runs/" + run_name(config_path, overrides)


@cli.command()
@config_option
@set_option
@click.option("--out", type=click.Path(file_okay=False),
              help="Run directory [default: runs/ + the config name and overrides].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--dry-run", is_flag=True,
              help="Check the config and data source, print the resolved config, train nothing.")
@json_option
@quiet_option
def train(config_path, overrides, out, resume, dry_run, as_json, quiet):
    """Train a model; writes config, tokenizer, checkpoint and metrics into the run directory.

    Ctrl-C stops after the current step, saves a checkpoint and exits 130; --resume continues.
    """
    from attnlm.interrupt import deferred_interrupts

    with deferred_interrupts():  # first of all: no signal is lost, not even during imports
        from attnlm import run, train as train_mod

        out = out or _run_name(config_path, overrides)
        doc = config_mod.read_yaml(config_path) if config_path else None
        cfg = train_mod.configure(doc, overrides, out, resume)
        if dry_run:
            train_mod.dry_run(cfg, out, resume, quiet)
            tree = config_mod.to_dict(cfg)
            click.echo(json.dumps(tree) if as_json else yaml.safe_dump(tree, sort_keys=False), nl=as_json)
            return
        summary = train_mod.train(cfg, out, resume=resume, quiet=quiet)
    if summary is None:
        click.echo(json.dumps(run.read_summary(out)) if as_json else
                   f"{out} has already run train.max_iters={cfg.train.max_iters} steps; nothing "
                   "trained, summary.json left as it was (raise train.max_iters to go on)")
    elif as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"trained {summary['steps']} steps into {out}: val loss {summary['val_loss']:.4f}, "
                   f"{summary['tokens_per_s'] or 0:,.0f} tokens/s")


def _prompt_text(prompt, prompt_file):
    if prompt is not None and prompt_file:
        raise InputError("give --prompt or --prompt-file, not both")
    if prompt_file:
        try:
            return Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read prompt file {prompt_file}: {err}") from None
    return prompt or ""


def _unescape(text):
    """Read \\n, \\t and \\\\ in a --stop value as newline, tab and backslash."""
    import re

    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


START_TEXT = "\n"  # what an empty prompt starts from: as if at the start of a line


def _prompt_ids(tokenizer, text, block_size):
    if not text:
        try:
            return tokenizer.encode(START_TEXT)
        except InputError:
            raise InputError("an empty prompt starts from a newline, which this model's vocabulary "
                             "lacks; give a --prompt") from None
    ids = tokenizer.encode(text)
    if len(ids) > block_size:
        click.echo(f"warning: the prompt is {len(ids)} tokens, longer than the model's "
                   f"{block_size}-token window; keeping its last {block_size}", err=True)
    return ids


@cli.command()
@click.argument("run")
@click.option("--prompt", help="Text to continue. Empty: start from a newline.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="Read the prompt from a file.")
@click.option("--max-new-tokens", type=int, help="Tokens to generate per sample.")
@click.option("--temperature", type=float, help="Softmax temperature; 0 is greedy.")
@click.option("--top-k", type=int, help="Sample among the k likeliest tokens; 0 disables.")
@click.option("--top-p", type=float,
              help="Sample among the fewest likeliest tokens whose probability reaches p; 1 disables.")
@click.option("--min-p", type=float,
              help="Drop tokens less likely than min-p times the likeliest one; 0 disables.")
@click.option("--repetition-penalty", type=float,
              help="Above 1, tokens already in the text become less likely (CTRL's penalty); "
                   "1 disables.")
@click.option("--stop", multiple=True, metavar="TEXT",
              help="End a sample before this text; repeatable. \\n and \\t mean newline and tab.")
@click.option("--num-samples", type=int, help="Samples to draw, together in one batch.")
@click.option("--seed", type=int, help="Random seed: same seed, same text, with or without the cache.")
@click.option("--no-cache", is_flag=True,
              help="Re-read the whole window at every step instead of using the KV cache (slow; "
                   "for comparison). Produces the same text.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="CPU threads; 0 means all cores.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (each sample's text and token count, tokens/s) "
                   "instead of streaming the text.")
def generate(run, prompt, prompt_file, max_new_tokens, temperature, top_k, top_p, min_p,
             repetition_penalty, stop, num_samples, seed, no_cache, device, threads, as_json):
    """Continue a prompt with a trained model (RUN: a run directory or checkpoint file).

    Text is printed as it is generated; with several samples, the first streams and the others
    follow, each after a line '---'. An option left out takes its value from the run's sample
    config (sample.*). A sample ends after --max-new-tokens tokens, before a --stop text, or at
    the tokenizer's end-of-text token where it has one.

    The context window is the model's block_size tokens: a longer prompt keeps its last
    block_size tokens (with a warning). Once the window is full, generation keeps its last half
    (block_size // 2 tokens) and goes on from there, with or without --no-cache.
    """
    import time

    from attnlm.checkpoint import load_model
    from attnlm.runtime import resolve_device, set_threads
    from attnlm.sampling import Controls, complete

    if threads < 0:
        raise InputError(f"--threads={threads} must not be negative")
    set_threads(threads)
    model, tokenizer, cfg, _ = load_model(run, resolve_device(device))
    s = cfg.sample
    pick = lambda value, default: default if value is None else value
    controls = Controls(pick(temperature, s.temperature), pick(top_k, s.top_k), pick(top_p, s.top_p),
                        pick(min_p, s.min_p), pick(repetition_penalty, s.repetition_penalty))
    controls.check()
    max_new_tokens, num_samples = pick(max_new_tokens, s.max_new_tokens), pick(num_samples, s.num_samples)
    seed = pick(seed, s.seed)
    if max_new_tokens < 0:
        raise InputError(f"--max-new-tokens={max_new_tokens} must not be negative")
    if num_samples < 1:
        raise InputError(f"--num-samples={num_samples} must be at least 1")
    stops = [_unescape(x) for x in stop] if stop else [s.stop]
    text = _prompt_text(prompt, prompt_file) if prompt is not None or prompt_file else s.prompt
    ids = _prompt_ids(tokenizer, text, cfg.model.block_size)

    def show(row, piece):
        if row == 0 and not as_json:
            click.echo(piece, nl=False)

    show(0, text)
    tick = time.perf_counter()
    samples = complete(model, tokenizer, ids, max_new_tokens, controls, num_samples=num_samples,
                       seed=seed, stop=stops, use_cache=not no_cache, on_text=show)
    seconds = time.perf_counter() - tick
    tokens = sum(sample.tokens for sample in samples)
    if as_json:
        click.echo(json.dumps({"prompt": text, "samples": [vars(sample) for sample in samples],
                               "tokens": tokens, "seconds": seconds,
                               "tokens_per_s": tokens / seconds if seconds else None,
                               "cache": not no_cache}))
        return
    click.echo()
    for sample in samples[1:]:
        click.echo("---")
        click.echo(text + sample.text)


@cli.command("eval")
@click.argument("run")
@click.option("--source", help="Evaluate the whole of this source instead of the run's val split.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Windows per batch.")
@click.option("--block-size", type=int, metavar="N",
              help="Read the text in windows of N tokens [default: the trained block_size]. Longer "
                   "than trained tests how the positional scheme extrapolates; learned positions "
                   "cannot.")
@click.option("--examples", type=int, default=500, show_default=True,
              help="Synthetic tasks: held-out examples to score exact match on.")
@click.option("--attention", is_flag=True,
              help="Also report each layer's and head's attention entropy on one text.")
@click.option("--text", help="The text for --attention and --attention-map [default: the first "
                             "block_size tokens of the evaluated text].")
@click.option("--attention-map", type=click.Path(file_okay=False), metavar="DIR",
              help="Write the text's attention weights as PNG heat maps into DIR, one image per "
                   "layer with its heads side by side (implies --attention; needs attnlm[plot]). "
                   "They show what each position gathered, not why the model decided.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="CPU threads; 0 means all cores.")
@json_option
def evaluate(run, source, batch_size, block_size, examples, attention, text, attention_map, device,
             threads, as_json):
    """Loss, perplexity and bits per byte of a trained model (RUN: run directory or checkpoint).

    On a synthetic task (data.source or --source synthetic:...), also the exact-match accuracy of
    greedy answers to held-out prompts, with the accuracy of uniform guessing for scale.

    --attention reports, per layer and head, the entropy of the attention weights (nats), averaged
    over the text's query positions, beside the most it can be (uniform attention over the keys
    each query sees). Attention weights show what was gathered, not why the model decided.
    """
    from attnlm import diagnostics, tasks
    from attnlm.checkpoint import load_model
    from attnlm.data import prepare_source, prepare_training
    from attnlm.evaluate import report, split_loss
    from attnlm.positional import check_context
    from attnlm.runtime import resolve_device, set_threads

    if batch_size < 1 or examples < 1 or (block_size is not None and block_size < 1):
        raise InputError("--batch-size, --block-size and --examples must be positive")
    if threads < 0:
        raise InputError(f"--threads={threads} must not be negative")
    set_threads(threads)
    model, tokenizer, cfg, _ = load_model(run, resolve_device(device))
    block_size = block_size or cfg.model.block_size
    check_context(cfg.model.pos, cfg.model.block_size, block_size)
    if source:
        split, name = prepare_source(source, tokenizer, cfg.data.cache_dir, progress=True), source
    else:
        split = prepare_training(cfg, tokenizer, progress=True)[1]["val"]
        name = f"{cfg.data.source} (val)"
    if len(split) < 2:
        raise InputError(f"{name} has too little text to evaluate ({len(split)} tokens)")
    device = next(model.parameters()).device
    loss = split_loss(model, split, block_size, batch_size, device)
    result = {"source": name, "block_size": block_size, **report(loss, split)}
    spec = source or cfg.data.source
    if tasks.is_synthetic(spec):
        result.update(tasks.evaluate(model, tokenizer, spec, examples))
    if attention or attention_map:
        ids = split.tokens[:block_size].tolist() if text is None else tokenizer.encode(text)
        if not 0 < len(ids) <= block_size:
            raise InputError(f"--text is {len(ids)} tokens; give 1 to block_size={block_size}")
        maps = diagnostics.attention_of(model, ids)
        result["attention"] = diagnostics.entropy_report(maps)
        if attention_map:
            from attnlm.plots import attention_maps

            pieces = [tokenizer.decode([i]) for i in ids]
            paths = attention_maps(maps, result["attention"]["entropy"], pieces, attention_map)
            result["attention"]["maps"] = [str(p) for p in paths]
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{name}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
               f"bits/byte {result['bits_per_byte']:.4f} over {result['tokens']:,} tokens")
    if "exact_match" in result:
        click.echo(f"exact match {result['exact_match']:.2%} on {result['examples']} held-out "
                   f"examples (uniform guessing: {result['chance']:.2g})")
    if "attention" in result:
        a = result["attention"]
        click.echo(f"attention entropy in nats, mean over {a['tokens']} query positions "
                   f"(uniform attention: {a['max_entropy']:.2f}; log T: {a['log_T']:.2f}):")
        for layer, heads in enumerate(a["entropy"]):
            click.echo(f"  layer {layer}: " + "  ".join(f"{e:.2f}" for e in heads))
        for path in a.get("maps", []):
            click.echo(f"wrote {path}")


@cli.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["markdown", "csv"]), default="markdown",
              show_default=True, help="Table format.")
def gather(runs, fmt):
    """One table of many runs (RUNS: run directories, folders of them, or quoted globs).

    A row per finished run: the config values that differ between the runs, the figures of its
    summary.json, and those of RUN/eval.json where present (save one with
    `attnlm eval RUN --json > RUN/eval.json`), as eval_*. Unfinished runs are left out, with a
    warning.
    """
    from attnlm.sweep import find_runs, table, to_csv, to_markdown

    columns, rows, left_out = table(find_runs(runs))
    for run in left_out:
        click.echo(f"warning: {run} has no summary.json (still running or failed); left out",
                   err=True)
    click.echo((to_csv if fmt == "csv" else to_markdown)(columns, rows), nl=False)


@cli.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False),
              help="PNG file to write [default: RUN/loss.png for one run; needed for several].")
@click.option("--log-y", is_flag=True, help="Logarithmic loss axis.")
def plot(runs, out, log_y):
    """Train and val loss curves of one run or several overlaid, as a PNG (RUNS: run
    directories, folders of them, or quoted globs). Needs matplotlib: pip install 'attnlm[plot]'.
    """
    from attnlm.plots import loss_curves
    from attnlm.sweep import find_runs

    found = find_runs(runs)
    if out is None and len(found) > 1:
        raise InputError(f"{len(found)} runs to overlay: say where the plot goes with --out FILE.png")
    out = out or str(found[0] / "loss.png")
    loss_curves(found, out, log_y)
    click.echo(f"wrote {out}")


def main():
    cli(prog_name="attnlm")


