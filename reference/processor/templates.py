"""Prompt strings of the official procedures (DeepSeek SFT template, `sep="\\n\\n"`)."""

from __future__ import annotations

from ..errors import InputError

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)


def _require(text: str, what: str) -> str:
    if not text or not text.strip():
        raise InputError(f"empty {what}")
    return text.strip()


def understanding_prompt(question: str, system_prompt: str = SYSTEM_PROMPT, image_tag: str = "<image_placeholder>") -> str:
    question = _require(question, "question")
    return f"{system_prompt}\n\nUser: {image_tag}\n{question}\n\nAssistant:".strip()


def generation_prompt(prompt: str) -> str:
    """The demo's text-to-image prompt (empty system prompt); the caller appends the image tag."""
    return f"User: {_require(prompt, 'prompt')}\n\nAssistant:"
