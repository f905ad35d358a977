"""The prefix cache's index: the same answers as comparing with every entry, at a cost that does not
grow with the number of entries."""

from __future__ import annotations

import random

import torch
from jfexport.runtime.batching.prefix_cache import BLOCK, CANDIDATES, PrefixCache


def _kv(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(1, tokens, 1), torch.zeros(1, tokens, 1))]


def _common(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_lookups_find_the_longest_common_prefix_of_the_stored_sequences():
    """Against a scan of every live entry, on conversations that branch, extend, repeat and span
    images, each shorter than CANDIDATES per image so that the scan and the index must agree."""
    rng = random.Random(0)
    cache = PrefixCache(budget_bytes=1 << 30)
    stored: dict[tuple[str, tuple[int, ...]], None] = {}
    for step in range(600):
        image = f"img-{rng.randrange(12)}"
        live = [ids for img, ids in stored if img == image]
        base = list(rng.choice(live)) if live and rng.random() < 0.8 else []
        cut = rng.randrange(len(base) + 1) if base and rng.random() < 0.5 else len(base)
        ids = base[:cut] + [rng.randrange(6) for _ in range(rng.randrange(1, 3 * BLOCK))]
        usable = ids[:-1]
        expected = max((_common(s, usable) for img, s in stored if img == image), default=0)
        found = cache.longest(image, ids, at_least=0)
        assert (found[1] if found else 0) == expected, step
        if found:
            assert found[0].ids[:found[1]] == tuple(ids[:found[1]])
        cache.store(image, ids, _kv(len(ids)))
        # What the cache keeps: a sequence another extends is dropped.
        stored = {k: None for k in stored if not (k[0] == image and tuple(ids[:len(k[1])]) == k[1])}
        stored[(image, tuple(ids))] = None
        assert set(cache._entries) == set(stored)
        # The index lists exactly the live entries' last blocks.
        assert set(cache._ends.values()) == set(stored)
        assert sum(sum(lengths.values()) for lengths in cache._tails.values()) == len(cache._ends)
        assert sum(img == image for img, _ in stored) <= CANDIDATES  # where the index is exact


def test_a_repeated_or_extending_request_reuses_all_but_its_last_token():
    cache = PrefixCache(budget_bytes=1 << 30)
    turn = list(range(3 * BLOCK + 5))
    cache.store("img", turn, _kv(len(turn)))
    assert cache.longest("img", turn, at_least=0)[1] == len(turn) - 1
    assert cache.longest("img", turn + [7, 8, 9], at_least=0)[1] == len(turn)
    assert cache.longest("other", turn, at_least=0) is None


class _CountedImage(str):
    """An image key that counts the comparisons made with it."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedImage.compared += 1
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        _CountedImage.compared += 1
        return str.__ne__(self, other)

    __hash__ = str.__hash__


def test_a_lookup_compares_a_bounded_number_of_entries_however_many_are_stored():
    """The scan this replaced compared every entry's image and tokens, on the scheduler's thread, on
    every chat request: 4,000 stored conversations added 15 ms to each."""
    cache = PrefixCache(budget_bytes=1 << 30)
    shared = list(range(BLOCK * 2))  # one image asked about thousands of times: all share 2 blocks
    for i in range(3000):
        cache.store(_CountedImage(f"img-{i % 50}"), shared + [i % 7, i, i + 1], _kv(BLOCK * 2 + 3))
    _CountedImage.compared = 0
    found = cache.longest("img-3", shared + [3, 999, 5, 6], at_least=0)
    assert found is not None and found[1] == BLOCK * 2 + 1
    assert _CountedImage.compared <= CANDIDATES + 1
    _CountedImage.compared = 0
    cache.store("img-3", shared + [3, 999, 5, 6], _kv(BLOCK * 2 + 4))
    assert _CountedImage.compared <= BLOCK + 1
