"""The Ray Serve application: `jfexport serve --ray --replicas 2` on a local Ray instance.

The test starts Ray (through the command) and stops it (SIGTERM: serve.shutdown, ray.shutdown).
Two replicas on this 2-core machine; requests go through Ray's HTTP proxy on 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from .serve_helpers import ServerProcess, chat_messages, data_url, free_port, shape_image

pytest.importorskip("ray.serve")

LOAD_S = 12  # the load run's length
REQUEST_TIMEOUT_S = 20  # a client gives up after this: an answer must come sooner


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, default_build):
    port = free_port()
    proc = ServerProcess(["serve", "--ray", "--replicas", "2", "--engines", str(default_build), "--port", str(port)],
                         tmp_path_factory.mktemp("ray") / "ray-serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(url, timeout=240)
        yield url, proc
    finally:
        code = proc.stop(timeout=60)
        assert code == 0, proc.log()[-3000:]


def test_requests_past_a_replicas_queue_get_429_from_the_proxy(tmp_path_factory, default_build):
    """With --max-queue 1 a replica takes one request and Ray's proxy holds one more: the rest are
    refused at once with 429 and Retry-After, not queued without end; the others are answered.
    Its own Ray instance, first in the module: the shared one below starts after it has stopped."""
    port = free_port()
    proc = ServerProcess(["serve", "--ray", "--replicas", "1", "--max-queue", "1", "--engines", str(default_build),
                          "--port", str(port)], tmp_path_factory.mktemp("ray-queue") / "ray-serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(url, timeout=240)
        # 300 Euler steps: about 1.6 s each on this CPU, so the 6 requests overlap the first.
        body = {"prompt": "a red circle", "n": 1, "size": "64x64", "steps": 300}
        answers: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: answers.append(
            httpx.post(f"{url}/v1/images/generations", json=body, timeout=REQUEST_TIMEOUT_S * 3))) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        code = proc.stop(timeout=60)
    assert code == 0, proc.log()[-3000:]
    statuses = sorted(a.status_code for a in answers)
    assert len(answers) == 6 and set(statuses) == {200, 429}, statuses
    assert statuses.count(200) >= 2, statuses  # the replica's request and the one the proxy held
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 429)


def replica_of(response: httpx.Response) -> str:
    return response.headers["x-jfexport-replica"]


def pid_of(replica: str) -> int:
    return int(replica.rsplit(":", 1)[1])


def test_openai_routes_through_ray_proxy(ray_server):
    client = openai.OpenAI(base_url=f"{ray_server[0]}/v1", api_key="unused", max_retries=0, timeout=60)
    answer = client.chat.completions.create(model="janusflow", messages=chat_messages(data_url(shape_image())),
                                            max_tokens=8)
    assert answer.choices[0].message.content.strip() and answer.usage.prompt_tokens > 0
    images = client.images.generate(model="janusflow", prompt="a red circle", n=1, size="64x64",
                                    response_format="b64_json", extra_body={"steps": 4})
    assert len(images.data) == 1 and images.data[0].b64_json
    bad = httpx.post(f"{ray_server[0]}/v1/images/generations", json={"prompt": "x", "size": "9x9"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"


def test_requests_spread_over_both_replicas(ray_server):
    url, _ = ray_server
    body = {"messages": chat_messages(data_url(shape_image())), "max_tokens": 4}
    seen: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(6):
                r = c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                seen.append(replica_of(r))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(seen) == 24 and len(set(seen)) == 2, sorted(set(seen))


def _outcome(r: httpx.Response) -> str:
    if r.status_code == 200:
        return "ok"
    if r.status_code in (429, 503):
        return "retryable"
    # Ray's proxy answers a request whose replica process died under it with a plain-text 500;
    # the app's own errors are JSON. Clients (openai's included) retry a 5xx.
    if r.status_code == 500 and not r.headers.get("content-type", "").startswith("application/json"):
        return "replica died"
    return f"unexpected {r.status_code}: {r.text[:200]}"


def test_killed_replica_is_replaced_and_no_client_hangs(ray_server):
    url, _ = ray_server
    chat = {"messages": chat_messages(data_url(shape_image())), "max_tokens": 16}
    image = {"prompt": "a red circle", "steps": 30}
    outcomes: list[tuple[str, float, float]] = []  # (outcome, start, seconds)
    stop_at = time.monotonic() + LOAD_S

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as c:
            while time.monotonic() < stop_at:
                start = time.monotonic()
                try:
                    path, body = ("/v1/chat/completions", chat) if k % 2 else ("/v1/images/generations", image)
                    r = c.post(path, json=body)
                    result = _outcome(r)
                except httpx.TimeoutException:
                    result = "hung"
                except httpx.TransportError:  # the connection broke: retryable
                    result = "retryable"
                outcomes.append((result, start, time.monotonic() - start))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    victim = replica_of(httpx.get(f"{url}/v1/models"))
    killed_at = time.monotonic()
    os.kill(pid_of(victim), signal.SIGKILL)
    for t in threads:
        t.join(LOAD_S + REQUEST_TIMEOUT_S + 5)
    assert not any(t.is_alive() for t in threads)

    kinds = {o for o, _, _ in outcomes}
    assert kinds <= {"ok", "retryable", "replica died"}, kinds
    assert max(s for _, _, s in outcomes) < REQUEST_TIMEOUT_S
    failed = [o for o in outcomes if o[0] != "ok"]
    assert len(failed) <= 4, failed  # at most the requests in flight on the killed replica
    assert sum(1 for o, start, _ in outcomes if o == "ok" and start > killed_at) >= 10  # served on

    with pytest.raises(ProcessLookupError):
        os.kill(pid_of(victim), 0)
    deadline = time.monotonic() + 90
    replicas: set[str] = set()
    while time.monotonic() < deadline:
        replicas = {replica_of(httpx.get(f"{url}/v1/models")) for _ in range(10)}
        if len(replicas) == 2 and victim not in replicas:
            break
        time.sleep(1)
    assert len(replicas) == 2 and victim not in replicas, replicas


def test_hostile_input_through_the_proxy_is_the_same_named_4xx(ray_server):
    """What the plain server answers with a named 4xx, Ray's proxy passes on as is (not its plain-text 500)."""
    url, proc = ray_server
    broken = data_url(shape_image()).replace("iVBORw0KGgo", "iVBORw0KGgp", 1)  # a PNG whose signature is off by a bit
    bmp = io.BytesIO()
    shape_image().save(bmp, format="BMP")
    truncated = io.BytesIO()
    shape_image().save(truncated, format="PNG")
    cases = [
        ("/v1/chat/completions", {"messages": chat_messages(broken), "max_tokens": 1}, 400,
         "messages[0].content[0].image_url.url"),
        ("/v1/chat/completions", {"messages": chat_messages(
            "data:image/bmp;base64," + base64.b64encode(bmp.getvalue()).decode()), "max_tokens": 1}, 400,
         "messages[0].content[0].image_url.url"),
        ("/v1/chat/completions", {"messages": chat_messages(
            "data:image/png;base64," + base64.b64encode(truncated.getvalue()[:120]).decode()), "max_tokens": 1}, 400,
         "messages[0].content[0].image_url.url"),
        ("/v1/images/generations", {"prompt": "x", "size": "\ud800"}, 400, "size"),
        ("/v1/chat/completions", {"messages": chat_messages(data_url(shape_image())), "temperature": 1e-39}, 400,
         "temperature"),
    ]
    with httpx.Client(base_url=url, timeout=60) as client:
        for path, body, status, param in cases:
            r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            assert r.status_code == status and r.headers["content-type"].startswith("application/json"), r.text[:300]
            assert r.json()["error"]["param"] == param
    assert "Traceback" not in proc.log()


