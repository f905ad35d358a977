"""Tokenizer, prompt templates and image preprocessing of the official JanusFlow processor."""

from .errors import ProcessorInputError, TokenizerFilesError
from .image import load_image, preprocess_image
from .processor import GenerationBatch, JanusProcessor, UnderstandingBatch
from .templates import SYSTEM_PROMPT, generation_prompt, understanding_prompt
from .tokenizer import JanusTokenizer, Tags, load_tokenizer

__all__ = [
    "GenerationBatch", "JanusProcessor", "JanusTokenizer", "ProcessorInputError", "SYSTEM_PROMPT", "Tags",
    "TokenizerFilesError", "UnderstandingBatch", "generation_prompt", "load_image", "load_tokenizer",
    "preprocess_image", "understanding_prompt",
]
