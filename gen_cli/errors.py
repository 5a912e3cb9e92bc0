"""The project's error types: a user mistake with a message that says what to do, and a broken invariant."""


class GenError(Exception):
    """A user-facing error; the CLI prints its message and exits with `exit_code`.

    `params` names the values the message speaks of (`max_new_tokens`, `temperature`): the library
    never names a command-line flag, and the CLI shows each such name as its flag where it has one.
    """

    exit_code = 1

    def __init__(self, message: str, *, params: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.params = params


class UsageError(GenError):
    """Bad usage (an impossible value, a missing input): exit code 2."""

    exit_code = 2


class InternalError(RuntimeError):
    """An invariant of gen's own code broke (a bug, not a user mistake): never a usage error."""
