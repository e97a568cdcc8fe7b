"""Expected failures, each mapped to an exit code by the CLI (see DESIGN.md)."""


class AttnlmError(Exception):
    """A failure the user can act on; printed as one line, never a traceback."""

    exit_code = 1


class InputError(AttnlmError):
    """Bad usage, config or input data."""

    exit_code = 2


class ConfigError(InputError):
    """One or more invalid config values, reported together."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))
