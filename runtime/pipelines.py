"""`JanusFlowRuntime`: the serving API over a set of engines (any backend).

Concurrency: one runtime is shared by any number of threads. A scheduler (`runtime.batching`)
owns the engines on one worker thread and batches all in-flight requests into each engine call:
images join and leave between Euler steps, questions between tokens. Callers submit and wait;
requests are validated and tokenised on the caller's thread, and progress callbacks and streams
run there too, so a callback may call the runtime again. The queue of requests not yet admitted
is bounded (`max_queue`): past it, `Overloaded` is raised at once.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterator, Mapping

import torch
from PIL import Image

from jfexport import defaults
from jfexport.core.errors import InputError
from jfexport.core.graph_contract import GENERATION_GRAPHS, UNDERSTANDING_GRAPHS
from jfexport.core.images import initial_noise, to_uint8
from jfexport.core.manifest import EnginesError
from jfexport.core.processor import JanusProcessor
from jfexport.core.processor.request_checks import (
    check_choices,
    check_count,
    check_generation,
    check_sampling,
    check_timeout,
    check_top_logprobs,
)
from jfexport.core.schedulers import StopRule, answers_from_stream, row_generators

from .batching.chat_batch import ChatSlots
from .batching.decode_step import ChatExecutor, EngineChatExecutor
from .batching.generation_batch import GenerationRows
from .batching.generation_step import EngineGenerationExecutor, GenerationExecutor
from .batching.handles import ChatHandle, GenerationHandle
from .batching.jobs import CallJob, ChatJob, ChatRow, GenerationJob, stream_rows
from .batching.kv_cache import KVLayout
from .batching.scheduler import Observers, Scheduler
from .engine import Engine
from .errors import check_finite

# Longest sequence when the engines declare none (the torch backend): K/V slots are this long.
DEFAULT_MAX_LEN = defaults.MAX_SEQ
DEFAULT_MAX_ROWS = defaults.MAX_BATCH
DEFAULT_PREFIX_CACHE_BYTES = defaults.PREFIX_CACHE_BYTES


TASK_GRAPHS = {"generate": GENERATION_GRAPHS, "chat": UNDERSTANDING_GRAPHS}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 [N,H,W,3] -> PIL images."""
    return [Image.fromarray(x.numpy()) for x in images]


