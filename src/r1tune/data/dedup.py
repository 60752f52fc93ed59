"""Exact and near-duplicate detection for the data quality report.

Texts are normalised (NFKC, lowercase, whitespace runs collapsed to one space) and
then compared two ways:

* exact duplicates: identical normalised text, found by sorting 128-bit BLAKE2b
  digests (no normalised text is kept in memory);
* near duplicates: MinHash over character n-gram shingles (`shingle` characters, so
  English and Chinese, which has no spaces, are treated alike), LSH banding to find
  candidate pairs, then each candidate is kept when its MinHash estimate of Jaccard
  similarity is >= threshold. A text shorter than `shingle` is one shingle (itself);
  an empty text takes no part in near-duplicate search.

Everything is vectorised with numpy and processed in chunks, so a million short
texts need about num_perm * 4 bytes each for signatures plus small per-chunk buffers.
Results are deterministic: shingle hashing uses fixed constants, and the MinHash
permutations come from numpy's seeded generator.

Hashing. Each shingle is hashed once to 32 bits by a stable multiplicative hash of its
code points (no Python `hash`, so PYTHONHASHSEED does not matter). The num_perm
"permutations" are multiply-shift hashes h_i(x) = ((a_i * x + b_i) mod 2**64) >> 32
with random odd a_i: the universal family of Dietzfelbinger et al., used instead of
(a*x + b) mod prime because numpy's 64-bit modulo is about three times slower.

Bucket cap. In a band bucket, each record is paired only with the BUCKET_WINDOW
records before it (in record order) in the same bucket, so a bucket of m records
gives at most BUCKET_WINDOW * m candidate pairs rather than m*(m-1)/2. Buckets of up
to BUCKET_WINDOW + 1 records are compared in full; in a larger (pathological) bucket,
such as thousands of near-identical boilerplate texts, every record after the first is
still paired with its nearest predecessors, so it is still counted as a near duplicate,
but not every pair in the bucket is listed.

Near pairs are reported between the first records of exact-duplicate groups only: a
record that exactly repeats an earlier one is already counted as an exact duplicate.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed trapz

BUCKET_WINDOW = 32          # see "Bucket cap" above
_CHUNK_TEXTS = 4096         # texts normalised and hashed per chunk
_BLOCK_SHINGLES = 1 << 16   # shingles per MinHash block: a (num_perm, block) uint64 buffer
_VERIFY_PAIRS = 1 << 15     # candidate pairs verified per step

_U64 = np.uint64
# Fixed constants for shingle hashing: independent of `seed`, so shingle hashes are stable.
_SHINGLE_MULT = np.random.default_rng(0x5EED5EED).bit_generator.random_raw(65).astype(np.uint64) | _U64(1)
_MIX1, _MIX2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)


@dataclass
class DuplicateReport:
    exact_groups: list[list[int]] = field(default_factory=list)
    near_pairs: list[tuple[int, int, float]] = field(default_factory=list)

    @property
    def exact_duplicates(self) -> int:
        """Records that repeat an earlier record exactly (after normalisation)."""
        return sum(len(g) - 1 for g in self.exact_groups)

    @property
    def near_duplicates(self) -> int:
        """Distinct records that are the later member of at least one near pair."""
        return len({j for _, j, _ in self.near_pairs})

    def repeats(self) -> set[int]:
        """Records that repeat an earlier one exactly or nearly (dropping them leaves no duplicate)."""
        return {j for group in self.exact_groups for j in group[1:]} | {j for _, j, _ in self.near_pairs}


def normalise(text: str) -> str:
    """NFKC, lowercase, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted false positive and
    false negative probability mass around `threshold`, as datasketch does, but weighted
    0.1 / 0.9: every candidate is verified, so a false positive costs only a comparison
    while a false negative is a missed duplicate. At threshold 0.8 and 64 permutations this
    gives 9 bands of 7 rows: a pair at similarity 0.8 becomes a candidate with probability
    0.88, at 0.85 with 0.97, at 0.5 with 0.07."""
    s = np.linspace(0.0, 1.0, 2001)
    below, above = s <= threshold, s >= threshold
    best, best_cost = (1, num_perm), float("inf")
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        p = 1.0 - (1.0 - s ** rows) ** bands            # chance a pair of similarity s is a candidate
        cost = 0.1 * _trapezoid(p[below], s[below]) + 0.9 * _trapezoid(1.0 - p[above], s[above])
        if cost < best_cost - 1e-12:
            best, best_cost = (bands, rows), cost
    return best


def find_duplicates(texts: list[str], threshold: float = 0.8, num_perm: int = 64,
                    shingle: int = 5, seed: int = 0) -> DuplicateReport:
    _check_params(threshold, num_perm, shingle)
    if not texts:
        return DuplicateReport()
    digests, sigs, has_sig = _signatures(texts, shingle, _permutations(seed, num_perm))
    exact_groups, is_first = _exact_groups(digests)
    reps = np.flatnonzero(is_first & has_sig)
    near_pairs = _near_pairs(sigs, reps, threshold, num_perm)
    return DuplicateReport(exact_groups=exact_groups, near_pairs=near_pairs)


class Repeat(NamedTuple):
    corpus_index: int
    similarity: float  # MinHash estimate of the Jaccard similarity (1.0 for exact repeats)
    exact: bool  # identical after normalisation


def find_repeats(queries: list[str], corpus_chunks, threshold: float = 0.8, num_perm: int = 64,
                 shingle: int = 5, seed: int = 0) -> dict[int, Repeat]:
    """{query index: Repeat} for each query that a corpus text repeats exactly (after normalisation)
    or nearly (MinHash estimate >= threshold); an exact repeat wins over a near one, else the first
    match found. `corpus_chunks` yields lists of texts, so the corpus can be streamed; only the
    queries' signatures are held. Made for a validation set (queries) against training data."""
    _check_params(threshold, num_perm, shingle)
    found: dict[int, Repeat] = {}
    if not queries:
        return found
    perms = _permutations(seed, num_perm)
    q_digests, q_sigs, q_has = _signatures(queries, shingle, perms)
    by_digest: dict[bytes, list[int]] = {}
    for i, digest in enumerate(q_digests):
        by_digest.setdefault(digest.tobytes(), []).append(i)
    bands, rows = lsh_params(threshold, num_perm)
    q_keys = _band_keys(q_sigs, bands, rows)
    offset = 0
    for chunk in corpus_chunks:
        if not chunk:
            continue
        digests, sigs, has_sig = _signatures(chunk, shingle, perms)
        for j, digest in enumerate(digests):
            for i in by_digest.get(digest.tobytes(), ()):
                if not (i in found and found[i].exact):
                    found[i] = Repeat(offset + j, 1.0, True)
        keys = _band_keys(sigs, bands, rows)
        for band in range(bands):
            open_q = np.flatnonzero(q_has & ~np.isin(np.arange(len(queries)), list(found)))
            if not len(open_q):
                break  # exact repeats are still looked for in later chunks
            order = open_q[np.argsort(q_keys[open_q, band], kind="stable")]
            sorted_keys = q_keys[order, band]
            lo = np.searchsorted(sorted_keys, keys[:, band], side="left")
            hi = np.searchsorted(sorted_keys, keys[:, band], side="right")
            counts = np.where(has_sig, hi - lo, 0)
            j = np.repeat(np.arange(len(chunk)), counts)  # candidate pairs (query i, corpus j)
            i = order[np.repeat(lo, counts) + np.arange(len(j)) - np.repeat(np.cumsum(counts) - counts, counts)]
            similarity = (q_sigs[i] == sigs[j]).mean(axis=1)
            for qi, cj, sim in zip(i.tolist(), j.tolist(), similarity.tolist()):
                if sim >= threshold - 1e-9:
                    found.setdefault(qi, Repeat(offset + cj, sim, False))
        offset += len(chunk)
    return found


