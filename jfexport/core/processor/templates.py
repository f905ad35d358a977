"""Prompt strings of the official procedures (DeepSeek SFT template, `sep="\\n\\n"`, JANUSFLOW.md 4.1, 5).

The `*_parts` functions return the same string cut into (text, is_user_text) pieces, so the
tokenizer can tell the template's own tags from tag-like strings the user typed.
"""

from __future__ import annotations

from jfexport.core.processor.errors import ProcessorInputError

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


# --- conversations (several turns) -----------------------------------------------------------
#
# The official multi-turn format, deepseek-ai/Janus (commit 1daa72f), followed line by line:
#
#   janus/janusflow/models/processing_vlm.py, VLChatProcessor.apply_sft_template_for_multi_turn_prompts
#   (janus/models/processing_vlm.py has the same lines):
#       conv = get_conv_template(sft_format)              # sft_format = "deepseek"
#       conv.set_system_message(system_prompt)            # process_one passes self.system_prompt
#       for message in conversations:
#           conv.append_message(message["role"], message["content"].strip())
#       sft_prompt = conv.get_prompt().strip()
#
#   janus/utils/conversation.py, template "deepseek": sep="\n\n", sep2="<｜end▁of▁sentence｜>",
#   sep_style=SeparatorStyle.DeepSeek; Conversation.get_prompt, the DeepSeek branch:
#       seps = [self.sep, self.sep2]
#       if system_prompt == "" or system_prompt is None:
#           ret = ""
#       else:
#           ret = system_prompt + seps[0]
#       for i, (role, message) in enumerate(self.messages):
#           if message:
#               ret += role + ": " + message + seps[i % 2]
#           else:
#               ret += role + ":"
#
# The role strings are the conversation's own ("User"/"Assistant", as the JanusFlow demo and
# README write them; the template's `roles` field is not read by this branch). So a user turn
# ends with "\n\n", an assistant turn with "<｜end▁of▁sentence｜>", and the final empty assistant
# turn is "Assistant:". The image turn's content is "<image_placeholder>\n{text}"
# (demo/app_janusflow.py, multimodal_understanding).

SEP = "\n\n"
SEP2 = "<｜end▁of▁sentence｜>"
ROLE_NAMES = {"user": "User", "assistant": "Assistant"}


def check_turns(turns, image_turn: int, names=None) -> None:
    """Roles alternate user/assistant, starting and ending with a user turn; `image_turn` is a
    user turn. Errors name the turn (`names[i]`, default `turns[i]`)."""
    name = (lambda i: names[i]) if names is not None else (lambda i: f"turns[{i}]")
    if not turns:
        raise ProcessorInputError("turns: a conversation needs at least the user's question")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2):
            raise ProcessorInputError(f"{name(i)}: expected a (role, text) pair, got {turn!r:.80}")
        role = turn[0]
        want = "user" if i % 2 == 0 else "assistant"
        if role not in ROLE_NAMES:
            raise ProcessorInputError(f"{name(i)}: the role must be 'user' or 'assistant', got {role!r:.40}")
        if role != want:
            raise ProcessorInputError(f"{name(i)}: expected {'a user' if want == 'user' else 'an assistant'} turn "
                                      f"here, got {role!r}: turns alternate user, "
                                      "assistant, ..., starting and ending with a user turn")
    if len(turns) % 2 == 0:
        raise ProcessorInputError(f"{name(len(turns) - 1)}: the conversation must end with a user turn (the question)")
    if isinstance(image_turn, bool) or not isinstance(image_turn, int) or not 0 <= image_turn < len(turns) \
            or image_turn % 2:
        raise ProcessorInputError(f"image_turn: must be the index of a user turn (0, 2, ..., {len(turns) - 1}), "
                                  f"got {image_turn!r}")


def conversation_parts(turns, image_turn: int = 0, system_prompt: str = SYSTEM_PROMPT,
                       image_tag: str = "<image_placeholder>", system_is_user_text: bool = False,
                       names=None) -> Parts:
    """The official string of a conversation, as (text, is_user_text) parts.

    `turns`: (role, text) pairs, role "user" or "assistant", alternating, starting and ending
    with "user" (the question); `image_turn` is the index of the user turn holding the one image.
    The text of every turn is user text (an assistant turn of the history comes from the client
    too); the separators, role names and the image tag are the template's. A single user turn
    gives exactly `understanding_parts`' string.
    """
    check_turns(turns, image_turn, names)
    name = (lambda i: names[i]) if names is not None else (lambda i: f"turns[{i}]")
    system = system_prompt.lstrip()  # the final .strip() removes what leads it (and "\n\n" if empty)
    parts: Parts = [(system, system_is_user_text), (SEP, False)] if system else []
    last = len(turns) - 1
    for i, (role, text) in enumerate(turns):
        head = f"{ROLE_NAMES[role]}: "
        if i == image_turn:
            # ("<tag>\n" + text).strip(): whitespace leading the text stays, "\n" goes with an empty text.
            body = text.rstrip()
            if not body.strip() and i == last:
                raise ProcessorInputError(f"empty prompt: {name(i)}: the question is empty")
            head += image_tag + ("\n" if body.strip() else "")
            body = body if body.strip() else ""
        else:
            body = text.strip()
            if not body:
                # get_prompt renders an empty message as "Role:" with no separator, gluing the next
                # turn to it: refused rather than reproduced.
                raise ProcessorInputError(f"{name(i)}: the {role} turn is empty")
        parts += [(head, False), (body, True), (SEP if role == "user" else SEP2, False)]
    parts[-1] = (SEP + "Assistant:", False)
    return [p for p in parts if p[0]]


def conversation_prompt(turns, image_turn: int = 0, system_prompt: str = SYSTEM_PROMPT,
                        image_tag: str = "<image_placeholder>") -> str:
    return "".join(text for text, _ in conversation_parts(turns, image_turn, system_prompt, image_tag))
