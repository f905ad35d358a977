"""`jfexport serve` against hostile clients (the real server on 127.0.0.1, real sockets and signals).

Every hostile request gets a named 4xx in OpenAI's error JSON, a bug's 500 closes its connection
cleanly, slow and greedy clients are cut off and logged, and what one client sends cannot starve
the others. One server per module with short header/body timeouts and a small connection cap, so
that those limits are reached in a second; the SIGTERM test has a server of its own.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import signal
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import run_cli
from .serve_helpers import (
    ServerProcess,
    chat_messages,
    data_url,
    free_port,
    metric,
    running_server,
    shape_image,
    wait_for,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MAX_CONNECTIONS = 40
SEND_TIMEOUT_S = 1
IMAGE_PARAM = "messages[0].content[0].image_url.url"


@pytest.fixture(scope="module")
def engines(default_build):
    return default_build


@pytest.fixture(scope="module")
def server(engines, tmp_path_factory):
    with running_server(["--engines", str(engines), "--header-timeout", "1", "--body-timeout", "3",
                         "--send-timeout", str(SEND_TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS),
                         "--request-timeout", "60"],
                        tmp_path_factory.mktemp("hostile") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], timeout=60) as client:
        yield client


def _b64_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def _chat(http, url: str, **fields) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"messages": chat_messages(url), "max_tokens": 1, **fields})


def _named_4xx(r: httpx.Response, status: int | tuple[int, ...], param: str | None = None) -> dict:
    """The error of an OpenAI-style 4xx (JSON whatever the input was), checked for status and param."""
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    error = json.loads(r.content)["error"]
    if param is not None:
        assert error["param"] == param and param in error["message"], error
    return error


# --- images: documented formats only, size from the header, every decoder failure a 400 ----------


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "ICO", "PPM", "SGI", "DDS", "QOI", "IM", "PCX", "TGA"])
def test_formats_not_documented_are_400_naming_the_accepted_ones(http, fmt):
    raw = _encoded(shape_image().convert("RGBA" if fmt == "DDS" else "RGB"), fmt)
    error = _named_4xx(_chat(http, _b64_url(raw)), 400, IMAGE_PARAM)
    assert "accepted format (PNG, JPEG, WEBP, GIF)" in error["message"]


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"lossless": True}),
                                    ("GIF", {"save_all": True})])
def test_documented_formats_are_answered(http, fmt, kw):
    frames = [shape_image(), Image.new("RGB", (64, 64), (0, 0, 255))]
    extra = {"append_images": frames[1:]} if fmt == "GIF" else {}
    raw = _encoded(frames[0], fmt, **kw, **extra)
    r = _chat(http, _b64_url(raw, f"image/{fmt.lower()}"))
    assert r.status_code == 200, r.text


def _png_header_only(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all black: a few kB however large the canvas."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_an_ico_embedding_a_huge_png_is_refused_before_decoding(http):
    png = _png_header_only(9400, 9400)
    # The ICO directory says 16x16; the PNG inside is 88 M pixels (2.4 s and 240 MiB to decode).
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png
    error = _named_4xx(_chat(http, _b64_url(ico, "image/x-icon")), 400, IMAGE_PARAM)
    assert "look like ICO" in error["message"]
    # The same PNG on its own: refused from its header, naming the size.
    error = _named_4xx(_chat(http, _b64_url(png)), 413, IMAGE_PARAM)
    assert "9400x9400" in error["message"] and error["code"] == "image_too_large"


def _seed_images() -> list[bytes]:
    """Small images in every accepted format and mode, and in formats the server refuses."""
    base = shape_image()
    gray16 = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # I;16
    frames = [base, Image.new("RGB", (64, 64), (0, 200, 0))]
    seeds = [_encoded(base, "PNG"), _encoded(base.convert("RGBA"), "PNG"), _encoded(base.convert("P"), "PNG"),
             _encoded(base.convert("1"), "PNG"), _encoded(gray16, "PNG"), _encoded(base.convert("LA"), "PNG"),
             _encoded(base, "PNG", save_all=True, append_images=frames[1:]),  # APNG
             _encoded(base, "JPEG"), _encoded(base, "JPEG", progressive=True), _encoded(base.convert("L"), "JPEG"),
             _encoded(base.convert("CMYK"), "JPEG"), _encoded(base, "WEBP"), _encoded(base, "WEBP", lossless=True),
             _encoded(base.convert("RGBA"), "WEBP"), _encoded(base, "GIF", save_all=True, append_images=frames[1:]),
             _encoded(base, "GIF")]
    for fmt in ("BMP", "TIFF", "PPM", "SGI", "IM", "QOI", "TGA", "PCX", "ICO"):
        seeds.append(_encoded(base, fmt))
    seeds.append(_encoded(base.convert("RGBA"), "DDS"))
    return seeds


def _mutations(seeds: list[bytes], count: int, rng: random.Random) -> list[bytes]:
    """Bit flips, overwritten header bytes, truncations, duplicated and deleted spans of the seeds."""
    out = []
    for _ in range(count):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            how = rng.randrange(6)
            at = rng.randrange(len(raw))
            if how == 0:
                raw[at] ^= 1 << rng.randrange(8)
            elif how == 1:  # the header: sizes, modes, chunk lengths
                at = rng.randrange(min(len(raw), 64))
                raw[at] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
            elif how == 2:
                del raw[rng.randrange(1, len(raw)):]
            elif how == 3:
                span = raw[at:at + rng.randint(1, 64)]
                raw[at:at] = span
            elif how == 4:
                del raw[at:at + rng.randint(1, 32)]
            else:
                raw[at:at + 4] = struct.pack(">I", rng.choice((0, 1, 2**31 - 1, 2**32 - 1, rng.randrange(2**32))))
        if raw:
            out.append(bytes(raw))
    return out


FUZZ_IN_PROCESS = 3000
FUZZ_OVER_HTTP = 300
FUZZ_BUDGET_S = 120  # a bound on the run, not a speed target: the loop stops there whatever it covered


def test_fuzzed_images_are_never_a_server_error_in_the_decoder():
    """Many mutations through the server's decoding itself (no HTTP): a 400/413 or an RGB image."""
    from jfexport.runtime.serving.errors import APIError
    from jfexport.runtime.serving.images import decode_data_url

    rng = random.Random(21)
    outcomes: dict[int, int] = {}
    stop_at = time.monotonic() + FUZZ_BUDGET_S
    for raw in _mutations(_seed_images(), FUZZ_IN_PROCESS, rng):
        if time.monotonic() > stop_at:
            break
        try:
            image = decode_data_url(_b64_url(raw), IMAGE_PARAM, 1 << 20, 4096 * 4096)
            assert image.mode == "RGB"
            status = 200
        except APIError as e:
            assert e.status in (400, 413) and e.param == IMAGE_PARAM, e.message
            status = e.status
        outcomes[status] = outcomes.get(status, 0) + 1
    assert outcomes.get(400, 0) > 100 and outcomes.get(200, 0) > 10, outcomes  # the mutations reached both sides


