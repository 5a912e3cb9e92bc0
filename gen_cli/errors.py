"""The project's error type: a user mistake with a message that says what to do."""


class GenError(Exception):
    """A user-facing error; the CLI prints its message and exits with `exit_code`."""

    exit_code = 1


class UsageError(GenError):
    """Bad command-line usage (an impossible option value, a missing input): exit code 2."""

    exit_code = 2
