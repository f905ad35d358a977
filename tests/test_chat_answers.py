"""Chat completions with `n` answers and `logprobs`, against the real server on 127.0.0.1 (issue 23).

Answer i of a request seeded s is the answer of a request seeded s + i alone; logprobs are the
log-softmax of the served logits, compared with the reference model's on the same conversation.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from .serve_helpers import chat_messages, data_url, running_server, shape_image

# The build serves fp32 engines (ONNX Runtime on the CPU): its logits differ from the PyTorch
# reference's by float32 rounding in a different summation order, far below this.
LOGPROB_ATOL = 1e-4
# The bundled model answers this with several words it is unsure between (its colour question it
# answers " red" at any temperature), so sampled answers with different seeds differ.
QUESTION = "Describe the image."
T = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_build):
    with running_server(["--engines", str(default_build)], tmp_path_factory.mktemp("answers") / "server.log") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def messages():
    return chat_messages(data_url(shape_image()), QUESTION)


def _ask(client, messages, **fields):
    return client.chat.completions.create(model="janusflow", messages=messages, **fields)


def test_n_answers_are_the_answers_of_seeds_seed_plus_i(client, messages):
    got = _ask(client, messages, n=3, temperature=T, seed=11, max_tokens=12)
    alone = [_ask(client, messages, temperature=T, seed=11 + i, max_tokens=12) for i in range(3)]
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.message.content for c in got.choices] == [a.choices[0].message.content for a in alone]
    assert [c.finish_reason for c in got.choices] == [a.choices[0].finish_reason for a in alone]
    # Sampled with different seeds the answers differ (the same seed for every row would not).
    assert len({c.message.content for c in got.choices}) > 1
    # As OpenAI counts n answers: the prompt once, every answer's tokens.
    assert got.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert got.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_greedy_answers_are_all_the_same(client, messages):
    got = _ask(client, messages, n=2, max_tokens=12)
    one = _ask(client, messages, max_tokens=12)
    assert [c.message.content for c in got.choices] == [one.choices[0].message.content] * 2
    assert got.usage.completion_tokens == 2 * one.usage.completion_tokens


def test_stop_sequences_end_each_answer_on_its_own(client, messages):
    fields = dict(n=3, temperature=T, seed=11, max_tokens=16)
    free = [c.message.content for c in _ask(client, messages, **fields).choices]
    stop = free[0][2:4]
    assert stop, free
    got = _ask(client, messages, stop=[stop], **fields)
    for text, choice in zip(free, got.choices):
        assert choice.message.content == text.split(stop)[0]
        if stop in text:
            assert choice.finish_reason == "stop"
    assert got.choices[0].finish_reason == "stop"


def test_streamed_answers_carry_their_index(client, messages):
    fields = dict(n=3, temperature=T, seed=11, max_tokens=12, logprobs=True, top_logprobs=2)
    whole = _ask(client, messages, **fields)
    texts, finish, entries = ["", "", ""], [None] * 3, [[], [], []]
    for chunk in _ask(client, messages, stream=True, **fields):
        for c in chunk.choices:
            assert finish[c.index] is None, "a chunk after its answer's finish_reason"
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason
            if c.logprobs is not None:
                entries[c.index] += c.logprobs.content
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert entries == [c.logprobs.content for c in whole.choices]


def _sse(response: httpx.Response) -> list[dict | str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_raw_sse_of_n_answers(server, client, messages):
    body = {"messages": messages, "n": 2, "temperature": T, "seed": 3, "max_tokens": 10,
            "stream": True, "stream_options": {"include_usage": True}}
    whole = _ask(client, messages, n=2, temperature=T, seed=3, max_tokens=10)
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r)
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"] == whole.usage.model_dump(exclude_none=True)
    assert all(e["object"] == "chat.completion.chunk" and len(e["choices"]) == 1 for e in chunks)
    assert len({e["id"] for e in events[:-1]}) == 1
    # Each answer opens with its role, then its text, then one chunk with its finish_reason.
    for i, choice in enumerate(whole.choices):
        mine = [e["choices"][0] for e in chunks if e["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [choice.finish_reason]
        assert "".join(c["delta"].get("content", "") for c in mine) == choice.message.content
        assert all(c["logprobs"] is None for c in mine)
    assert {e["choices"][0]["index"] for e in chunks} == {0, 1}


def _reference_logits(temperature: float = 0.0, seed: int = 0, max_tokens: int = 8):
    """The reference model's tokens and logits [V] per position for the served conversation."""
    from jfexport.reference.bundle import load_bundle
    from jfexport.reference.pipelines.understanding import decode_tokens

    from jfexport.core.schedulers import row_generators

    bundle = load_bundle()
    batch = bundle.processor.understanding_batch([QUESTION], [shape_image()])
    logits: list[torch.Tensor] = []
    with torch.no_grad():
        embeds = bundle.model.prepare_inputs_embeds(batch.input_ids, batch.pixel_values, batch.images_seq_mask,
                                                    batch.images_emb_mask)
        eos = bundle.processor.tokenizer.eos_id
        tokens = [int(t[0]) for t in decode_tokens(bundle.model, embeds, batch.attention_mask, max_tokens, eos,
                                                   temperature, 1.0, row_generators(seed, 1),
                                                   on_logits=lambda x: logits.append(x[0].float()))]
    if eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    return bundle.processor.tokenizer, tokens, logits


