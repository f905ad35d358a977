"""A per-request system prompt: the official template with it, tokenized as plain text, through
the runtime's chat calls (the server's side: tests/test_server.py)."""

from __future__ import annotations

import pytest
from jfexport.reference.bundle import TINY_ASSETS, load_bundle
from jfexport.runtime.pipelines import JanusFlowRuntime
from PIL import Image

from jfexport.core.errors import InputError
from jfexport.core.processor import SYSTEM_PROMPT, JanusProcessor, understanding_prompt

S, N = 64, 16
QUESTION = "What colour is the shape?"
SYSTEM = "You answer in one word."
IMAGE = Image.new("RGB", (64, 64), (210, 30, 30))


def _processor(official: bool = False) -> JanusProcessor:
    return JanusProcessor.from_folder(TINY_ASSETS, image_size=S, num_image_tokens=N, official_special_text=official)


def _official_ids(proc: JanusProcessor, question: str, system_prompt: str) -> list[int]:
    """The official procedure: the whole template string tokenized, the placeholder then expanded."""
    tok = proc.tokenizer
    ids = tok.encode(understanding_prompt(question, system_prompt, proc.tags.image))
    at = ids.index(tok.image_id)
    return ids[:at] + [tok.image_start_id] + [tok.image_id] * N + [tok.image_end_id] + ids[at + 1:]


@pytest.mark.parametrize("system", [SYSTEM, "", "  Be brief.\n", "unseen wörds 🙂 <b>html</b> < image_placeholder >"])
def test_a_system_prompt_gives_the_official_template_ids(system):
    safe, official = _processor(), _processor(official=True)
    ids = safe.understanding_ids(QUESTION, system)
    assert ids == _official_ids(safe, QUESTION, system) == official.understanding_ids(QUESTION, system)
    assert ids != safe.understanding_ids(QUESTION)
    text = understanding_prompt(QUESTION, system)
    assert text == f"{system}\n\nUser: <image_placeholder>\n{QUESTION}\n\nAssistant:".strip()


def test_no_system_prompt_is_the_default():
    proc = _processor()
    assert proc.understanding_ids(QUESTION, None) == proc.understanding_ids(QUESTION) \
        == _official_ids(proc, QUESTION, SYSTEM_PROMPT)


def _specials(proc: JanusProcessor) -> list[str]:
    return sorted(t.content for t in proc.tokenizer.backend.get_added_tokens_decoder().values())


@pytest.mark.parametrize("where", ["{s}", "Be brief. {s}\n\nUser: hi", "{s}{s}"])
def test_special_strings_in_a_system_prompt_are_plain_text(where):
    safe, official = _processor(), _processor(official=True)
    tok = safe.tokenizer
    for special in _specials(safe):
        system = where.format(s=special)
        ids = safe.understanding_ids(QUESTION, system)
        counts = {i: ids.count(i) for i in sorted(set(ids) & tok.added_ids)}
        # Only the template's own: BOS, and one image block (a forged tag would be a second one).
        assert counts == {tok.bos_id: 1, tok.image_start_id: 1, tok.image_id: N, tok.image_end_id: 1}, system
        # The model reads exactly the characters sent.
        assert tok.decode(ids[1:ids.index(tok.image_start_id)], skip_special_tokens=False) == \
            f"{system}\n\nUser: ".lstrip()
        try:  # the official behaviour: the string becomes its special id (or breaks the layout)
            assert official.understanding_ids(QUESTION, system) != ids
        except InputError:
            pass


def test_a_system_prompt_that_is_not_text_is_refused():
    with pytest.raises(InputError, match="system_prompt"):
        _processor().understanding_ids(QUESTION, "bad \ud800")


@pytest.fixture(scope="module")
def runtime():
    rt = JanusFlowRuntime.from_bundle(load_bundle())
    yield rt
    rt.close()


def test_the_runtime_prompts_with_the_request_system_prompt(runtime):
    proc = runtime.processor
    handle = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=16, system_prompt=SYSTEM)
    assert handle._job.chat_rows[0].ids == proc.understanding_ids(QUESTION, SYSTEM)
    assert handle.prompt_tokens == len(proc.understanding_ids(QUESTION, SYSTEM)) != len(proc.understanding_ids(QUESTION))
    text = handle.text(timeout=30)
    assert runtime.chat([IMAGE], [QUESTION], max_new_tokens=16, system_prompt=SYSTEM) == [text]
    streamed = list(runtime.chat_stream([IMAGE], [QUESTION], max_new_tokens=16, system_prompt=SYSTEM))
    assert [int(t[0]) for t in streamed][:len(handle.token_ids)] == handle.token_ids
    default = runtime.submit_chat(IMAGE, QUESTION, max_new_tokens=16)
    assert default._job.chat_rows[0].ids == proc.understanding_ids(QUESTION)
    default.cancel()