def test_fuzzed_images_over_http_get_answers_or_named_4xx(server, http):
    rng = random.Random(2121)
    cases = _mutations(_seed_images(), FUZZ_OVER_HTTP, rng)
    statuses: list[int] = []
    stop_at = time.monotonic() + FUZZ_BUDGET_S

    def worker(part: list[bytes]) -> None:
        with httpx.Client(base_url=server[0], timeout=60) as client:
            for raw in part:
                if time.monotonic() > stop_at:
                    return
                r = _chat(client, _b64_url(raw))
                if r.status_code != 200:
                    _named_4xx(r, (400, 413), IMAGE_PARAM)
                statuses.append(r.status_code)

    threads = [threading.Thread(target=worker, args=(cases[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(FUZZ_BUDGET_S + 60)
    assert set(statuses) <= {200, 400, 413} and len(statuses) > 50, sorted(set(statuses))
    assert http.get("/health").status_code == 200
    assert "Traceback" not in server[1].log()


# --- what an error and the access log echo ------------------------------------------------------------


@pytest.mark.parametrize("size", ["\ud800", "éé", "x" * 100_000, "64x64\x00"])
def test_an_echoed_value_is_escaped_and_the_connection_lives_on(server, size):
    body = json.dumps({"prompt": "a red circle", "size": size, "steps": 1})  # ensure_ascii: "\ud800" stays an escape
    with httpx.Client(base_url=server[0], timeout=30) as client:
        r = client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
        error = _named_4xx(r, 400, "size")
        assert len(error["message"]) < 200 and r.content.isascii()
        assert client.get("/health").status_code == 200  # same connection, no reset


def test_unknown_fields_and_models_with_odd_names_are_named_safely(http):
    r = http.post("/v1/images/generations", content=json.dumps({"prompt": "x", "\ud800" * 3: 1}),
                  headers={"content-type": "application/json"})
    _named_4xx(r, 400)
    assert r.content.isascii()
    r = http.post("/v1/images/generations", json={"prompt": "x", "é\x00" * 1000: 1})
    error = _named_4xx(r, 400)
    assert "Unrecognized request argument" in error["message"] and len(error["param"]) < 100
    assert error["param"].startswith("'\\xe9\\x00")
    r = http.post("/v1/images/generations", content=json.dumps({"prompt": "x", "model": "\ud800é" * 1000}),
                  headers={"content-type": "application/json"})
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 200


def test_a_path_or_request_id_cannot_write_lines_or_fields_into_the_access_log(server):
    url, proc = server
    forged = "2026-12-07 12:00:00 INFO jfexport.serve: forged"
    target = "/v1/models%0A" + forged.replace(" ", "%20") + "%0D%1B[31m" + "x" * 1000
    sock = _connect(url)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Request-Id: spoof status=200\r\n"
                 "Connection: close\r\n\r\n".encode())
    status, headers, _ = _read_response(sock, 10)
    sock.close()
    assert status == 404
    ours = headers["x-request-id"]  # an id with a space or `=` is replaced, and the answer names the new one
    assert re.fullmatch(r"[0-9a-f]{32}", ours), ours
    wait_for(lambda: f"request_id={ours} " in proc.log(), 5, "access log line")
    line = next(x for x in proc.log().splitlines() if f"request_id={ours} " in x)
    assert "/v1/models%0A2026-12-07%2012:00:00%20INFO%20jfexport.serve:%20forged%0D%1B" in line and "status=404" in line
    assert len(line) < 500  # the path is cut
    assert not any(x.startswith(forged) for x in proc.log().splitlines())
    assert "spoof" not in proc.log() and "\x1b" not in proc.log()


# --- sampling parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-39, 1e-38, 1e-30, 5e-6])
def test_a_temperature_too_small_to_sample_with_is_400(http, temperature):
    r = _chat(http, data_url(shape_image()), temperature=temperature, max_tokens=2)
    error = _named_4xx(r, 400, "temperature")
    assert "must be 0 (greedy) or at least 1e-05" in error["message"]


def test_the_smallest_temperature_accepted_samples(http):
    r = _chat(http, data_url(shape_image()), temperature=1e-5, max_tokens=4, seed=3)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


# --- bounds: stop sequences, turns, text --------------------------------------------------------


def _long_conversation(turns: int, text: str = "hi") -> list[dict]:
    """`turns` user/assistant messages ending with the question; the image in the first."""
    messages = chat_messages(data_url(shape_image()), text)
    for i in range(turns - 1):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
    return messages


@pytest.mark.parametrize("stop,why", [
    (["x" * 200_000] * 4, "at most 256 characters"),
    ("y" * 257, "at most 256 characters"),
    (["a", "b", "c", "d", "e"], "up to 4"),
])
def test_stop_sequences_are_bounded(http, stop, why):
    r = _chat(http, data_url(shape_image()), stop=stop)
    assert why in _named_4xx(r, 400, "stop")["message"]


def test_the_longest_stop_sequences_cost_one_pass_per_token(http):
    r = _chat(http, data_url(shape_image()), stop=["z" * 256, "q" * 255 + "r", "ab" * 128, "é" * 256], max_tokens=16)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("messages,status,param,why", [
    (lambda: _long_conversation(120_001, "x"), 400, "messages", "at most 1000 items"),
    (lambda: _long_conversation(8001), 400, "messages", "at most 1000 items"),
    (lambda: _long_conversation(11, "word " * 30_000), 413, "messages", "characters of text, at most 262144"),
    (lambda: [{"role": "user", "content": [{"type": "text", "text": "x"}] * 65}], 400, "messages[0].content",
     "at most 64 items"),
])
def test_conversations_are_bounded_up_front(http, messages, status, param, why):
    r = http.post("/v1/chat/completions", json={"messages": messages(), "max_tokens": 1})
    assert why in _named_4xx(r, status, param)["message"]


def test_a_prompt_is_bounded(http):
    r = http.post("/v1/images/generations", json={"prompt": "p" * 300_000})
    _named_4xx(r, 400, "prompt")


def test_heavy_requests_do_not_starve_a_normal_question(server, http):
    """Eight 8,001-turn conversations and eight at the bounds (999 turns, 260 k characters) in flight:
    a question sent after them is answered within a bound far under what the heavy ones cost before
    (a normal question waited 40 s behind eight 8,001-turn requests)."""
    heavy = [{"messages": _long_conversation(8001), "max_tokens": 1},
             {"messages": _long_conversation(999, "w " * 130), "max_tokens": 1}]
    bodies = [json.dumps(heavy[k % 2]).encode() for k in range(16)]
    statuses: list[int] = []

    def send(body: bytes) -> None:
        with httpx.Client(base_url=server[0], timeout=120) as client:
            statuses.append(client.post("/v1/chat/completions", content=body,
                                        headers={"content-type": "application/json"}).status_code)

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    time.sleep(0.5)
    start = time.monotonic()
    r = _chat(http, data_url(shape_image()), max_tokens=4)
    waited = time.monotonic() - start
    for t in threads:
        t.join(120)
    assert r.status_code == 200, r.text
    assert waited < 10, f"a normal question waited {waited:.1f} s behind the heavy requests"
    # The 8,001-turn ones are refused by count; those at the bounds are too long for the model's context.
    assert sorted(set(statuses)) == [400], statuses


def test_the_request_timeout_covers_the_preparation(engines, tmp_path):
    """Sixteen conversations at the bounds need seconds of tokenizing on this machine; a 1 s request
    timeout answers each that is not prepared by then with a 504, not after its preparation."""
    body = json.dumps({"messages": _long_conversation(999, "w " * 130), "max_tokens": 1}).encode()
    with running_server(["--engines", str(engines), "--request-timeout", "1"], tmp_path / "server.log") as (url, _):
        answers: list[httpx.Response] = []

        def send() -> None:
            answers.append(httpx.post(f"{url}/v1/chat/completions", content=body, timeout=60,
                                      headers={"content-type": "application/json"}))

        threads = [threading.Thread(target=send) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(answers) == 16 and {r.status_code for r in answers} <= {400, 504}, [r.status_code for r in answers]
    timed_out = [r for r in answers if r.status_code == 504]
    assert timed_out, "every preparation ended within 1 s: the case was not reached"
    error = timed_out[0].json()["error"]
    assert error["code"] == "timeout" and "preparing it took over 1 s" in error["message"]


# --- slow and greedy clients --------------------------------------------------------------------


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_response(sock: socket.socket, timeout: float) -> tuple[int, dict, bytes]:
    """(status, headers, body) of the one response on `sock`, read until the server closes it."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_headers_sent_byte_by_byte_get_408_and_the_connection_closed(server):
    url, proc = server
    sock = _connect(url)
    start = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    try:
        for byte in b"X-Slow: " + b"a" * 100:  # one byte every 0.1 s: 10 s in all, far past the 1 s allowed
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, headers, body = _read_response(sock, 10)
    sock.close()
    assert status == 408 and json.loads(body)["error"]["code"] == "header_timeout"
    assert headers["connection"] == "close" and time.monotonic() - start < 5
    assert "request headers took over 1 s" in proc.log()


def test_connections_past_the_cap_are_refused_logged_and_freed(server, http):
    url, proc = server
    before = {code: metric(http.get("/metrics").text, "jfexport_errors_total", type=code)
              for code in ("too_many_connections", "header_timeout")}
    socks = [_connect(url) for _ in range(MAX_CONNECTIONS + 20)]
    for s in socks:
        s.sendall(b"GET /health HTTP/1.1\r\n")  # and never the rest
    results = [_read_response(s, 10) for s in socks]
    for s in socks:
        s.close()
    statuses = [status for status, _, _ in results]
    # At most the cap were held (until their header deadline): the rest were refused at once.
    assert statuses.count(408) <= MAX_CONNECTIONS and set(statuses) == {408, 503}, statuses
    refused = next(body for status, _, body in results if status == 503)
    assert json.loads(refused)["error"]["code"] == "too_many_connections"
    assert "refused a connection: 40 are open" in proc.log()
    assert http.get("/health").status_code == 200  # the server serves on once they are gone
    # The guard's answers are error answers too, though no route saw them.
    after = http.get("/metrics").text
    assert metric(after, "jfexport_errors_total", type="too_many_connections") - before["too_many_connections"] == \
        statuses.count(503)
    # Plus, perhaps, the 408 of this test's own kept-alive connection, idle past the 1 s header deadline.
    assert metric(after, "jfexport_errors_total", type="header_timeout") - before["header_timeout"] in (
        statuses.count(408), statuses.count(408) + 1)


def test_oversized_headers_are_431(server):
    sock = _connect(server[0])
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed before all was sent
        pass
    status, _, body = _read_response(sock, 10)
    sock.close()
    assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large"


def test_a_body_that_stalls_gets_408(server):
    sock = _connect(server[0])
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"messages\": ")
    start = time.monotonic()
    status, headers, body = _read_response(sock, 10)
    sock.close()
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
    assert headers["connection"] == "close" and time.monotonic() - start < 5


def test_a_client_that_reads_none_of_its_answer_is_closed_after_the_send_timeout(server, http):
    """A streamed answer far larger than the socket buffers, to a client that never reads: without the send
    timeout the request stays in flight for as long as the client holds the connection."""
    url, proc = server
    body = json.dumps({"messages": chat_messages(data_url(Image.new("RGB", (64, 64), (200, 30, 30)))), "n": 16,
                       "max_tokens": 800, "temperature": 1.0, "seed": 1, "stream": True, "logprobs": True,
                       "top_logprobs": 20}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: never-reads\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: "request_id=never-reads" in proc.log(), 60, "the request ended while its client held on")
        assert "closed a connection whose client read none of its answer for 1 s" in proc.log()
        text = http.get("/metrics").text
        assert metric(text, "jfexport_requests_in_flight") == 0
        wait_for(lambda: metric(http.get("/metrics").text, "jfexport_active_rows", kind="chat") == 0, 5,
                 "its rows freed")
    finally:
        sock.close()
    assert "Traceback" not in proc.log()


# --- metrics and logs of a bug's 500 ------------------------------------------------------------


def test_a_bug_is_a_json_500_that_closes_its_connection_and_is_counted_as_500(engines, tmp_path):
    """A real runtime whose generation has a bug (a method replaced by one that raises), served by
    uvicorn on 127.0.0.1 in this process: the 500 says `Connection: close`, and the metrics and the
    access log count it as 500."""
    import logging

    import uvicorn
    from jfexport.runtime.pipelines import JanusFlowRuntime
    from jfexport.runtime.serving.app import build_app
    from jfexport.runtime.serving.connections import guarded_protocol
    from jfexport.runtime.serving.settings import ServeSettings

    runtime = JanusFlowRuntime.from_engines(engines)
    runtime.submit_generate = lambda *args, **kwargs: 1 / 0
    app = build_app(runtime)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off",
                            http=guarded_protocol(ServeSettings()))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    access = logging.getLogger("jfexport.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        body = json.dumps({"prompt": "a red circle"}).encode()
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        status, headers, payload = _read_response(sock, 10)  # read to the end: the server closes it
        sock.close()
        assert status == 500 and headers["connection"] == "close"
        assert json.loads(payload)["error"]["code"] == "internal_error"
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert metric(text, "jfexport_requests_total", kind="image", status="500") == 1
        assert metric(text, "jfexport_requests_total", kind="image", status="499") == 0
        assert any("status=500 kind=image" in line for line in lines), lines
    finally:
        access.removeHandler(handler)
        server.should_exit = True
        thread.join(10)
        runtime.close()


# --- SIGTERM after the grace: a 503 in OpenAI's format and a prompt exit ---------------------------


def _sigterm_with_requests_in_flight(engines, tmp_path, grace: float, path: str, body: bytes, requests: int,
                                     in_flight: int, signals: tuple[int, ...] = (signal.SIGTERM,),
                                     ) -> tuple[int, float, str, list[httpx.Response]]:
    """A server of its own given SIGTERM (or `signals`, 0.3 s apart) once `in_flight` of `requests` POSTs of
    `body` are in flight: (its exit code, seconds from the first signal to its exit, its log, the answers
    that came back)."""
    port = free_port()
    proc = ServerProcess(["serve", "--engines", str(engines), "--port", str(port), "--grace", str(grace)],
                         tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    responses: list[httpx.Response] = []

    def send() -> None:
        try:
            responses.append(httpx.post(f"{url}{path}", content=body, timeout=60,
                                        headers={"content-type": "application/json"}))
        except httpx.TransportError:  # counted by its absence from the answers
            pass

    try:
        proc.wait_ready(url)
        threads = [threading.Thread(target=send) for _ in range(requests)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while metric(httpx.get(f"{url}/metrics").text, "jfexport_requests_in_flight") < in_flight:
            assert time.monotonic() < deadline, "the requests did not start"
            time.sleep(0.02)
        signalled = time.monotonic()
        for i, sig in enumerate(signals):
            time.sleep(0.3 if i else 0)
            proc.proc.send_signal(sig)
        code = proc.proc.wait(grace + 60)
        exited = time.monotonic() - signalled
        for t in threads:
            t.join(10)
        return code, exited, proc.log(), responses
    finally:
        proc.stop()


@pytest.mark.parametrize("path,body", [
    ("/v1/images/generations", {"prompt": "a red circle", "n": 4, "steps": 1000}),
    ("/v1/chat/completions", {"messages": chat_messages(data_url(Image.new("RGB", (64, 64), (200, 30, 30)))),
                              "n": 16, "max_tokens": 800, "temperature": 1.0}),
])
def test_sigterm_past_the_grace_answers_503_and_exits_0_promptly(engines, tmp_path, path, body):
    grace = 2.0
    code, exited, log, responses = _sigterm_with_requests_in_flight(engines, tmp_path, grace, path,
                                                                    json.dumps(body).encode(), requests=2, in_flight=2)
    assert code == 0 and exited < grace + 1, (code, exited, log[-2000:])
    assert len(responses) == 2
    for r in responses:
        error = _named_4xx(r, 503)
        assert r.headers["retry-after"] and "shutting down" in error["message"]
        assert error["code"] == "shutting_down", error


IMAGES_BODY = json.dumps({"prompt": "a red circle", "n": 4, "steps": 1000}).encode()


def test_a_second_ctrl_c_ends_the_grace_with_the_drains_503s_and_exits_130(engines, tmp_path):
    """uvicorn's force exit cancelled the requests in flight: a plain-text 500 each, a traceback in the
    log, and exit 0 as if the drain had completed."""
    code, exited, log, responses = _sigterm_with_requests_in_flight(
        engines, tmp_path, 60.0, "/v1/images/generations", IMAGES_BODY, requests=2, in_flight=2,
        signals=(signal.SIGINT, signal.SIGINT))
    assert code == 130 and exited < 5, (code, exited, log[-2000:])
    assert len(responses) == 2
    for r in responses:
        assert _named_4xx(r, 503)["code"] == "shutting_down"
    assert "Traceback" not in log and log.count("status=503 kind=image") == 2, log[-2000:]


def test_requests_refused_by_the_drain_are_counted(engines, tmp_path):
    """Refused on arrival, they never counted in flight, and were missing from requests_total."""
    port = free_port()
    proc = ServerProcess(["serve", "--engines", str(engines), "--port", str(port), "--grace", "3"],
                         tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(url)
        long = threading.Thread(target=lambda: httpx.post(f"{url}/v1/images/generations", content=IMAGES_BODY,
                                                          headers={"content-type": "application/json"}, timeout=30))
        long.start()
        wait_for(lambda: metric(httpx.get(f"{url}/metrics").text, "jfexport_requests_in_flight") == 1, 10,
                 "the long request in flight")
        proc.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 503, 5, "draining")
        refused = [httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle"}) for _ in range(3)]
        assert [r.status_code for r in refused] == [503] * 3
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "jfexport_requests_total", kind="image", status="503") == 3
        assert metric(text, "jfexport_errors_total", type="draining") == 3
        long.join(30)
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop()


def test_sighup_drains_as_sigterm_does(engines, tmp_path):
    """A closed terminal's SIGHUP killed the server at once, dropping the requests in flight."""
    code, exited, log, responses = _sigterm_with_requests_in_flight(
        engines, tmp_path, 1.0, "/v1/images/generations", IMAGES_BODY, requests=2, in_flight=2,
        signals=(signal.SIGHUP,))
    assert code == 0 and exited < 3, (code, exited, log[-2000:])
    assert [_named_4xx(r, 503)["code"] for r in responses] == ["shutting_down"] * 2
    assert "SIGHUP: draining" in log


def test_sigterm_while_bodies_arrive_waits_for_them_within_the_grace(engines, tmp_path):
    """A body still arriving at SIGTERM is a request in flight: one that arrives within the grace is
    answered, one that does not gets the drain's 503, and neither meets uvicorn's plain-text 500."""
    grace = 3.0
    port = free_port()
    proc = ServerProcess(["serve", "--engines", str(engines), "--port", str(port), "--grace", str(grace)],
                         tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    body = json.dumps({"messages": chat_messages(data_url(shape_image())), "max_tokens": 2}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    try:
        proc.wait_ready(url)
        late, never = _connect(url), _connect(url)
        for sock in (late, never):
            sock.sendall(head + body[:100])
        wait_for(lambda: metric(httpx.get(f"{url}/metrics").text, "jfexport_requests_in_flight") == 2, 5,
                 "the uploads counted in flight")
        signalled = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)  # past uvicorn's own shutdown timeout (1 s), within the grace
        late.sendall(body[100:])
        late_status, _, late_body = _read_response(late, 10)
        never_status, _, never_body = _read_response(never, 10)
        code = proc.proc.wait(10)
        exited = time.monotonic() - signalled
        late.close()
        never.close()
        log = proc.log()
    finally:
        proc.stop()
    assert late_status == 200 and json.loads(late_body)["choices"], late_body[:300]
    assert never_status == 503 and json.loads(never_body)["error"]["code"] == "shutting_down", never_body[:300]
    assert code == 0 and exited < grace + 1.5, (code, exited, log[-2000:])
    assert "Traceback" not in log and log.count("status=503 kind=chat") == 1, log[-2000:]


def test_sigterm_while_preparation_runs_on_the_pool_exits_promptly(engines, tmp_path):
    """Conversations at the bounds keep the pool's threads tokenizing for seconds; a thread cannot be
    stopped, so past the grace the requests get their 503 and the process exits without them."""
    grace = 0.5
    body = json.dumps({"messages": _long_conversation(999, "w " * 130), "max_tokens": 1}).encode()
    code, exited, log, responses = _sigterm_with_requests_in_flight(engines, tmp_path, grace, "/v1/chat/completions",
                                                                    body, requests=16, in_flight=8)
    assert code == 0 and exited < grace + 1, (code, exited, log[-2000:])
    # Each answered (a refusal of its length if its preparation ended in time, else the drain's 503):
    # none waited for a plain-text 500 from uvicorn's shutdown.
    assert responses and {r.status_code for r in responses} <= {400, 503}, [r.text[:200] for r in responses]
    assert 503 in {r.status_code for r in responses}
    for r in responses:
        _named_4xx(r, (400, 503))
    assert "request thread(s) still busy" in log


# --- configuration checked before anything is loaded --------------------------------------------


@pytest.mark.parametrize("args,env,message", [
    (["--api-key", ""], {}, "--api-key is empty"),
    (["--api-key", "  "], {}, "--api-key is empty"),
    ([], {"JFEXPORT_API_KEY": ""}, "JFEXPORT_API_KEY is empty"),
    (["--port", "99999"], {}, "99999 is not in the range 1<=x<=65535"),
    (["--port", "0"], {}, "0 is not in the range"),
    (["--max-body-mb", "nan"], {}, "must be a finite number > 0, got nan"),
    (["--max-body-mb", "-1"], {}, "must be a finite number > 0, got -1"),
    (["--max-image-mb", "inf"], {}, "must be a finite number > 0, got inf"),
    (["--request-timeout", "0"], {}, "must be a finite number > 0"),
    (["--grace", "-3"], {}, "--grace"),
    (["--max-queue", "0"], {}, "--max-queue"),
    (["--model-name", " "], {}, "--model-name"),
    (["--grace", "nan"], {}, "must be a number in 0 .. 3600, got nan"),
    (["--host", ""], {}, "--host"),
    (["--api-key", "s3cret "], {}, "--api-key has whitespace around it"),
    ([], {"JFEXPORT_API_KEY": " s3cret"}, "JFEXPORT_API_KEY has whitespace around it"),
    (["--max-image-mb", "1e-30"], {}, "less than a byte"),
])
def test_bad_options_are_refused_before_loading(tmp_path, args, env, message):
    """click's own runner, in this process: the command must stop before it listens or loads."""
    from click.testing import CliRunner

    from jfexport.commands.serve_cmd import serve_cmd

    environment = {"JFEXPORT_API_KEY": None, **env}  # None: unset for the run
    res = CliRunner(env=environment).invoke(serve_cmd, ["--engines", str(tmp_path / "no-engines"),
                                                        "--port", str(free_port()), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert "listening on" not in res.output


def test_serve_on_ray_names_a_folder_that_is_no_build_before_ray_starts(tmp_path):
    """Ray's failed deployment took 22 s and printed seven tracebacks, exit 1."""
    res = run_cli("serve", "--ray", "--engines", str(tmp_path / "no-engines"), "--port", str(free_port()), timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: "), res.stderr[-2000:]
    assert "no-engines: engines folder does not exist" in res.stderr and "Traceback" not in res.stderr


def test_a_port_in_use_is_reported_before_loading(engines, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        res = run_cli("serve", "--engines", str(engines), "--port", str(port), timeout=60)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])  # a user error (README "Defaults"); never 134
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr and "in use" in res.stderr
    assert "listening on" not in res.stderr and time.monotonic() - start < 30
