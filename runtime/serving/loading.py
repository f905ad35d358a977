"""Load a runtime over an engines folder and prove it answers before it is served."""

from __future__ import annotations

from pathlib import Path

from jfexport.runtime.errors import RuntimeFailure

from .settings import ServeSettings

# Generous: the warm-up is two Euler steps and two tokens; a build slower than this cannot serve anyway.
WARMUP_TIMEOUT_S = 120


def load_runtime(engines: str | Path, settings: ServeSettings):
    """A JanusFlowRuntime that has generated one image and answered one question.

    Loading checks every graph file against the manifest; the two tiny requests also prove the
    engines run on this machine, so /ready never reports a replica that cannot answer.
    """
    from jfexport.runtime.pipelines import JanusFlowRuntime

    runtime = JanusFlowRuntime.from_engines(engines, backend=settings.backend, precision=settings.precision,
                                           max_queue=settings.max_queue)
    try:
        side = runtime.image_size
        images = runtime.generate(["a red circle"], n=1, steps=2, seed=0, timeout=WARMUP_TIMEOUT_S)
        if len(images) != 1 or images[0].size != (side, side):
            raise RuntimeFailure(f"{engines}: the warm-up generation returned {len(images)} image(s) of "
                                 f"{[im.size for im in images]}, expected one {side}x{side} image")
        runtime.chat([images[0]], ["What colour is the shape?"], max_new_tokens=2, timeout=WARMUP_TIMEOUT_S)
    except BaseException:
        runtime.close()
        raise
    return runtime
