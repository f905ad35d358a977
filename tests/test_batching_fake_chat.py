"""`ChatSlots` (the chat policy) over a fake chat executor: no engines, no model, no threads, no clock.

The fake's LLM is arithmetic on its K/V cache: each fed token's key is its id, and the next token
is the sum over the row's tokens so far of (position + 1) * token, mod VOCAB. So a row's answer
depends on all of its K/V and on where each sits (a slot moved wrongly, a column written at the
wrong place or a stored prefix that is not the row's own changes it), and `expected` below
computes it without any cache. The decode step itself (`decode_step.run_decode_step`: finite
check, token choice, stopping rule) is the real one.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from jfexport.runtime.batching.chat_batch import ChatSlots
from jfexport.runtime.batching.decode_step import DecodeRows, run_decode_step
from jfexport.runtime.batching.jobs import ChatJob, ChatPart, ChatRow
from jfexport.runtime.batching.kv_cache import KVLayout
from jfexport.runtime.errors import NonFiniteOutput

from jfexport.core.graph_contract import PRESENT, kv_name
from jfexport.core.schedulers import StopRule

VOCAB = 101
IMAGE_ID = 7
NAN = float("nan")
LAYOUT = KVLayout(layers=1, kv_heads=1, head_dim=1, dtype=torch.float64)


def expected(prompt: list[int], count: int) -> list[int]:
    """The fake model's answer, written without K/V: each token is the position-weighted sum of all
    tokens before it."""
    history, out = list(prompt), []
    for _ in range(count):
        out.append(sum((p + 1) * t for p, t in enumerate(history)) % VOCAB)
        history.append(out[-1])
    return out


class FakeExecutor:
    """A chat executor whose LLM is `expected`'s arithmetic over the `KVCache` it is handed. Feeding
    token `poison` gives NaN logits (and writes a NaN key), as a broken row would."""

    column_bucket = 4  # small: the cache's width changes (and its columns move) while rows decode
    draws_ahead = False
    device = "cpu"

    def __init__(self, chunk: int = 1, poison: int | None = None):
        self.chunk, self.poison = chunk, poison
        self.prefills: list[int] = []  # rows per prefill call
        self.forwards: list[int] = []  # tokens per row per prefix-reuse forward call
        self.decodes: list[int] = []  # rows per decode call

    def _logits(self, keys: torch.Tensor, last: int) -> torch.Tensor:
        """[V] logits of a row whose keys (its tokens so far) are `keys`."""
        logits = torch.zeros(VOCAB)
        if last == self.poison:
            return logits.fill_(NAN)
        weights = torch.arange(1, keys.shape[0] + 1, dtype=keys.dtype)
        logits[int((keys.flatten() * weights).sum().item()) % VOCAB] = 1.0
        return logits

    def prefill(self, batch):
        self.prefills.append(batch.input_ids.shape[0])
        mask = batch.attention_mask
        keys = (batch.input_ids * mask).double()[:, None, :, None]  # [n, Hkv=1, W, Dh=1]
        lengths = mask.sum(dim=1).tolist()
        logits = torch.stack([self._logits(keys[i, 0, keys.shape[2] - n:, 0], -1) for i, n in enumerate(lengths)])
        return {"logits": logits, kv_name(PRESENT, 0, "key"): keys, kv_name(PRESENT, 0, "value"): keys}, mask

    def _write(self, cache, slot: int, column: int, token: int) -> torch.Tensor:
        key, value = cache.layers()[0]
        written = NAN if token == self.poison else float(token)
        key[slot, 0, column, 0] = value[slot, 0, column, 0] = written
        return self._logits(key[slot, 0, : column + 1, 0], token)

    def forward(self, cache, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        self.forwards.append(tokens.shape[1])
        cache.fit(max(cache.lengths[s] for s in slots) + tokens.shape[1])
        out = []
        for slot, row in zip(slots, tokens.tolist()):
            for token in row:
                logits = self._write(cache, slot, cache.lengths[slot], token)
                cache.lengths[slot] += 1
            out.append(logits)
        return torch.stack(out)

    def decode(self, cache, rows, slots, k, keep_logits):
        self.decodes.append(len(rows))
        s = DecodeRows(len(rows), k, "cpu", False, all(r.temperature == 0 for r in rows), keep_logits)
        s.load(rows)

        def forward(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            return torch.stack([self._write(cache, slot, int(position[i, 0]), int(token[i, 0]))
                                for i, slot in enumerate(slots)])

        run_decode_step(forward, s)
        for slot in slots:
            cache.lengths[slot] += k
        return s.result(len(rows))


class FakeProcessor:
    tokenizer = SimpleNamespace(image_id=IMAGE_ID)

    @staticmethod
    def understanding_rows(ids: list[list[int]], pixels: list[torch.Tensor]):
        width = max(len(r) for r in ids)
        input_ids = torch.zeros((len(ids), width), dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):  # left-padded, as the real processor's rows
            input_ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return SimpleNamespace(input_ids=input_ids, attention_mask=mask, pixel_values=torch.stack(pixels))


def slots(executor: FakeExecutor, prefix_cache_bytes: int = 0, max_rows: int = 4) -> ChatSlots:
    return ChatSlots(executor, FakeProcessor(), max_rows=max_rows, max_len=64, kv_budget_bytes=1 << 20,
                     observe=lambda kind, rows: None, kv_layout=LAYOUT, prefix_cache_bytes=prefix_cache_bytes)


def job(prompts: list[list[int]], max_new_tokens: int, eos: int = VOCAB + 1) -> ChatJob:
    rows = [ChatRow(p, torch.full((2,), float(i)), torch.Generator().manual_seed(i)) for i, p in enumerate(prompts)]
    return ChatJob(rows, StopRule(eos, max_new_tokens), 0.0, 1.0, False, None, lambda: True)


def whole(*jobs: ChatJob) -> list[ChatPart]:
    """Each job's rows as one part: what the scheduler admits when the slots are free."""
    return [j.take_part(j.rows) for j in jobs]