class JanusFlowRuntime:
    def __init__(self, engines: Mapping[str, Engine], processor: JanusProcessor, latent_shape: tuple[int, int, int],
                 grid: int, image_size: int, max_len: int = DEFAULT_MAX_LEN, max_rows: int = DEFAULT_MAX_ROWS,
                 backend: str = "torch", max_queue: int = defaults.MAX_QUEUE,
                 kv_budget_bytes: int = defaults.KV_BUDGET_BYTES, torch_threads: int | None = None,
                 kv_layout: KVLayout | None = None, prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
                 generation_executor: GenerationExecutor | None = None,
                 chat_executor: ChatExecutor | None = None):
        """`generation_executor` runs the Euler step (default: the engines, `EngineGenerationExecutor`);
        `chat_executor` the decode step (default: the engines, `EngineChatExecutor`)."""
        max_queue = check_count(max_queue, "max_queue", 1)
        kv_budget_bytes = check_count(kv_budget_bytes, "kv_budget_bytes", 0)
        prefix_cache_bytes = check_count(prefix_cache_bytes, "prefix_cache_bytes", 0)
        torch_threads = None if torch_threads is None else check_count(torch_threads, "torch_threads", 1)
        self.engines = engines
        self.processor = processor
        self.latent_shape = latent_shape  # (C, h, w) of one latent
        self.grid = grid
        self.image_size = image_size
        self.max_len = max_len  # longest sequence (prompt + generated tokens) the engines accept
        self.max_rows = max_rows  # batch rows the engines accept (CFG doubles generation rows)
        self.backend = backend
        # `kv_layout` sizes the K/V cache now (from_engines and from_bundle know it); without it the
        # cache is sized at the first prefill. `prefix_cache_bytes`: K/V kept for follow-up turns (0: none).
        observers = Observers()
        generation = GenerationRows(generation_executor or EngineGenerationExecutor(engines, grid),
                                    engines, processor.tokenizer.pad_id, max(1, max_rows // 2),
                                    observers)
        chat = ChatSlots(chat_executor or EngineChatExecutor(engines), processor, max_rows, max_len, kv_budget_bytes,
                         observers, kv_layout, prefix_cache_bytes)
        self.scheduler = Scheduler(generation, chat, observers, max_queue, torch_threads)
        # The worker thread holds the scheduler, not the runtime: a dropped runtime (or the end of
        # the interpreter, before native thread pools are torn down) stops its worker.
        weakref.finalize(self, self.scheduler.close)

    @classmethod
    def from_engines(cls, folder, backend: str = "auto", precision: str | None = None, device: str | None = None,
                     max_queue: int = defaults.MAX_QUEUE, kv_budget_bytes: int = defaults.KV_BUDGET_BYTES,
                     tasks: tuple[str, ...] = ("generate", "chat"), torch_threads: int | None = 1,
                     verify_files: bool = False, engine_threads: int | None = None,
                     prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> "JanusFlowRuntime":
        """A build folder (`jfexport build`): its manifest, graphs and tokenizer. `tasks` limits the
        graphs opened: chat needs no VAE, generation no vision encoder. Every file served is checked
        against the manifest (`verify_files`: a full hash now, else as `load_engines` decides).

        `torch_threads` sets the scheduler thread's torch thread count: over engines, torch only glues
        small tensors between calls, and its thread pool fighting ONNX Runtime's for the same
        cores cost more than the work (measured on 2 cores, 8 images x 30 steps of the default
        model: 1355 ms with torch's default threads, 159 ms with one). None leaves it alone.
        `engine_threads`: ONNX Runtime's intra-op threads per graph (None: its default).
        """
        from .engines_folder import load_engines

        if isinstance(tasks, str) or not isinstance(tasks, (tuple, list)) or not tasks or set(tasks) - set(TASK_GRAPHS):
            raise InputError(f"tasks: expected a tuple of {', '.join(map(repr, TASK_GRAPHS))}, got {tasks!r}")
        if engine_threads is not None:
            engine_threads = check_count(engine_threads, "engine_threads", 1)
        wanted = {g for task in tasks for g in TASK_GRAPHS[task]}
        engines, manifest, chosen = load_engines(folder, backend, precision, device, graphs=wanted,
                                                 verify_files=verify_files, threads=engine_threads)

        model = manifest.model
        tokenizer_dir = engines.tokenizer  # the folder the manifest names, its files checked
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise EnginesError(f"{tokenizer_dir}: no tokenizer files in the build folder (rebuild the engines)")
        graphs = manifest.graphs
        n_tokens = graphs["vision_encoder"].spec.extra["image_tokens"]
        processor = JanusProcessor.from_folder(tokenizer_dir, image_size=model.understanding_image_size,
                                               num_image_tokens=n_tokens)
        latent = model.latent_size
        limits = manifest.limits
        layout = KVLayout.from_spec(graphs["llm_decode"].spec, engines.precision) if "llm_decode" in engines else None
        return cls(engines, processor, (model.latent_channels, latent, latent), model.grid, model.image_size,
                   limits.max_seq, limits.max_batch, chosen, max_queue, kv_budget_bytes, torch_threads, layout,
                   prefix_cache_bytes)

    @classmethod
    def from_bundle(cls, bundle, backend: str = "torch", dtype: torch.dtype = torch.float32, device: str = "cpu",
                    max_queue: int = defaults.MAX_QUEUE, kv_budget_bytes: int = defaults.KV_BUDGET_BYTES,
                    fast: bool | None = None, compile_step: bool = False,
                    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, cuda_graphs: bool | None = None,
                    chunk: int | None = None) -> "JanusFlowRuntime":
        """Engines straight from a loaded model (the `torch` backend).

        `fast` (default: on for CUDA) gives the scheduler the fast torch executors
        (`batching.torch_generation`, `batching.fast_chat`: direct model calls over static
        buffers, SDPA, `chunk` tokens per host round trip, CUDA graphs where `cuda_graphs`, by
        default on CUDA); on CPU they run eagerly, which is how the tests hold them to the engine
        path. `compile_step` (with `fast`) runs their Euler step through torch.compile: each new
        (rows, prompt bucket) shape compiles once, so it suits services that warm their shapes up
        (`bench-torch` times it on and off).
        """
        if backend != "torch":
            raise InputError(f"from_bundle builds the torch backend only; use from_engines(DIR) for {backend!r}")
        from .backends.torch_backend import torch_engines

        on_cuda = torch.device(device).type == "cuda"
        fast = on_cuda if fast is None else fast
        if not fast:
            if compile_step:
                raise InputError("compile_step compiles the fast executors' Euler step: it needs fast=True (or CUDA)")
            if cuda_graphs or chunk is not None:
                raise InputError(f"{'cuda_graphs' if cuda_graphs else 'chunk'} sets up the fast executors: it needs "
                                 "fast=True (or CUDA)")
        size = bundle.latent_size
        grid = bundle.config.image_grid(size)
        max_len = min(bundle.config.language.max_position_embeddings, DEFAULT_MAX_LEN)
        lang = bundle.config.language
        layout = KVLayout(lang.num_hidden_layers, lang.num_key_value_heads, lang.head_dim, dtype)
        engines = torch_engines(bundle, dtype, device)
        generation_executor: GenerationExecutor | None = None
        chat_executor: ChatExecutor | None = None
        if fast:
            from .batching.fast_chat import DEFAULT_CHUNK, TorchChatExecutor
            from .batching.fast_prefill import PrefillGraphs
            from .batching.torch_generation import TorchGenerationExecutor

            graphs = on_cuda if cuda_graphs is None else cuda_graphs
            bundle.model.attention = "sdpa"  # the fused kernels; the engines share the model
            prefills = PrefillGraphs(bundle.model, bundle.processor.tokenizer.pad_id, max_len, graphs)
            generation_executor = TorchGenerationExecutor(bundle.model, grid, graphs, compile_step)
            chat_executor = TorchChatExecutor(bundle.model, graphs, DEFAULT_CHUNK if chunk is None else chunk, prefills,
                                              EngineChatExecutor(engines))
        return cls(engines, bundle.processor, (bundle.latent_channels, size, size), grid, bundle.image_size, max_len,
                   DEFAULT_MAX_ROWS, "torch", max_queue, kv_budget_bytes, None, layout, prefix_cache_bytes,
                   generation_executor, chat_executor)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # -- checks on the caller's thread ----------------------------------------------------------

    def _need(self, graphs: tuple[str, ...], task: str) -> None:
        missing = [g for g in graphs if g not in self.engines]
        if missing:
            raise InputError(f"{task} needs the graph(s) {', '.join(missing)}, which this runtime did not open")

    def _check_rows(self, rows: int, limit: int, what: str) -> None:
        if rows > limit:
            raise InputError(f"{what} needs {rows} batch rows, the engines were built for at most {limit}: ask at most "
                             f"{limit} at once, or rebuild with `jfexport build --max-batch {rows}`")

    def _check_len(self, length: int, what: str, answer: int = 0) -> None:
        """`length` prompt tokens (and room for `answer` new ones) must fit the engines' max_seq."""
        if length + answer <= self.max_len:
            return
        room = f" and the answer may take {answer} (max_new_tokens): {length + answer} tokens," if answer else ","
        raise InputError(f"{what} is {length} tokens{room} the engines were built for at most {self.max_len} "
                         "(max_seq)")

    # -- text-to-image -------------------------------------------------------------------------

    def _generation_job(self, prompts: list[str], n: int, steps: int, cfg: float, seed: int, decode: bool,
                        timeout: float | None, previews: int = 0) -> GenerationJob:
        self._need(GENERATION_GRAPHS if decode else GENERATION_GRAPHS[:-1], "text-to-image")
        n, steps, cfg, seed, previews = check_generation(n, steps, cfg, seed, previews)
        timeout = check_timeout(timeout)
        if not prompts:
            raise InputError("no prompt given")
        ids = [self.processor.generation_ids(p) for p in prompts]
        # More images than one engine call takes are fine: the scheduler admits them in parts.
        images = len(prompts) * n
        self._check_len(max(map(len, ids)) - 1 + 1 + self.grid**2, "prompt + image sequence")
        z0 = initial_noise((images, *self.latent_shape), seed, torch.float32)
        return GenerationJob(ids, n, z0, steps, cfg, decode, timeout, self.scheduler.alive, previews)

    def submit_generate(self, prompt: str | list[str], n: int = defaults.IMAGES_PER_PROMPT, steps: int = defaults.STEPS,
                        cfg: float = defaults.CFG, seed: int = defaults.SEED,
                        timeout: float | None = None, previews: int = 0) -> GenerationHandle:
        """Queue a prompt's `n` images (or those of each prompt of a list, drawn as `generate` draws
        them); the handle's `result()` waits for them.

        `previews` (0-3, fewer than `steps`) per image: the VAE decode of the clean latent the
        sampler heads for, at steps spread before the last (`preview_steps`); iterate
        `handle.previews()` for them as they come. They do not change the images."""
        if not isinstance(prompt, (str, list, tuple)):
            raise InputError(f"prompt: expected text (str) or a list of texts, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        job = self._generation_job(prompts, n, steps, cfg, seed, True, timeout, previews)
        self.scheduler.submit(job)
        return GenerationHandle(job, to_pil)

    def generate_latents(self, prompts: list[str], n: int = defaults.IMAGES_PER_PROMPT, steps: int = defaults.STEPS,
                         cfg: float = defaults.CFG, seed: int = defaults.SEED,
                         on_step: Callable[[int, int], None] | None = None, timeout: float | None = None) -> torch.Tensor:
        job = self._generation_job(prompts, n, steps, cfg, seed, False, timeout)
        self.scheduler.submit(job)
        return GenerationHandle(job, to_pil).latents(on_step=on_step)

    def generate(self, prompts: list[str], n: int = defaults.IMAGES_PER_PROMPT, steps: int = defaults.STEPS,
                 cfg: float = defaults.CFG, seed: int = defaults.SEED,
                 on_step: Callable[[int, int], None] | None = None, timeout: float | None = None) -> list[Image.Image]:
        """`n` images per prompt, in prompt order; the same for a fixed seed whatever runs beside it."""
        job = self._generation_job(prompts, n, steps, cfg, seed, True, timeout)
        self.scheduler.submit(job)
        return GenerationHandle(job, to_pil).result(on_step=on_step)

    def decode_images(self, latents: torch.Tensor) -> list[Image.Image]:
        """VAE decode of finished latents (on the scheduler's thread, between iterations)."""
        self._need(("vae_decoder",), "decoding latents")

        def run() -> torch.Tensor:
            images = self.engines["vae_decoder"].run({"latents": latents})["images"]
            check_finite("vae_decoder", "images", images)
            return to_uint8(images).cpu()

        job: CallJob[torch.Tensor] = CallJob(self.scheduler.alive)
        self.scheduler.call(run, job)
        return to_pil(job.result())

    # -- understanding -------------------------------------------------------------------------

    def _chat_job(self, images: list[Image.Image], questions: list[str], max_new_tokens: int, temperature: float,
                  top_p: float, seed: int, keep_logits: bool, timeout: float | None,
                  system_prompt: str | None = None, history: list[tuple[str, str]] | None = None,
                  image_turn: int = 0, top_logprobs: int | None = None, n: int = 1) -> ChatJob:
        """`n` rows per question (its answers), sharing its prompt and image; row i draws from seed + i."""
        self._need(UNDERSTANDING_GRAPHS, "understanding")
        if len(images) != len(questions) or not questions:
            raise InputError(f"need one image per question, got {len(images)} images for {len(questions)} questions")
        temperature, top_p, seed, max_new_tokens = check_sampling(temperature, top_p, seed, max_new_tokens)
        timeout = check_timeout(timeout)
        self._check_rows(len(questions) * n, self.max_rows,
                         f"{len(questions)} question(s)" if n == 1 else f"{n} answers (n)")
        if history is None and image_turn == 0:
            ids = [self.processor.understanding_ids(q, system_prompt) for q in questions]
            what = "question"
        else:
            ids = [self._conversation_ids(q, history, image_turn, system_prompt) for q in questions]
            what = f"history: the conversation ({len(history or ()) + 1} turns with the question)"
        self._check_len(max(map(len, ids)), what, max_new_tokens)
        gens = iter(row_generators(seed, len(questions) * n))
        rows = [ChatRow(i, pixels, next(gens)) for i, img in zip(ids, images)
                for pixels in [self.processor.pixel_values(img)] for _ in range(n)]
        return ChatJob(rows, StopRule(self.tokenizer.eos_id, max_new_tokens), temperature, top_p,
                       keep_logits, timeout, self.scheduler.alive, top_logprobs)

    def _conversation_ids(self, question: str, history: list[tuple[str, str]] | None, image_turn: int,
                          system_prompt: str | None) -> list[int]:
        history = [] if history is None else history
        if not isinstance(history, (list, tuple)):
            raise InputError(f"history: expected a list of (role, text) pairs, got {type(history).__name__}")
        if len(history) % 2:
            raise InputError(f"history: must end with an assistant turn (the question is the next user turn); "
                             f"got {len(history)} turn(s)")
        names = [f"history[{i}]" for i in range(len(history))] + ["question"]
        return self.processor.conversation_ids([*history, ("user", question)], image_turn, system_prompt, names)

    def submit_chat(self, image: Image.Image, question: str, max_new_tokens: int = defaults.MAX_NEW_TOKENS,
                    temperature: float = defaults.TEMPERATURE, top_p: float = defaults.TOP_P, seed: int = defaults.SEED,
                    timeout: float | None = None,
                    system_prompt: str | None = None, history: list[tuple[str, str]] | None = None,
                    image_turn: int = 0, n: int = 1, top_logprobs: int | None = None) -> ChatHandle:
        """Queue one question; iterate the handle for token ids as they are decoded.

        `n` answers to it, rows of one batch, answer i sampled with seed + i (the answer a request
        seeded seed + i alone gets): `handle.choice(i)`. `top_logprobs`: keep every token's
        log-probability and that many alternatives (`handle.logprobs(i)`, `TokenLogprobs`); None keeps
        none, and the request's logits then never leave the device.

        `system_prompt` replaces the processor's default system prompt for this request (None
        keeps it; "" is none); it is tokenized as plain text, as the question is.

        `history`: earlier turns of the conversation, (role, text) pairs with role "user" or
        "assistant", alternating and starting with "user" (so ending with "assistant"); the
        question is the next user turn. The prompt is the official multi-turn format
        (`JanusProcessor.conversation_ids`), every turn's text plain text. `image_turn` is the
        index, in `history + [("user", question)]`, of the user turn that carries the image: the
        first (0) by default, so with no history the image goes with the question, as without
        these arguments. The whole conversation plus `max_new_tokens` must fit the engines'
        `max_seq` (else an InputError naming the sizes); `handle.prompt_tokens` counts it all."""
        n = check_choices(n)
        if top_logprobs is not None:
            top_logprobs = check_top_logprobs(top_logprobs)
        job = self._chat_job([image], [question], max_new_tokens, temperature, top_p, seed, False, timeout,
                             system_prompt, history, image_turn, top_logprobs, n)
        self.scheduler.submit(job)
        return ChatHandle(job, self.tokenizer, len(job.chat_rows[0].ids))

    def chat_stream(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = defaults.MAX_NEW_TOKENS,
                    temperature: float = defaults.TEMPERATURE, top_p: float = defaults.TOP_P, seed: int = defaults.SEED,
                    on_logits: Callable[[torch.Tensor], None] | None = None,
                    timeout: float | None = None, system_prompt: str | None = None,
                    history: list[tuple[str, str]] | None = None, image_turn: int = 0) -> Iterator[torch.Tensor]:
        """Yield the next token [B] of every (image, question) row; rows that ended get EOS.

        Row i samples with seed + i. `on_logits([B,V])` runs here, before each yield (rows that
        have ended are NaN). Closing or dropping the iterator cancels the request.
        `system_prompt`, `history` and `image_turn`, the same for every row: as in `submit_chat`
        (each row's question follows the same earlier turns, with its own image).
        """
        job = self._chat_job(images, questions, max_new_tokens, temperature, top_p, seed, on_logits is not None, timeout,
                             system_prompt, history, image_turn)
        self.scheduler.submit(job)
        for tokens, logits in stream_rows(job):
            if on_logits is not None and logits is not None:  # logits are kept when on_logits asks for them
                on_logits(logits)
            yield tokens

    def chat(self, images: list[Image.Image], questions: list[str], *, system_prompt: str | None = None,
             history: list[tuple[str, str]] | None = None, image_turn: int = 0, **kwargs) -> list[str]:
        """The answers as text; `kwargs` as for `chat_stream`; `system_prompt`, `history` and
        `image_turn` as for `submit_chat`, the same for every row."""
        return answers_from_stream(self.chat_stream(images, questions, system_prompt=system_prompt, history=history,
                                                    image_turn=image_turn, **kwargs),
                                   len(questions), self.tokenizer)

    # -- service hooks -------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return self.scheduler.stats()

    def add_batch_observer(self, fn: Callable[[str, int], None]) -> None:
        """`fn(kind, rows)` after every batched engine step: "prefill", "chat", "generation", "vae"."""
        self.scheduler.add_observer(fn)

    def close(self) -> None:
        """Stop the scheduler; requests still waiting or running fail with SchedulerStopped."""
        self.scheduler.close()
