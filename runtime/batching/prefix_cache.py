"""K/V of earlier requests' token sequences, for a follow-up turn to start from (`PrefixCache`).

Entries are found through an index of their token blocks, as vLLM's automatic prefix caching
hashes blocks: each entry is listed under the chained hash of every whole block of its ids
(`BLOCK` tokens), and under the hash of its last partial block. A lookup walks the request's
blocks while some entry shares them, so its cost grows with the request's length and not with
the number of entries (a scan of every entry, on the scheduler's thread, held up every step by
milliseconds once thousands of conversations were stored). Hashes only select candidates: their
tokens are compared before any is used, so a collision costs a comparison, never a wrong prefix.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from itertools import islice

import torch

BLOCK = 16  # tokens per indexed block
# Entries compared at the deepest shared block: past it each extends the match by under BLOCK tokens,
# so bounding them bounds a lookup's work (many conversations about one image share their first
# blocks) at the cost of at most BLOCK - 1 tokens of reuse. An entry the request extends is found
# apart from them, so a conversation always reuses all of its previous turn.
CANDIDATES = 64

_Key = tuple[str, tuple[int, ...]]


@dataclass
class _Prefix:
    ids: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [Hkv, len(ids), Dh]
    nbytes: int


def _chain(image: str, ids: tuple[int, ...] | list[int], blocks: int) -> list[int]:
    """Hashes of the image and its first 0, 1, ..., `blocks` whole blocks of `ids`."""
    hashes = [hash(image)]
    for b in range(blocks):
        hashes.append(hash((hashes[-1], tuple(ids[b * BLOCK:(b + 1) * BLOCK]))))
    return hashes


class PrefixCache:
    """K/V of earlier requests' token sequences, keyed by the image's content hash and the token ids.

    K/V at a position depends on the tokens up to it and on the image embeddings spliced among
    them, nothing else; a request reuses the longest common prefix of its ids with a stored
    sequence of the same image, as vLLM's automatic prefix caching and SGLang's radix cache do.
    Bounded by `budget_bytes`, least recently used first out. Entries are copies: a slot's columns
    change once its row leaves.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[_Key, _Prefix] = OrderedDict()
        # chained hash of an image and k whole blocks -> entries of at least k blocks that start so
        self._through: dict[int, dict[_Key, None]] = {}
        # (chained hash of the whole blocks, the tokens after them) -> the entry of exactly those ids
        self._ends: dict[tuple[int, tuple[int, ...]], _Key] = {}
        # chained hash -> how many `_ends` keys under it have each tail length: the lengths worth looking up
        self._tails: dict[int, Counter[int]] = {}
        self.nbytes = 0
        self.hits = 0  # requests that started from a stored prefix
        self.reused_tokens = 0  # prompt tokens those requests did not run

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, image: str, ids: list[int], at_least: int) -> tuple[_Prefix, int] | None:
        """The entry of `image` sharing the longest prefix with `ids`, and its length, if >= `at_least`;
        at most len(ids) - 1 tokens are reused (the last one is run to give the next token's logits)."""
        usable = tuple(ids[:-1])
        hashes = _chain(image, usable, len(usable) // BLOCK)
        depth = 0  # whole blocks some entry shares with the request
        while depth + 1 < len(hashes) and hashes[depth + 1] in self._through:
            depth += 1
        if hashes[depth] not in self._through:
            return None  # no entry of this image
        best, best_len = self._extended(image, hashes, usable, depth)
        start = depth * BLOCK
        # The newest first: a retried or regenerated request finds the sequence it extends or repeats.
        for key in islice(reversed(self._through[hashes[depth]]), CANDIDATES):
            stored = key[1]
            if key[0] != image or stored[:start] != usable[:start]:
                continue  # a hash collision
            n = start
            limit = min(len(stored), len(usable))
            while n < limit and stored[n] == usable[n]:
                n += 1
            if n > best_len:
                best, best_len = key, n
        if best is None or best_len < at_least:
            return None
        self._entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += best_len
        return self._entries[best], best_len

    def _extended(self, image: str, hashes: list[int], usable: tuple[int, ...],
                  depth: int) -> tuple[_Key | None, int]:
        """The longest stored sequence that `usable` starts with and that ends within block `depth`."""
        start = depth * BLOCK
        for tail in sorted(self._tails.get(hashes[depth], ()), reverse=True):
            end = start + tail
            key = self._ends.get((hashes[depth], usable[start:end])) if end <= len(usable) else None
            if key is not None and key[0] == image and key[1] == usable[:end]:
                return key, end
        return None, 0

    def store(self, image: str, ids: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.budget_bytes:
            return
        key = (image, tuple(ids))
        if key in self._entries:
            self._remove(key)
        # A stored sequence that is a prefix of this one adds nothing this one does not hold.
        hashes = _chain(image, key[1], len(ids) // BLOCK)
        for depth, chained in enumerate(hashes):
            start = depth * BLOCK
            for tail in list(self._tails.get(chained, ())):
                end = start + tail
                other = self._ends.get((chained, key[1][start:end])) if end <= len(ids) else None
                if other is not None and other[0] == image and other[1] == key[1][:end]:
                    self._remove(other)
        while self._entries and self.nbytes + nbytes > self.budget_bytes:
            self._remove(next(iter(self._entries)))
        self._entries[key] = _Prefix(key[1], kv, nbytes)
        self.nbytes += nbytes
        for chained in hashes:
            self._through.setdefault(chained, {})[key] = None
        last = (hashes[-1], key[1][(len(hashes) - 1) * BLOCK:])
        if last not in self._ends:
            self._tails.setdefault(last[0], Counter())[len(last[1])] += 1
        self._ends[last] = key

    def _remove(self, key: _Key) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
        hashes = _chain(key[0], key[1], len(key[1]) // BLOCK)
        for chained in hashes:
            bucket = self._through[chained]
            del bucket[key]
            if not bucket:
                del self._through[chained]
        end = (hashes[-1], key[1][(len(hashes) - 1) * BLOCK:])
        if self._ends.get(end) == key:
            del self._ends[end]
            tails = self._tails[end[0]]
            tails[len(end[1])] -= 1
            if not tails[len(end[1])]:
                del tails[len(end[1])]
                if not tails:
                    del self._tails[end[0]]

