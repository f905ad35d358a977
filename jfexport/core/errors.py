"""The two kinds of errors jfexport reports, each with a message that names the culprit.

- `UserError`: the user's to fix: a bad input, option, file, config, checkpoint or build folder, or
  a failed check. The CLI prints `error: ...` and exits 2; the server answers 4xx.
- `RuntimeFailure`: a valid request the runtime could not complete: a non-finite output, a full
  queue, a timeout, a shutdown. The CLI prints `error: ...` and exits 3; the server answers 5xx
  (429, 503 or 504 where HTTP has a more precise word).

Anything else is a bug in jfexport: the CLI shows its traceback (exit 1), the server answers a 500
that names only the exception's type.
"""


class JanusFlowError(Exception):
    """Base of the errors jfexport reports without a traceback."""


class UserError(JanusFlowError):
    """What the user can fix; the message names the input, file, key or option at fault."""


class ConfigError(UserError):
    pass


class CheckpointError(UserError):
    pass


class InputError(UserError):
    pass


class RuntimeFailure(JanusFlowError):
    """A valid request the runtime could not complete; the message names the graph, output or limit."""


# Process exit codes, one per kind (the CLI and `serve` both end with them).
BUG = 1
USER_ERROR = 2
RUNTIME_FAILURE = 3
INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process the signal ended


def exit_code(error: BaseException) -> int:
    """The exit code a command ends with when `error` stops it."""
    if isinstance(error, UserError):
        return USER_ERROR
    if isinstance(error, RuntimeFailure):
        return RUNTIME_FAILURE
    return BUG
