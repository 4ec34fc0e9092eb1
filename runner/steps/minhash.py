"""MinHash over word shingles, as datasketch computes it, for many texts at once: what near_dedup runs on one
machine (`filters_python`) and on a cluster (`sharded_minhash`)."""

from __future__ import annotations

from typing import Any

from runner.registry import StepError


def word_shingles(text: str | None, n: int) -> set[str]:
    words = (text or "").lower().split()
    if len(words) <= n:
        return {" ".join(words)}
    return set(map(" ".join, zip(*(words[k:] for k in range(n)), strict=False)))


def shingle_hashes(sets: list[set[str]]) -> tuple[Any, Any]:
    """Every shingle of every set (in order, set by set), hashed once with SHA-1: the digest's first 4 bytes
    (little-endian) are datasketch's `sha1_hash32` of the shingle, its next 8 the shingle's 64-bit key for the
    exact Jaccard (the same in every process and on every machine)."""
    import hashlib

    import numpy as np

    if not sets:
        return np.empty(0, np.uint32), np.empty(0, np.int64)
    sha1 = hashlib.sha1
    encoded = "\n".join(["\n".join(x) for x in sets]).encode().split(b"\n")  # shingles hold no newline
    digests = np.frombuffer(b"".join([sha1(s).digest() for s in encoded]), np.uint8).reshape(-1, 20)
    return digests[:, :4].copy().view("<u4").ravel(), digests[:, 4:12].copy().view("<i8").ravel()


def shingle_keys(shingles: set[str]) -> frozenset[int]:
    """The shingles' 64-bit keys (see `shingle_hashes`): cheaper to compare than the strings and to send
    between processes. A Jaccard of these is the shingles' own unless two distinct shingles of the pair share
    a key: odds of about |a| * |b| in 2^64, 1e-16 for texts of 100 shingles."""
    return frozenset(shingle_hashes([shingles])[1].tolist())


def _jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    common = len(a & b)
    return common / (len(a) + len(b) - common)


class _Recent(dict[int, Any]):
    """The last `size` values set (or made by `make` for a key asked for and missing), by key."""

    def __init__(self, make: Any, size: int = 65_536) -> None:
        super().__init__()
        self.make, self.size = make, size

    def __missing__(self, key: int) -> Any:
        self[key] = value = self.make(key)
        return value

    def __setitem__(self, key: int, value: Any) -> None:
        super().pop(key, None)  # to the end: the most recent
        super().__setitem__(key, value)
        if len(self) > self.size:
            del self[next(iter(self))]


def _fmix32(h: Any) -> Any:
    """MurmurHash3's 32-bit finalizer, element-wise (uint32 arithmetic wraps), as datasketch pre-mixes hashes."""
    import numpy as np

    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _signatures(texts: list[str | None], n: int, num_perm: int, seed: int) -> Any:
    """Each text's word n-grams as datasketch's MinHash values (one row of `num_perm` per text) and as
    `shingle_keys` (flat: text r's from bounds[r] to bounds[r + 1]).

    The values are what `MinHash(num_perm, seed).update_batch(shingles)` gives with datasketch's (default)
    affine32 scheme: the min over a text's shingles of `a * fmix32(sha1_hash32(shingle)) + b` (mod 2^32) for
    each of its permutations (a, b). Computed here for many texts at once: one SHA-1 per shingle, then
    whole blocks of texts per numpy call, permutations along rows so each text's min is a contiguous run."""
    import numpy as np
    from datasketch import MinHash

    minhash = MinHash(num_perm=num_perm, seed=seed)  # for its scheme and permutations
    if minhash.scheme != "affine32":
        raise StepError(f"near_dedup computes datasketch's affine32 MinHash; this datasketch uses {minhash.scheme}")
    a, b = minhash.permutations
    sets = [word_shingles(t, n) for t in texts]
    bounds = np.concatenate([[0], np.cumsum(np.fromiter(map(len, sets), np.int64, len(sets)))])
    hashed, keys = shingle_hashes(sets)
    mixed = _fmix32(hashed)
    values = np.empty((num_perm, len(sets)), np.uint32)
    for lo in range(0, len(sets), 64):  # 64 texts at a time: the (num_perm x shingles) block stays in cache
        hi = min(lo + 64, len(sets))
        block = np.multiply.outer(a, mixed[bounds[lo] : bounds[hi]])
        block += b[:, None]
        values[:, lo:hi] = np.minimum.reduceat(block, bounds[lo:hi] - bounds[lo], axis=1)
    return np.ascontiguousarray(values.T), keys, bounds


def signature_blocks(texts: list[str | None], n: int, num_perm: int, seed: int, block: int = 20_000) -> Any:
    """`_signatures` in blocks, in text order: computed by worker processes (one per core) ahead of the
    caller when there are many texts, so the sequential LSH pass overlaps them. The same values as in-process."""
    import multiprocessing
    import os

    starts = range(0, len(texts), block)
    workers = min(os.cpu_count() or 1, 4)
    # forked workers (they run only datasketch and numpy); where fork is not offered, in-process
    if len(starts) < 3 or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        for s in starts:
            yield _signatures(texts[s : s + block], n, num_perm, seed)
        return
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        pending: deque[Any] = deque()
        for s in starts:  # at most 2 blocks per worker in flight: memory stays bounded
            pending.append(pool.submit(_signatures, texts[s : s + block], n, num_perm, seed))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