def run(chat: ChatSlots, limit: int = 100) -> tuple[list[ChatJob], list]:
    """Step until no row is left: (jobs in the order they ended, failures). Failed jobs are dropped
    as the scheduler drops them."""
    ended, failures = [], []
    for _ in range(limit):
        if not chat.rows:
            return ended, failures
        before = chat.jobs()
        for failed, error in chat.step():
            failures.append((failed, error))
            chat.drop(failed)
        ended += [j for j in before if j not in chat.jobs()]
    raise AssertionError("rows still decoding")


@pytest.mark.parametrize("chunk", [1, 3])
def test_rows_of_different_lengths_leave_their_slots_in_any_order(chunk):
    executor = FakeExecutor(chunk)
    chat = slots(executor)
    prompts = [[3, IMAGE_ID, 11], [5, IMAGE_ID, 2, 9, 4, 1], [8, IMAGE_ID, 6, 6]]
    limits = [4, 11, 7]
    jobs = [job([p], n) for p, n in zip(prompts, limits)]
    assert chat.prefill(whole(*jobs)) == []
    assert executor.prefills == [3]  # admitted together: one prefill call
    assert chat.active_rows == 3
    ended, failures = run(chat)
    assert failures == []
    assert ended == [jobs[0], jobs[2], jobs[1]]  # not the admission order: slots were freed from the middle
    for j, p, n in zip(jobs, prompts, limits):
        assert j.chat_rows[0].tokens == expected(p, n) and j.chat_rows[0].finish_reason == "length"
        assert j.finished
    assert chat.cache.rows == 0 and chat.active_rows == 0


def test_one_executor_call_per_step_for_all_rows():
    executor = FakeExecutor()
    chat = slots(executor)
    chat.prefill(whole(job([[1, IMAGE_ID, 2]], 3), job([[4, IMAGE_ID, 5, 6], [2, IMAGE_ID]], 6)))
    calls = []
    while chat.rows:
        rows = chat.active_rows
        count = len(executor.decodes)
        chat.step()
        calls.append((len(executor.decodes) - count, executor.decodes[-1], rows))
    assert [c[0] for c in calls] == [1] * len(calls)  # one call per iteration
    assert all(got == rows for _, got, rows in calls)  # holding every active row
    assert [rows for *_, rows in calls] == [3, 3, 2, 2, 2]


