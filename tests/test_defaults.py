"""One table of defaults (`jfexport.defaults`): every entry point means the same by an omitted setting."""

from __future__ import annotations

import inspect

import pytest

from jfexport import defaults
from jfexport.cli import cli


def _default(command: str, option: str):
    return next(p.default for p in cli.commands[command].params if p.name == option)


@pytest.mark.parametrize("command, option, value", [
    ("generate", "steps", defaults.STEPS), ("generate", "cfg", defaults.CFG), ("generate", "seed", defaults.SEED),
    ("generate", "num_images", defaults.IMAGES_PER_PROMPT),
    ("chat", "max_new_tokens", defaults.MAX_NEW_TOKENS), ("chat", "temperature", defaults.TEMPERATURE),
    ("chat", "top_p", defaults.TOP_P), ("chat", "seed", defaults.SEED),
    ("bench", "max_new_tokens", defaults.MAX_NEW_TOKENS), ("bench", "steps", defaults.STEPS),
    ("bench-serve", "max_new_tokens", defaults.MAX_NEW_TOKENS), ("bench-serve", "steps", defaults.STEPS),
    ("eval", "steps", defaults.STEPS), ("verify", "steps", defaults.STEPS),
    ("build", "max_batch", defaults.MAX_BATCH), ("serve", "max_queue", defaults.MAX_QUEUE),
    ("serve", "port", defaults.PORT), ("serve", "host", defaults.HOST), ("serve", "model_name", defaults.MODEL_NAME),
    ("serve", "request_timeout", defaults.REQUEST_TIMEOUT_S), ("serve", "grace", defaults.GRACE_S),
    ("serve", "max_body_mb", defaults.MAX_BODY_MB), ("serve", "max_image_mb", defaults.MAX_IMAGE_MB),
])
def test_cli_defaults_are_the_table(command, option, value):
    assert _default(command, option) == value


def test_the_runtime_and_the_reference_take_the_table():
    from jfexport.reference.pipelines.reference_pipeline import ReferencePipeline
    from jfexport.runtime.pipelines import JanusFlowRuntime

    for fn in (JanusFlowRuntime.submit_chat, JanusFlowRuntime.chat_stream, ReferencePipeline.chat_stream):
        params = inspect.signature(fn).parameters
        assert params["max_new_tokens"].default == defaults.MAX_NEW_TOKENS, fn
        assert params["temperature"].default == defaults.TEMPERATURE and params["top_p"].default == defaults.TOP_P, fn
    for fn in (JanusFlowRuntime.generate, JanusFlowRuntime.submit_generate, ReferencePipeline.generate_latents):
        params = inspect.signature(fn).parameters
        assert (params["steps"].default, params["cfg"].default, params["seed"].default) == (
            defaults.STEPS, defaults.CFG, defaults.SEED), fn
    assert inspect.signature(JanusFlowRuntime.from_engines).parameters["max_queue"].default == defaults.MAX_QUEUE


def test_the_server_takes_the_table():
    from jfexport.runtime.serving.openai_schema import ChatCompletionRequest, ImageGenerationRequest
    from jfexport.runtime.serving.server import serve
    from jfexport.runtime.serving.service import Limits

    chat, images = ChatCompletionRequest.model_fields, ImageGenerationRequest.model_fields
    assert (chat["temperature"].default, chat["top_p"].default) == (defaults.TEMPERATURE, defaults.TOP_P)
    assert (images["steps"].default, images["cfg_scale"].default, images["n"].default) == (
        defaults.STEPS, defaults.CFG, defaults.IMAGES_PER_PROMPT)
    limits = Limits()
    assert limits.default_max_tokens == defaults.MAX_NEW_TOKENS
    assert limits.request_timeout == defaults.REQUEST_TIMEOUT_S
    assert (limits.max_body_bytes, limits.max_image_bytes) == (int(defaults.MAX_BODY_MB * 2**20),
                                                               int(defaults.MAX_IMAGE_MB * 2**20))
    params = inspect.signature(serve).parameters
    assert (params["max_queue"].default, params["grace"].default, params["port"].default, params["host"].default,
            params["model_id"].default) == (defaults.MAX_QUEUE, defaults.GRACE_S, defaults.PORT, defaults.HOST,
                                            defaults.MODEL_NAME)


def test_readme_documents_the_table():
    from .conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Defaults", 1)[1].split("\n## ", 1)[0]
    for name in ("STEPS", "CFG", "IMAGES_PER_PROMPT", "SEED", "MAX_NEW_TOKENS", "TEMPERATURE", "TOP_P", "MAX_BATCH",
                 "MAX_QUEUE", "REQUEST_TIMEOUT_S", "GRACE_S", "MAX_BODY_MB", "MAX_IMAGE_MB", "PORT"):
        value = getattr(defaults, name)
        assert f"| `{name}` | {value:g} |" in section if isinstance(value, float) else f"| `{name}` | {value} |" in section, name
