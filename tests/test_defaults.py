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
    ("serve", "header_timeout", defaults.HEADER_TIMEOUT_S), ("serve", "body_timeout", defaults.BODY_TIMEOUT_S),
    ("serve", "send_timeout", defaults.SEND_TIMEOUT_S), ("serve", "max_connections", defaults.MAX_CONNECTIONS),
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
    from jfexport.runtime.batching.scheduler import Scheduler
    from jfexport.runtime.pipelines import JanusFlowRuntime
    from jfexport.runtime.serving.openai_schema import ChatCompletionRequest, ImageGenerationRequest
    from jfexport.runtime.serving.server import serve
    from jfexport.runtime.serving.settings import ServeSettings

    chat, images = ChatCompletionRequest.model_fields, ImageGenerationRequest.model_fields
    assert (chat["temperature"].default, chat["top_p"].default) == (defaults.TEMPERATURE, defaults.TOP_P)
    assert (images["cfg_scale"].default, images["n"].default) == (defaults.CFG, defaults.IMAGES_PER_PROMPT)
    assert ImageGenerationRequest(prompt="x").sampler_steps() == defaults.STEPS
    assert {q: ImageGenerationRequest(prompt="x", quality=q).sampler_steps() for q in defaults.QUALITY_STEPS} == \
        defaults.QUALITY_STEPS
    assert set(images["quality"].annotation.__args__) == set(defaults.QUALITY_STEPS)
    request = ImageGenerationRequest(prompt="x")
    assert (request.output_format, request.compression()) == (defaults.OUTPUT_FORMAT, defaults.OUTPUT_COMPRESSION)
    settings = ServeSettings()
    assert settings.default_max_tokens == defaults.MAX_NEW_TOKENS
    assert (settings.request_timeout, settings.grace, settings.max_queue) == (
        defaults.REQUEST_TIMEOUT_S, defaults.GRACE_S, defaults.MAX_QUEUE)
    assert (settings.max_body_bytes, settings.max_image_bytes) == (int(defaults.MAX_BODY_MB * 2**20),
                                                                   int(defaults.MAX_IMAGE_MB * 2**20))
    assert (settings.header_timeout, settings.body_timeout, settings.send_timeout, settings.max_connections,
            settings.model_id) == (defaults.HEADER_TIMEOUT_S, defaults.BODY_TIMEOUT_S, defaults.SEND_TIMEOUT_S,
                                   defaults.MAX_CONNECTIONS, defaults.MODEL_NAME)
    # The options of `serve` and the Ray app, absent or None, are the table's too.
    assert ServeSettings.from_options({}) == settings == ServeSettings.from_options({"max_queue": None, "grace": None})
    assert ServeSettings.from_options({"max_body_mb": 2, "model": "m", "grace": 0}) == ServeSettings(
        max_body_bytes=2 << 20, model_id="m", grace=0.0)
    params = inspect.signature(serve).parameters
    assert (params["port"].default, params["host"].default, params["settings"].default) == (
        defaults.PORT, defaults.HOST, settings)
    assert inspect.signature(Scheduler).parameters["max_queue"].default == defaults.MAX_QUEUE
    for build in (JanusFlowRuntime, JanusFlowRuntime.from_engines, JanusFlowRuntime.from_bundle):
        params = inspect.signature(build).parameters
        assert (params["max_queue"].default, params["kv_budget_bytes"].default) == (
            defaults.MAX_QUEUE, defaults.KV_BUDGET_BYTES), build


@pytest.mark.parametrize("options, culprit", [
    ({"max_queue": 0}, "max_queue"), ({"max_queue": 1.5}, "max_queue"), ({"request_timeout": float("nan")}, "request_timeout"),
    ({"max_body_mb": -1}, "max_body_mb"), ({"max_image_mb": "big"}, "max_image_mb"), ({"grace": -1}, "grace"),
    ({"api_key": " "}, "api_key"), ({"api_key": "k\n"}, "api_key"), ({"grace": 1e9}, "grace"),
    ({"grace": float("nan")}, "grace"), ({"model": ""}, "model"), ({"max_body_mb": 1e-30}, "max_body_mb"),
    ({"precision": "fp64"}, "precision"), ({"backend": "cuda"}, "backend"),
])
def test_serve_settings_out_of_range_are_named(options, culprit):
    from jfexport.runtime.serving.settings import ServeSettings

    with pytest.raises(ValueError, match=f"^{culprit}"):
        ServeSettings.from_options(options)


def test_readme_documents_the_table():
    from .conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Defaults", 1)[1].split("\n## ", 1)[0]
    for name in ("STEPS", "CFG", "IMAGES_PER_PROMPT", "SEED", "MAX_NEW_TOKENS", "TEMPERATURE", "TOP_P", "MAX_BATCH",
                 "MAX_QUEUE", "REQUEST_TIMEOUT_S", "GRACE_S", "MAX_BODY_MB", "MAX_IMAGE_MB", "PORT", "HEADER_TIMEOUT_S",
                 "BODY_TIMEOUT_S", "SEND_TIMEOUT_S", "MAX_CONNECTIONS"):
        value = getattr(defaults, name)
        assert f"| `{name}` | {value:g} |" in section if isinstance(value, float) else f"| `{name}` | {value} |" in section, name
    quality = section.split("| `QUALITY_STEPS` |", 1)[1].split("\n", 1)[0]
    for name, steps in defaults.QUALITY_STEPS.items():
        assert (f"{name} {steps}" if name != "auto" else "auto = `STEPS`") in quality, name


def test_readme_serving_table_lists_every_accepted_field():
    from jfexport.runtime.serving.openai_schema import ChatCompletionRequest, ChatMessage, ImageGenerationRequest

    from .conftest import REPO

    readme = (REPO / "README.md").read_text()
    for route, models in (("POST /v1/chat/completions", (ChatCompletionRequest, ChatMessage)),
                          ("POST /v1/images/generations", (ImageGenerationRequest,))):
        row = readme.split(f"| `{route}` |", 1)[1].split("\n", 1)[0]
        for model in models:
            missing = [name for name in model.model_fields if f"`{name}`" not in row and f"`{name}:" not in row]
            assert not missing, (route, missing)