@pytest.mark.parametrize("chunk", [1, 3])
def test_eos_and_max_new_tokens_stop_rows(chunk):
    prompts = [[2, IMAGE_ID, 3], [9, IMAGE_ID, 1, 1]]
    eos = expected(prompts[0], 10)[2]  # row 0 emits it as its third token (mid-chunk for chunk 3)
    assert eos not in expected(prompts[1], 8) + expected(prompts[0], 2)
    chat = slots(FakeExecutor(chunk))
    both = job(prompts, 8, eos)
    chat.prefill(whole(both))
    run(chat)
    first, second = both.chat_rows
    assert first.tokens == expected(prompts[0], 3) and first.finish_reason == "stop"
    assert second.tokens == expected(prompts[1], 8) and second.finish_reason == "length"
    assert both.finished


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_nan_in_one_row_fails_only_its_request(chunk):
    healthy_prompt, broken_prompt = [4, IMAGE_ID, 4], [6, IMAGE_ID, 1, 3]
    poison = expected(broken_prompt, 3)[2]  # fed after being chosen as the row's third token
    assert poison not in expected(healthy_prompt, 9) + healthy_prompt + broken_prompt + expected(broken_prompt, 2)
    executor = FakeExecutor(chunk, poison)
    chat = slots(executor)
    healthy, broken = job([healthy_prompt], 9), job([broken_prompt], 9)
    chat.prefill(whole(broken, healthy))  # the broken row takes slot 0: the healthy one moves into it when it leaves
    for _ in range(5):  # the poison is fed by the third step at the latest
        failures = chat.step()
        if failures:
            break
    assert [(f, type(e)) for f, e in failures] == [(broken, NonFiniteOutput)]
    assert "at token 4 of this request" in str(failures[0][1])
    chat.drop(broken)
    # The NaN key was zeroed before the slot was freed: no masked column is left to poison attention.
    assert all(torch.isfinite(buffer).all() for pair in chat.cache.buffers for buffer in pair)
    assert chat.jobs() == {healthy}
    run(chat)
    assert healthy.chat_rows[0].tokens == expected(healthy_prompt, 9) and healthy.chat_rows[0].finish_reason == "length"
    assert broken.chat_rows[0].tokens == expected(broken_prompt, 3 if chunk == 1 else 1)  # none of the failed step


def test_a_follow_up_turn_reuses_the_prefix_k_v():
    first_prompt, turn = [3, IMAGE_ID, 5, 8], [12, 13]
    answers = {}
    for budget in (0, 1 << 16):
        executor = FakeExecutor()
        chat = slots(executor, prefix_cache_bytes=budget)
        first = job([first_prompt], 5)
        chat.prefill(whole(first))
        run(chat)
        follow = job([first_prompt + first.chat_rows[0].tokens + turn], 6)
        prefills_before = len(executor.prefills)
        chat.prefill(whole(follow))
        run(chat)
        answers[budget] = follow.chat_rows[0].tokens
        if budget:
            # Only the answer's last token (never fed back) and the new turn ran; no prefill of the conversation.
            assert len(executor.prefills) == prefills_before and executor.forwards == [1 + len(turn)]
            assert chat.prefixes.hits == 1 and chat.prefixes.reused_tokens == len(first_prompt) + 4
        else:
            assert len(executor.prefills) == prefills_before + 1 and executor.forwards == []
    conversation = first_prompt + expected(first_prompt, 5) + turn
    assert answers[0] == answers[1 << 16] == expected(conversation, 6)


