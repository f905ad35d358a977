"""Prompt strings of the official procedures (DeepSeek SFT template, `sep="\\n\\n"`, JANUSFLOW.md 4.1, 5).

The `*_parts` functions return the same string cut into (text, is_user_text) pieces, so the
tokenizer can tell the template's own tags from tag-like strings the user typed.
"""

from __future__ import annotations

from .errors import ProcessorInputError

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

Parts = list[tuple[str, bool]]


def understanding_parts(question: str, system_prompt: str = SYSTEM_PROMPT, image_tag: str = "<image_placeholder>",
                        system_is_user_text: bool = False) -> Parts:
    """`system_is_user_text`: the system prompt came from a request, not from the deployment, so
    it is marked as user text (tag-like strings in it stay plain text, as in the question)."""
    if not question.strip():
        raise ProcessorInputError("empty prompt: the question is empty")
    # The official template strips the whole user message, "<tag>\n{question}", so whitespace
    # leading the question survives; only the trailing whitespace goes. The whole prompt is
    # stripped too, which removes the separator when the system prompt is empty.
    system = system_prompt.lstrip()
    turn = f"\n\nUser: {image_tag}\n" if system else f"User: {image_tag}\n"
    head = [(system, True), (turn, False)] if system_is_user_text else [(system + turn, False)]
    return [
        *head,
        (question.rstrip(), True),
        ("\n\nAssistant:", False),
    ]


def understanding_prompt(question: str, system_prompt: str = SYSTEM_PROMPT, image_tag: str = "<image_placeholder>") -> str:
    return "".join(text for text, _ in understanding_parts(question, system_prompt, image_tag))


def generation_parts(prompt: str, image_tag: str = "") -> Parts:
    """The demo's text-to-image prompt (empty system prompt), followed by `image_tag`."""
    if not prompt.strip():
        raise ProcessorInputError("empty prompt")
    return [("User: ", False), (prompt.strip(), True), ("\n\nAssistant:" + image_tag, False)]


def generation_prompt(prompt: str) -> str:
    """The demo's text-to-image prompt; the caller appends the image tag."""
    return "".join(text for text, _ in generation_parts(prompt))
