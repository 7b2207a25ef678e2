"""Duplicate finding: exact keys on normalized text, near duplicates with MinHash LSH (datasketch)."""

from __future__ import annotations

import hashlib

import numpy as np

SHINGLE_WORDS = 3


def exact_key(text: str) -> bytes:
    """16-byte key of normalized text: equal keys mean equal text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class SignatureMaker:
    """MinHash signatures of word 3-gram shingles; one per process, reused for every row."""

    def __init__(self, num_perm: int, seed: int = 1):
        import xxhash
        from datasketch import MinHash

        self._minhash = MinHash
        self._hashfunc = xxhash.xxh32_intdigest  # fast; datasketch's default sha1 costs 3x more
        self.prototype = MinHash(num_perm=num_perm, seed=seed, hashfunc=self._hashfunc)

    def minhash(self, text: str):
        proto = self.prototype
        minhash = self._minhash(num_perm=proto.num_perm, seed=proto.seed, hashfunc=self._hashfunc,
                                permutations=proto.permutations, scheme=proto.scheme)
        words = text.split()
        shingles = {" ".join(words[i:i + SHINGLE_WORDS]) for i in range(max(1, len(words) - SHINGLE_WORDS + 1))}
        minhash.update_batch([s.encode("utf-8") for s in shingles])
        return minhash

    def signature(self, text: str) -> np.ndarray:
        """The MinHash values as uint32 (datasketch keeps them below 2**32, so nothing is lost)."""
        return self.minhash(text).hashvalues.astype(np.uint32)

    def from_signature(self, signature: np.ndarray):
        proto = self.prototype  # reusing its permutations skips datasketch's per-object RNG set-up
        return self._minhash(seed=proto.seed, hashfunc=self._hashfunc, hashvalues=signature,
                             permutations=proto.permutations, scheme=proto.scheme)


class NearDuplicateIndex:
    """Rows linked to each other when their estimated Jaccard similarity reaches the threshold.

    MinHash LSH: datasketch picks the bands (b rows of r values) for the threshold; rows that agree on a whole band
    become candidates, and their stored signatures confirm them, so a band collision alone never links two rows.
    Bands are grouped by sorting a hash per band rather than in datasketch's MinHashLSH dict-of-sets index, which
    costs about 3 KB a row (3 GB at a million rows); here a row costs its signature plus b integers.
    """

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        # Bands tuned for a lower threshold, weighting misses more: a missed duplicate costs more than a
        # candidate the signature check rejects.
        params = MinHashLSH(threshold=max(threshold - 0.1, 0.05), num_perm=num_perm, weights=(0.3, 0.7))
        self.bands, self.band_width = params.b, params.r
        self.threshold = threshold
        self.maker = SignatureMaker(num_perm)
        self._chunks: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []
        self.rows = 0

    def add(self, signature: np.ndarray) -> int:
        """Index one signature; returns its row id (0, 1, 2, ...)."""
        self._pending.append(signature)
        if len(self._pending) >= 4096:
            self._chunks.append(np.stack(self._pending))
            self._pending = []
        self.rows += 1
        return self.rows - 1

    def signatures(self) -> np.ndarray:
        if self._pending:
            self._chunks.append(np.stack(self._pending))
            self._pending = []
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.empty((0, self.maker.prototype.num_perm), dtype=np.uint32)

    def links(self) -> np.ndarray:
        """(row, other) pairs of confirmed near duplicates, each row linked to the first row of its band bucket."""
        signatures = self.signatures()
        pairs = []
        multipliers = np.random.default_rng(0).integers(1, 2**63, self.band_width, dtype=np.uint64) | np.uint64(1)
        for band in range(self.bands):
            columns = signatures[:, band * self.band_width:(band + 1) * self.band_width].astype(np.uint64)
            keys = (columns * multipliers).sum(axis=1)  # wraps mod 2**64: a hash of the band's values
            order = np.argsort(keys, kind="stable")
            starts = np.ones(len(order), dtype=bool)
            starts[1:] = keys[order[1:]] != keys[order[:-1]]
            first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
            members = ~starts
            pairs.append(np.stack([order[members], first[members]], axis=1))
        pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), dtype=np.int64)
        return pairs[self.similarities(signatures, pairs) >= self.threshold]

    @staticmethod
    def similarities(signatures: np.ndarray, pairs: np.ndarray, chunk: int = 100_000) -> np.ndarray:
        return np.concatenate([np.mean(signatures[pairs[i:i + chunk, 0]] == signatures[pairs[i:i + chunk, 1]], axis=1)
                               for i in range(0, len(pairs), chunk)] or [np.empty(0)])


def connected_rows(rows: int, *link_sets: np.ndarray) -> np.ndarray:
    """Cluster id of each row 0..rows-1: rows linked directly or through others share an id."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.concatenate([np.asarray(links, dtype=np.int64).reshape(-1, 2) for links in link_sets])
    if not len(pairs):
        return np.arange(rows)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(rows, rows))
    return connected_components(graph, directed=False)[1]
