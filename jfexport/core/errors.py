"""Errors users see: each names the file, key or input at fault; the CLI turns them into exit codes."""


class JanusFlowError(Exception):
    """Base class of the errors jfexport reports to users without a traceback."""


class ConfigError(JanusFlowError):
    pass


class CheckpointError(JanusFlowError):
    pass


class InputError(JanusFlowError):
    pass