@pytest.mark.parametrize("temperature", [0.0, T])
def test_logprobs_are_the_log_softmax_of_the_reference_logits(client, messages, temperature):
    """Sampled or not, the values are the model's distribution, not the temperature-scaled one drawn from."""
    tokenizer, tokens, logits = _reference_logits(temperature, seed=9)
    got = _ask(client, messages, temperature=temperature, seed=9, max_tokens=8, logprobs=True, top_logprobs=5)
    content = got.choices[0].logprobs.content
    assert len(content) == len(tokens) == got.usage.completion_tokens
    for entry, token, row in zip(content, tokens, logits):
        want = torch.log_softmax(row, dim=-1)
        assert bytes(entry.bytes) == tokenizer.token_bytes(token)
        assert entry.logprob == pytest.approx(float(want[token]), abs=LOGPROB_ATOL)
        values, ids = want.topk(5)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [tokenizer.token_bytes(int(i)) for i in ids]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=LOGPROB_ATOL)
    assert b"".join(bytes(e.bytes) for e in content).decode() == got.choices[0].message.content


def test_logprobs_without_top_logprobs_and_none_unasked(client, messages):
    got = _ask(client, messages, n=2, temperature=T, seed=2, max_tokens=8, logprobs=True)
    for choice in got.choices:
        content = choice.logprobs.content
        assert content and all(e.top_logprobs == [] and e.logprob <= 0 for e in content)
        assert b"".join(bytes(e.bytes) for e in content).decode() == choice.message.content
    assert sum(len(c.logprobs.content) for c in got.choices) == got.usage.completion_tokens
    plain = _ask(client, messages, n=2, temperature=T, seed=2, max_tokens=8)
    assert [c.logprobs for c in plain.choices] == [None, None]
    assert [c.message.content for c in plain.choices] == [c.message.content for c in got.choices]


def test_a_token_holding_part_of_a_character_shows_its_bytes():
    """As OpenAI shows such tokens: `bytes:\\xNN`, where decoding the token alone gives U+FFFD."""
    from jfexport.reference.bundle import load_bundle
    from jfexport.runtime.serving.chat import _token_entry

    tokenizer = load_bundle().processor.tokenizer
    vocab = tokenizer.backend.get_vocab()
    half, word = vocab["Ã"], vocab["Ġthe"]  # byte-level spellings of the byte 0xC3 and of " the"
    assert tokenizer.decode([half]) == "\ufffd"
    assert _token_entry(tokenizer, half, -1.5) == {"token": "bytes:\\xc3", "logprob": -1.5, "bytes": [0xC3]}
    assert _token_entry(tokenizer, word, -0.5) == {"token": " the", "logprob": -0.5, "bytes": list(b" the")}
    assert _token_entry(tokenizer, tokenizer.eos_id, 0.0)["token"] == "<｜end▁of▁sentence｜>"
