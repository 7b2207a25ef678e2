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
    """Rows added one by one; each is linked to earlier rows whose estimated Jaccard similarity reaches the threshold.

    LSH proposes candidates; the stored signatures confirm them, so a band collision alone never links two rows.
    """

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.maker = SignatureMaker(num_perm)
        # Weighting false negatives more: a missed duplicate costs more than a candidate the signatures reject.
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.3, 0.7))
        self.signatures = np.empty((1024, num_perm), dtype=np.uint32)
        self.links: list[tuple[int, int]] = []

    def add(self, row: int, signature: np.ndarray, insert: bool = True) -> list[int]:
        """Earlier rows near `row`; `row` is then indexed unless `insert` is False (query only)."""
        minhash = self.maker.from_signature(signature)
        near = [other for other in self.lsh.query(minhash) if self.similarity(signature, other) >= self.threshold]
        self.links.extend((row, other) for other in near)
        if insert:
            if row >= len(self.signatures):
                self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
            self.signatures[row] = signature
            self.lsh.insert(row, minhash, check_duplication=False)
        return near

    def similarity(self, signature: np.ndarray, row: int) -> float:
        return float(np.mean(self.signatures[row] == signature))

    def clusters(self, rows: int) -> np.ndarray:
        """Cluster id of each row 0..rows-1: rows linked directly or through others share an id."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        if not self.links:
            return np.arange(rows)
        pairs = np.array(self.links, dtype=np.int64)
        graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(rows, rows))
        return connected_components(graph, directed=False)[1]
