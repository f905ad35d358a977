"""Processor errors: project errors (the CLI reports them without a traceback) that are also
ValueErrors, so callers using the processor as a library can catch the standard type."""

from __future__ import annotations

from jfexport.core.errors import CheckpointError, InputError


class ProcessorInputError(InputError, ValueError):
    """A prompt, question or image the processor cannot use."""


class RequestError(InputError, ValueError):
    """A request parameter (seed, temperature, steps, ...) outside its accepted range; the message names it."""


class TokenizerFilesError(CheckpointError, ValueError):
    """Tokenizer or processor files missing from a checkpoint folder, or unreadable."""
