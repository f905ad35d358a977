"""Prompt strings of the official procedures (DeepSeek SFT template, `sep="\\n\\n"`, JANUSFLOW.md 4.1, 5)."""

from __future__ import annotations

from .errors import ProcessorInputError

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)


def understanding_prompt(question: str, system_prompt: str = SYSTEM_PROMPT, image_tag: str = "<image_placeholder>") -> str:
    if not question.strip():
        raise ProcessorInputError("empty prompt: the question is empty")
    # The official template strips the whole user message, "<tag>\n{question}", so whitespace
    # leading the question survives; only the trailing whitespace goes.
    content = f"{image_tag}\n{question}".strip()
    return f"{system_prompt}\n\nUser: {content}\n\nAssistant:".strip()


def generation_prompt(prompt: str) -> str:
    """The demo's text-to-image prompt (empty system prompt); the caller appends the image tag."""
    if not prompt.strip():
        raise ProcessorInputError("empty prompt")
    return f"User: {prompt.strip()}\n\nAssistant:"