def _check_params(threshold: float, num_perm: int, shingle: int) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if num_perm < 1 or shingle < 1 or shingle > len(_SHINGLE_MULT) - 1:
        raise ValueError(f"num_perm must be >= 1 and shingle from 1 to {len(_SHINGLE_MULT) - 1}")


def _permutations(seed: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.random.default_rng(seed).bit_generator.random_raw(2 * num_perm).astype(np.uint64)
    return raw[:num_perm] | _U64(1), raw[num_perm:]


def _signatures(texts: list[str], shingle: int, perms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(128-bit digests of the normalised texts, MinHash signatures, which texts have one), chunk by chunk."""
    n = len(texts)
    digests = np.empty((n, 2), dtype=np.uint64)
    sigs = np.zeros((n, len(perms[0])), dtype=np.uint32)
    has_sig = np.zeros(n, dtype=bool)
    for start in range(0, n, _CHUNK_TEXTS):
        chunk = [normalise(t) for t in texts[start:start + _CHUNK_TEXTS]]
        stop = start + len(chunk)
        digests[start:stop] = np.frombuffer(
            b"".join(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                     for t in chunk), dtype="<u8").reshape(-1, 2)
        _minhash_chunk(chunk, shingle, *perms, sigs[start:stop], has_sig[start:stop])
    return digests, sigs, has_sig


def _band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(texts, bands) LSH bucket keys: each band's rows of the signature hashed to 64 bits."""
    keys = np.empty((len(sigs), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            part = sigs[:, band * rows:(band + 1) * rows].astype(np.uint64)
            column = (part * _SHINGLE_MULT[:rows]).sum(axis=1)
            keys[:, band] = column ^ (column >> _U64(29))
    return keys


def _shingle_hashes(chunk: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(32-bit hash of every shingle, as uint64; shingle count per text), texts in order."""
    lens = np.fromiter(map(len, chunk), dtype=np.int64, count=len(chunk))
    offs = np.cumsum(lens) - lens
    cp = np.frombuffer("".join(chunk).encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.uint64)
    counts = np.where(lens >= k, lens - k + 1, np.minimum(lens, 1))
    total = int(counts.sum())
    mult, len_term = _SHINGLE_MULT[:k], _SHINGLE_MULT[-1]
    doc = np.repeat(np.arange(len(chunk)), counts)
    rank = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    x = np.empty(total, dtype=np.uint64)
    with np.errstate(over="ignore"):
        long_doc = lens[doc] >= k
        if len(cp) >= k:  # every full window of the concatenation; only in-text ones are used
            width = len(cp) - k + 1
            windows = cp[:width] * mult[0]
            for j in range(1, k):
                windows += cp[j:j + width] * mult[j]
            x[long_doc] = windows[offs[doc[long_doc]] + rank[long_doc]] + _U64(k) * len_term
        short = np.flatnonzero((lens > 0) & (lens < k))
        if len(short):  # a text shorter than k is a single shingle: itself
            idx = np.minimum(offs[short, None] + np.arange(k), max(len(cp) - 1, 0))
            used = np.arange(k) < lens[short, None]
            short_h = (np.where(used, cp[idx], 0) * mult).sum(axis=1) + lens[short].astype(np.uint64) * len_term
            x[~long_doc] = np.repeat(short_h, counts[short])
        x ^= x >> _U64(31)
        x *= _MIX1
        x ^= x >> _U64(29)
        x *= _MIX2
        x >>= _U64(32)
    return x, counts


def _minhash_chunk(chunk, k, perm_a, perm_b, sig_out, has_out) -> None:
    x, counts = _shingle_hashes(chunk, k)
    docs = np.flatnonzero(counts)
    has_out[docs] = True
    if not len(docs):
        return
    ends = np.cumsum(counts[docs])
    starts = ends - counts[docs]
    col_a, col_b = perm_a[:, None], perm_b[:, None]
    # (num_perm, shingles) layout: the min-reduction then runs along contiguous memory,
    # about ten times faster than reducing over rows of a (shingles, num_perm) array.
    buf = np.empty((len(perm_a), min(_BLOCK_SHINGLES, int(ends[-1]))), dtype=np.uint64)
    first = 0
    with np.errstate(over="ignore"):
        while first < len(docs):
            # take docs until the block holds _BLOCK_SHINGLES shingles (at least one doc)
            last = max(int(np.searchsorted(ends, starts[first] + _BLOCK_SHINGLES, side="right")), first + 1)
            lo, hi = int(starts[first]), int(ends[last - 1])
            block = buf[:, :hi - lo] if hi - lo <= buf.shape[1] else np.empty((len(perm_a), hi - lo), np.uint64)
            np.multiply(col_a, x[None, lo:hi], out=block)
            block += col_b
            block >>= _U64(32)
            sig_out[docs[first:last]] = np.minimum.reduceat(block, starts[first:last] - lo, axis=1).T
            first = last


def _exact_groups(digests: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """Groups (size >= 2, ascending, ordered by first index) and a mask of first occurrences."""
    n = len(digests)
    order = np.lexsort((digests[:, 1], digests[:, 0]))  # stable: equal digests keep index order
    d = digests[order]
    new = np.ones(n, dtype=bool)
    new[1:] = np.any(d[1:] != d[:-1], axis=1)
    is_first = np.zeros(n, dtype=bool)
    is_first[order[new]] = True
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, n))
    groups = [order[s:s + z].tolist() for s, z in zip(starts[sizes > 1], sizes[sizes > 1])]
    groups.sort(key=lambda g: g[0])
    return groups, is_first


def _near_pairs(sigs, reps, threshold, num_perm) -> list[tuple[int, int, float]]:
    m = len(reps)
    if m < 2:
        return []
    bands, rows = lsh_params(threshold, num_perm)
    all_keys = _band_keys(sigs[reps], bands, rows)
    codes = []
    for band in range(bands):
        keys = all_keys[:, band]
        order = np.argsort(keys, kind="stable")          # within a bucket: record order
        sk = keys[order]
        for d in range(1, BUCKET_WINDOW + 1):
            same = sk[d:] == sk[:-d]
            if not same.any():
                break                                   # no bucket has more than d members
            codes.append(order[:-d][same].astype(np.int64) * m + order[d:][same])
    if not codes:
        return []
    codes = np.unique(np.concatenate(codes))
    pairs = []
    for lo in range(0, len(codes), _VERIFY_PAIRS):
        c = codes[lo:lo + _VERIFY_PAIRS]
        i, j = reps[c // m], reps[c % m]
        hits = (sigs[i] == sigs[j]).sum(axis=1)
        keep = hits >= threshold * num_perm - 1e-9
        pairs += zip(i[keep].tolist(), j[keep].tolist(), (hits[keep] / num_perm).tolist())
    return pairs
