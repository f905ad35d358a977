"""Tokenizer, prompt templates and image preprocessing of the official JanusFlow processor."""

from jfexport.core.processor.errors import ProcessorInputError, RequestError, TokenizerFilesError
from jfexport.core.processor.image import MAX_PIXELS, load_image, preprocess_image
from jfexport.core.processor.processor import GenerationBatch, JanusProcessor, UnderstandingBatch
from jfexport.core.processor.request_checks import check_generation, check_sampling, check_seed, check_text
from jfexport.core.processor.templates import SYSTEM_PROMPT, generation_prompt, understanding_prompt
from jfexport.core.processor.tokenizer import JanusTokenizer, Tags, load_tokenizer

__all__ = [
    "GenerationBatch", "JanusProcessor", "JanusTokenizer", "MAX_PIXELS", "ProcessorInputError", "RequestError",
    "SYSTEM_PROMPT", "Tags", "TokenizerFilesError", "UnderstandingBatch", "check_generation", "check_sampling",
    "check_seed", "check_text", "generation_prompt", "load_image", "load_tokenizer", "preprocess_image",
    "understanding_prompt",
]
