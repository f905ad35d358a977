"""Which of jfexport's source files one request runs through, from the HTTP route to the engine calls
and back: the layout's measure of how far a reader must follow one request (docs/architecture.md).

The request is real: the server's ASGI app over a runtime on a build folder, one request sent through
httpx in-process. A profiler on every thread (the scheduler's worker and the request threads are
started after it is installed) records the files whose functions run while the request is in flight;
loading and warm-up are not counted.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from types import FrameType

import httpx

import jfexport

# The repository's code folders: what counts as one of our files.
_ROOT = Path(jfexport.__file__).resolve().parent.parent
_FOLDERS = tuple(str(_ROOT / name) + "/" for name in ("jfexport", "reference", "export", "runtime"))

IMAGE_REQUEST = ("/v1/images/generations", {"prompt": "a red circle", "n": 1, "steps": 2, "seed": 0})


class _Recorder:
    def __init__(self) -> None:
        self.active = False
        self.files: set[str] = set()

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if self.active and event == "call":
            name = frame.f_code.co_filename
            if name.startswith(_FOLDERS):
                self.files.add(str(Path(name).relative_to(_ROOT)))


def request_files(engines: str | Path, route: str = IMAGE_REQUEST[0], body: dict | None = None) -> list[str]:
    """The sorted repository-relative paths of the files one request to `route` runs code in."""
    from jfexport.runtime.pipelines import JanusFlowRuntime
    from jfexport.runtime.serving.app import build_app

    recorder = _Recorder()
    threading.setprofile(recorder)
    previous = sys.getprofile()
    try:
        runtime = JanusFlowRuntime.from_engines(engines)
        try:
            app = build_app(runtime)
            payload = IMAGE_REQUEST[1] if body is None else body

            async def send() -> httpx.Response:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://jfexport") as client:
                    await client.post(route, json=payload)  # warm: first-call imports are not the request's path
                    sys.setprofile(recorder)
                    recorder.active = True
                    try:
                        return await client.post(route, json=payload)
                    finally:
                        recorder.active = False

            response = asyncio.run(send())
        finally:
            runtime.close()
    finally:
        threading.setprofile(None)
        sys.setprofile(previous)
    if response.status_code != 200:
        raise RuntimeError(f"{route} answered {response.status_code}: {response.text[:500]}")
    return sorted(recorder.files)