@pytest.mark.parametrize("chunk", [1, 3])
def test_only_rows_that_ask_for_logprobs_bring_logits_back(chunk):
    executor = FakeExecutor(chunk)
    seen = []  # per decode call: whether logits were kept, and per row whether logits / logprobs came back
    decode = executor.decode

    def spy(cache, rows, slots, k, keep_logits):
        out = decode(cache, rows, slots, k, keep_logits)
        seen.append((keep_logits, None if out.logits is None else
                     ([x is not None for x in out.logits], [x is not None for x in out.logprobs])))
        return out

    executor.decode = spy
    chat = slots(executor)
    plain = job([[3, IMAGE_ID, 11]], 6)
    chat.prefill(whole(plain))
    chat.step()
    assert seen == [(False, None)]  # no row asks: nothing kept, nothing copied
    asking = ChatJob([ChatRow([5, IMAGE_ID, 2], torch.zeros(2), torch.Generator())], StopRule(VOCAB + 1, 6), 0.0, 1.0,
                     False, None, lambda: True, top_logprobs=2)
    chat.prefill(whole(asking))
    run(chat)
    # Computed where the logits are for the asking row alone; no row's whole logits cross to the host.
    assert all(keep and raw == [False] * len(raw) and asked.count(True) == 1 for keep, (raw, asked) in seen[1:])
    assert plain.chat_rows[0].logprobs == [] and plain.chat_rows[0].tokens == expected([3, IMAGE_ID, 11], 6)
    row = asking.chat_rows[0]
    assert row.tokens == expected([5, IMAGE_ID, 2], 6) and len(row.logprobs) == 6
    # The fake's logits are one-hot (1 at the chosen token): log-softmax gives 1 - log(e + V - 1) there.
    chosen = 1 - torch.log(torch.tensor(torch.e + VOCAB - 1)).item()
    for token, lp in zip(row.tokens, row.logprobs):
        assert lp.token == token and lp.logprob == pytest.approx(chosen, abs=1e-6)
        assert [t for t, _ in lp.top][0] == token and len(lp.top) == 2


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_row_ended_early_leaves_while_the_others_go_on(chunk):
    chat = slots(FakeExecutor(chunk))
    prompts = [[2, IMAGE_ID, 3], [9, IMAGE_ID, 1, 1]]
    both = job(prompts, 8)
    chat.prefill(whole(both))
    first, second = both.chat_rows
    both.end_row(first)
    assert first.finish_reason == "stop" and not both.finished
    run(chat)
    assert first.tokens == expected(prompts[0], 1)  # its prefill token only: nothing recorded after
    assert second.tokens == expected(prompts[1], 8) and second.finish_reason == "length"
    assert both.finished and chat.active_rows == 0


def test_ending_a_row_of_a_failed_request_keeps_it_failed():
    failed = job([[2, IMAGE_ID, 3], [9, IMAGE_ID, 1]], 8)
    failed.fail(NonFiniteOutput("broken"))
    failed.end_row(failed.chat_rows[0])
    assert failed.finished and isinstance(failed.error, NonFiniteOutput)
    assert failed.chat_rows[0].finish_reason is None


def test_a_small_question_behind_large_ones_starts_at_the_next_free_slots():
    """K/V slots are shared as image rows are: a question's rows may start at different iterations,
    so a small question waits for free slots, not for a whole large question ahead of it to start."""
    from jfexport.runtime.batching.generation_batch import GenerationRows
    from jfexport.runtime.batching.scheduler import Observers, Scheduler

    observers = Observers()
    chat = slots(FakeExecutor(), max_rows=4)
    scheduler = Scheduler(GenerationRows(None, {}, 0, 0, observers), chat, observers, start=False)  # type: ignore[arg-type]
    running = job([[3, IMAGE_ID, 11]] * 4, 6)
    scheduler.submit(running)
    scheduler.run_iteration()
    large = job([[8, IMAGE_ID, 6, 6]] * 4, 12)
    small = job([[2, IMAGE_ID, 9]], 2)
    scheduler.submit(large)
    scheduler.submit(small)
    scheduler.run_iteration()
    assert chat.active_rows == 4 and large.pending == 4 and small.pending == 1  # every slot is running's
    ended_at = {}
    for iteration in range(1, 100):
        busy = scheduler.run_iteration()
        for name, j in (("large", large), ("small", small)):
            if j.finished:
                ended_at.setdefault(name, iteration)
        if not busy:
            break
    # Admitted whole, `large` would take the 4 slots `running` frees and `small` would wait for its end;
    # shared, `small` takes one of them, beside three of large's rows.
    assert ended_at["small"] < ended_at["large"], ended_at
    for j, prompt, count in ((running, [3, IMAGE_ID, 11], 6), (large, [8, IMAGE_ID, 6, 6], 12), (small, [2, IMAGE_ID, 9], 2)):
        assert j.finished and j.error is None
        assert all(row.tokens == expected(prompt, count) for row in j.chat_rows)
