"""The command line's plumbing: the Group that maps errors to one line and an exit code, and
the options several commands share."""

import contextlib
import os
import sys
import traceback

import click

from attnlm import choices
from attnlm import config as config_mod
from attnlm.errors import AttnlmError, InputError


class Group(click.Group):
    """Expected errors print one line and exit with their code (1 runtime, 2 usage or input);
    130 on Ctrl-C, 141 when the output pipe closes; a bug says so in one line (--debug: the
    traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AttnlmError as err:
            if getattr(err, "shared", False) and os.environ.get("LOCAL_RANK", "0") != "0":
                ctx.exit(err.exit_code)  # every rank has it: each machine's first process says it
            self._fail(ctx, f"error: {err}", err.exit_code)
        except KeyboardInterrupt:
            self._fail(ctx, "interrupted", 130)
        except BrokenPipeError:  # the reader went away (`attnlm generate RUN | head`): stop quietly
            with contextlib.suppress(OSError, ValueError):  # ValueError: not a real file (tests)
                # stdout to /dev/null, so that flushing it at exit does not fail on the pipe
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)  # as a process killed by SIGPIPE
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


@contextlib.contextmanager
def named_as_options(options):
    """An error about a config value that one of the command's options gave names the option
    the user typed (`--top-p 0`, not `sample.top_p=0`). options: {config key: option}."""
    try:
        yield
    except InputError as err:
        message = str(err)
        for key, option in options.items():
            message = message.replace(f"{key}=", f"{option} ").replace(f"{key} ", f"{option} ")
        err.args = (message,)
        raise


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="YAML config file, or a shipped recipe by name: "
                                  f"{', '.join(config_mod.recipe_names())}.")
set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override one config value; repeatable. Wins over --config.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines.")
runs_argument = click.argument("runs", nargs=-1, required=True)
positive = click.IntRange(min=1)


def machine_options(command):
    """--device and --threads, for the commands that load a model: train.device and
    train.threads for this command, checked as those are."""
    command = click.option("--threads", type=int, default=0, show_default=True,
                           help="CPU threads; 0 means all cores.")(command)
    return click.option("--device", default="auto", show_default=True,
                        help=f"{', '.join(choices.DEVICES)} or cuda:N.")(command)


SAMPLING = {  # generate's options, each overriding the run's sample.* value of the same name
    "max_new_tokens": "Tokens to generate per sample.",
    "temperature": "Softmax temperature; 0 is greedy.",
    "top_k": "Sample among the k likeliest tokens; 0 disables.",
    "top_p": "Sample among the fewest likeliest tokens whose probability reaches p; 1 disables.",
    "min_p": "Drop tokens less likely than min-p times the likeliest one; 0 disables.",
    "repetition_penalty": "Above 1, tokens already in the text become less likely (CTRL's "
                          "penalty); 1 disables.",
    "num_samples": "Samples to draw, together in one batch.",
    "seed": "Random seed: same seed, same text, with or without the cache.",
}


def sampling_options(command):
    for name, text in reversed(SAMPLING.items()):
        command = click.option(f"--{name.replace('_', '-')}", name,
                               type=config_mod.KEYS[f"sample.{name}"], help=text)(command)
    return command
