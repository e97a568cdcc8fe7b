"""What `generate` starts from and where a sample stops: the prompt text and its token ids, and
the stop texts."""

import re
from pathlib import Path

from attnlm.errors import InputError
from attnlm.tasks import START


def prompt_text(prompt, prompt_file):
    """The text of --prompt or of --prompt-file (not both); None when neither is given."""
    if prompt is not None and prompt_file:
        raise InputError("give --prompt or --prompt-file, not both")
    if prompt_file:
        try:
            return Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read prompt file {prompt_file}: {err}") from None
    return prompt


def prompt_ids(tokenizer, text, block_size, warn):
    """The token ids to continue: those of text, or of START (the start of a line) for an empty
    text. A prompt longer than the window is reported to warn(message); generation keeps its
    end."""
    if not text:
        try:
            return tokenizer.encode(START)
        except InputError:
            raise InputError("an empty prompt starts from a newline, which this model's vocabulary "
                             "lacks; give a --prompt") from None
    ids = tokenizer.encode(text)
    if len(ids) > block_size:
        warn(f"the prompt is {len(ids)} tokens, longer than the model's {block_size}-token "
             f"window; keeping its last {block_size}")
    return ids


def unescape(text):
    """Read \\n, \\t and \\\\ in a --stop value as newline, tab and backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


def stop_texts(stops):
    """The texts a sample ends before: each of stops, and for one holding a newline, the same
    with Windows line ends ("\\r\\n"), so that `--stop '\\n'` ends a line of CRLF text too, its
    "\\r" withheld with the "\\n"."""
    stops = [s for s in stops if s]
    windows = [s.replace("\n", "\r\n") for s in stops if "\n" in s and "\r\n" not in s]
    return list(dict.fromkeys(stops + windows))