def test_ray_ports_beyond_the_loopback_are_reported(ray_server):
    from jfexport.runtime.serving.ray_local import _descendants, _listening

    _, proc = ray_server
    exposed = _listening(_descendants(proc.proc.pid))
    line = next((x for x in proc.log().splitlines() if "Ray listens beyond 127.0.0.1" in x), "")
    # Ray binds its control ports on all interfaces whatever it is told: the log says which.
    gcs = [p for _, p, name in exposed if name.startswith("gcs_server")]
    assert bool(line) == bool(exposed), (line, exposed)
    assert all(f":{p} (gcs_server)" in line for p in gcs), (line, gcs)


def test_sigterm_lets_in_flight_requests_finish(ray_server):
    """Last: it stops the module's Ray Serve. Requests in flight at the signal are answered in full."""
    url, proc = ray_server
    results: list[tuple[int, float]] = []

    def long_request() -> None:
        # 1000 steps (the bound): 5.4 s alone on the default model, so it spans the signal sent 1.5 s in even on
        # an idle machine (300 steps took 1.8 s and could end before it).
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "n": 2, "steps": 1000},
                       timeout=120)
        results.append((r.status_code, time.monotonic()))

    threads = [threading.Thread(target=long_request) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    signalled = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert proc.proc.wait(120) == 0, proc.log()[-3000:]
    assert [status for status, _ in results] == [200] * 3, results
    assert all(end > signalled for _, end in results)  # they were in flight when the signal came


@pytest.mark.parametrize("args,culprit", [
    ({"replicas": "two"}, "replicas"), ({"replicas": 1.7}, "replicas"), ({"replicas": True}, "replicas"),
    ({"num_cpus": "x"}, "num_cpus"), ({"num_gpus": "nan"}, "num_gpus"), ({"num_cpus": -1}, "num_cpus"),
    ({"grace": 1e9}, "grace"), ({"model": ""}, "model"), ({"precision": "fp64"}, "precision"),
    ({"max_queu": 8}, "unknown argument"),
])
def test_app_arguments_out_of_range_refuse_to_build_the_app(args, culprit):
    from jfexport.runtime.serving.ray_app import build_app

    with pytest.raises(ValueError, match=f"^{culprit}"):
        build_app({"engines": "engines", **args})


def test_a_replica_takes_as_many_requests_as_its_queue():
    """Ray holds back requests past max_ongoing_requests (they wait at the proxy instead of getting
    the scheduler's 429): the app's max_queue must set it, not the default's."""
    from jfexport.runtime.serving.ray_app import build_app

    for max_queue in (7, 200):
        # Application has no public accessor for what it binds; the Deployment's field is public.
        deployment = build_app({"engines": "engines", "max_queue": max_queue})._bound_deployment
        assert deployment.max_ongoing_requests == max_queue
