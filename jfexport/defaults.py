"""The one table of defaults: every entry point (the CLI, the HTTP server, the Ray Serve app, the
runtime API, the benchmarks) takes its defaults from here, so that a request means the same thing
whichever way it arrives. README's "Defaults" section documents this table.

Pure constants: the CLI imports this module to print `--help` without loading torch, and the
runtime and the reference import it without tooling (this module imports only pathlib).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

# -- text-to-image ------------------------------------------------------------------------------
STEPS = 30  # Euler steps of the rectified-flow sampler (the official demo's)
CFG = 2.0  # classifier-free guidance weight (1 = none)
IMAGES_PER_PROMPT = 1
SEED = 0

# -- understanding ------------------------------------------------------------------------------
MAX_NEW_TOKENS = 256  # the longest answer, in tokens
TEMPERATURE = 0.0  # greedy
TOP_P = 0.95

# -- builds -------------------------------------------------------------------------------------
ENGINES = Path("engines/default")
MAX_BATCH = 16  # rows per engine call (CFG takes two per image)
MAX_SEQ = 4096  # at most; the model's max_position_embeddings when smaller

# -- the scheduler and the server ---------------------------------------------------------------
MAX_QUEUE = 64  # requests waiting for admission; past it, Overloaded (HTTP 429)
KV_BUDGET_BYTES = 4 << 30
PREFIX_CACHE_BYTES = 1 << 30  # K/V kept for follow-up turns of conversations (prefix reuse), LRU
HOST = "127.0.0.1"
PORT = 8000
MODEL_NAME = "janusflow"
REQUEST_TIMEOUT_S = 120.0
GRACE_S = 30.0
MAX_GRACE_S = 3600.0  # a drain longer than an hour is a stuck process, not a drain
MAX_BODY_MB = 8.0
MAX_IMAGE_MB = 4.0
MAX_IMAGE_PIXELS = 4096 * 4096  # of an image in a chat request, read from its header before decoding
HEADER_TIMEOUT_S = 10.0  # for a request's headers to arrive; 408 and the connection closed past it
BODY_TIMEOUT_S = 60.0  # for a request's body to arrive; 408 past it
SEND_TIMEOUT_S = 60.0  # an answer waits this long on a client that reads none of it; the connection is closed past it
MAX_HEADER_KB = 64  # 431 past it
MAX_CONNECTIONS = 512  # open connections; past it a new one gets 503 and is closed
# Threads for short blocking work of requests (image decoding, tokenizing, image encoding), off the
# event loop; waiting for results and tokens holds none.
BLOCKING_THREADS = 8

# -- the images API -----------------------------------------------------------------------------
# `quality` as Euler steps (an explicit `steps` wins). Rectified flow's images change little past the
# demo's 30 steps; fewer steps trade detail for time, linearly.
QUALITY_STEPS = {"low": 10, "medium": 20, "high": 30, "auto": STEPS}
OUTPUT_FORMAT: Final = "png"
OUTPUT_COMPRESSION = 100  # jpeg/webp quality, 0-100; webp at 100 is lossless (the PNG's pixels)

# -- choices ------------------------------------------------------------------------------------
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
# What a build folder is compiled for and run by: torch runs the reference model, not a build.
ENGINE_BACKENDS = ("auto", "onnxruntime", "tensorrt")
# What a build holds and what `--precision` picks from it (fp32 graphs are always built).
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
