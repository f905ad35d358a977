"""Tokenizer, prompt templates and image preprocessing of the official JanusFlow processor.

The names below load on first use (PEP 562): the request checks and bounds are read by every CLI
command's options, and `jfexport --help` must not pay for torch, which image preprocessing needs.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jfexport.core.processor.errors import ProcessorInputError, RequestError, TokenizerFilesError
    from jfexport.core.processor.image import MAX_PIXELS, load_image, preprocess_image
    from jfexport.core.processor.processor import GenerationBatch, JanusProcessor, UnderstandingBatch
    from jfexport.core.processor.request_checks import check_generation, check_sampling, check_seed, check_text
    from jfexport.core.processor.templates import SYSTEM_PROMPT, generation_prompt, understanding_prompt
    from jfexport.core.processor.tokenizer import JanusTokenizer, Tags, load_tokenizer

_HOMES = {
    "errors": ("ProcessorInputError", "RequestError", "TokenizerFilesError"),
    "image": ("MAX_PIXELS", "load_image", "preprocess_image"),
    "processor": ("GenerationBatch", "JanusProcessor", "UnderstandingBatch"),
    "request_checks": ("check_generation", "check_sampling", "check_seed", "check_text"),
    "templates": ("SYSTEM_PROMPT", "generation_prompt", "understanding_prompt"),
    "tokenizer": ("JanusTokenizer", "Tags", "load_tokenizer"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "GenerationBatch", "JanusProcessor", "JanusTokenizer", "MAX_PIXELS", "ProcessorInputError", "RequestError",
    "SYSTEM_PROMPT", "Tags", "TokenizerFilesError", "UnderstandingBatch", "check_generation", "check_sampling",
    "check_seed", "check_text", "generation_prompt", "load_image", "load_tokenizer", "preprocess_image",
    "understanding_prompt",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
