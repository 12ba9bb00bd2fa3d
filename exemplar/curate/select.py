"""`exemplar curate select`: N rows with diverse prompts, optionally the best-scored first.

Rows are compared by the sentence embedding (all-MiniLM-L6-v2 unless `model` names another
local folder) of their prompt (`on`; a record without a prompt, a text document, is embedded
whole), normalised, so that the cosine distance of two rows is 1 - the dot product.

- by diversity, k-center (default): greedy k-center. The first row is a seeded random one;
  each next one is the row farthest (cosine distance) from every row chosen so far, so the
  chosen rows spread over the whole space and an outlier region gets its row.
- by diversity, clusters: k-means (`clusters` k, default min(n, sqrt(rows), 100)) and the same
  share of the N from every cluster (a cluster smaller than its share gives all its rows and
  the rest goes to the others), drawn at random (seeded) within a cluster.
- by score: the N highest `meta.scores.SCORE` (ties: input order).
- by score+diversity, k-center: the Deita recipe (Liu et al. 2024): rows in score order, best
  first; a row is kept only when its cosine distance to every row kept so far is above
  `min_distance` (default 0.1, the paper's similarity 0.9), until N are kept. When fewer than N
  rows are that far apart, fewer are kept, and the summary and a warning say so.
- by score+diversity, clusters: the balanced shares above, the best-scored rows of each cluster.

Deterministic: the same rows, options and seed give the same selection. Kept rows stay in input
order; the others go to removed.jsonl with reason `not_selected`. The input is read twice, once
to embed and once to write; only the embeddings (and scores) are held in memory, never the
rows. summary.json has `select` (what was asked and done) and `clusters`: the k-means clusters
of the embeddings, their sizes, how many rows of each were selected and how many were covered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from exemplar.config import SelectOptions
from exemplar.curate.io import Record, StageWriter, source
from exemplar.curate.parallel import chunked
from exemplar.curate.text import compared_text
from exemplar.errors import DataError

MAX_DEFAULT_CLUSTERS = 100
EMBED_BATCH = 256


@dataclass
class Pool:
    """What selection needs of the rows: one embedding (and score) per row, in input order."""

    vectors: np.ndarray  # (rows, dim) float32, unit length
    scores: np.ndarray | None  # (rows,) float64, when ranking by a score


def select(
    read: Callable[[], Iterable[Record]],
    writer: StageWriter,
    options: SelectOptions,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> None:
    """Select from the records `read()` gives (called twice: the same records both times)."""
    pool = embed(read(), options, progress)
    rows = len(pool.vectors)
    k = min(options.clusters or default_clusters(options.n, rows), rows)
    labels = kmeans(pool.vectors, k, options.seed)
    chosen = choose(pool, labels, options)
    if len(chosen) < min(options.n, rows):
        log(
            f"warning: only {len(chosen)} rows are further apart than min_distance {options.min_distance:g} "
            f"(cosine distance); {options.n} were asked for: lower min_distance to keep more"
        )
    elif options.n >= rows:
        log(f"note: {rows} rows and n={options.n}: every row is kept")
    selected = np.zeros(rows, dtype=bool)
    selected[chosen] = True
    _write(read(), writer, selected, _why_not(options), progress)
    # short_by: rows the Deita recipe did not find far enough apart (not rows the input lacked)
    short_by = min(options.n, rows) - len(chosen)
    writer.extra["select"] = {"asked": options.n, "rows": rows, "selected": len(chosen), "short_by": short_by}
    writer.extra["clusters"] = cluster_report(labels, selected, k)


def choose(pool: Pool, labels: np.ndarray, options: SelectOptions) -> list[int]:
    """The positions of the selected rows."""
    n = min(options.n, len(pool.vectors))
    if options.by == "score":
        return top_scores(pool.scores, n)
    if options.method == "clusters":
        return cluster_balanced(labels, n, options.seed, pool.scores)
    if options.by == "diversity":
        return k_center(pool.vectors, n, options.seed)
    return deita(pool.vectors, pool.scores, n, options.min_distance)


def embed(records: Iterable[Record], options: SelectOptions, progress: bool) -> Pool:
    from exemplar.curate.dedup import load_encoder

    encoder = None
    blocks: list[np.ndarray] = []
    scores: list[float] = []
    with tqdm(desc="select: embedding", unit=" rows", disable=not progress) as bar:
        for chunk in chunked(records, EMBED_BATCH):
            if encoder is None:  # loaded only when there are rows
                encoder = load_encoder(options.model, "curate select")
            texts = [compared_text(r, options.on) or compared_text(r, "both") for r in chunk]
            vectors = encoder.encode(texts, normalize_embeddings=True, show_progress_bar=False)
            blocks.append(np.asarray(vectors, dtype=np.float32))
            if options.by != "diversity":
                scores.extend(score_of(r, options.score) for r in chunk)
            bar.update(len(chunk))
    vectors = np.concatenate(blocks) if blocks else np.zeros((0, 1), dtype=np.float32)
    return Pool(vectors, np.asarray(scores, dtype=np.float64) if options.by != "diversity" else None)


def score_of(record: Record, name: str) -> float:
    value = ((record.get("meta") or {}).get("scores") or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        where = source(record)
        raise DataError(
            f"{where.get('path')} row {where.get('row')}: meta.scores.{name} is {value!r}, not a number "
            f"(score the rows first: exemplar curate score --scorer ...; or select by another score)"
        )
    return float(value)


def default_clusters(n: int, rows: int) -> int:
    return max(1, min(n, round(math.sqrt(rows)), MAX_DEFAULT_CLUSTERS))


def kmeans(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The k-means cluster of each row (scikit-learn, which sentence-transformers brings)."""
    if len(vectors) == 0:
        return np.zeros(0, dtype=np.int64)
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # Fewer distinct rows than clusters (duplicates) is fine here: some clusters stay empty.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed)
        return model.fit_predict(vectors).astype(np.int64)


def k_center(vectors: np.ndarray, n: int, seed: int) -> list[int]:
    """Greedy k-center: each next row the farthest from the rows chosen so far."""
    if n == 0:
        return []
    first = int(np.random.default_rng(seed).integers(len(vectors)))
    chosen = [first]
    nearest = 1.0 - vectors @ vectors[first]  # each row's distance to its nearest chosen row
    nearest[first] = -np.inf
    while len(chosen) < n:
        row = int(np.argmax(nearest))  # the first of equals: deterministic
        chosen.append(row)
        np.minimum(nearest, 1.0 - vectors @ vectors[row], out=nearest)
        nearest[row] = -np.inf
    return chosen


def deita(vectors: np.ndarray, scores: np.ndarray, n: int, min_distance: float) -> list[int]:
    """Best score first, each kept only if farther than min_distance from every kept row."""
    kept = np.zeros((n, vectors.shape[1]), dtype=np.float32)
    chosen: list[int] = []
    for row in _by_score(scores):
        if chosen and float(np.max(kept[: len(chosen)] @ vectors[row])) >= 1.0 - min_distance:
            continue
        kept[len(chosen)] = vectors[row]
        chosen.append(int(row))
        if len(chosen) == n:
            break
    return chosen


def top_scores(scores: np.ndarray, n: int) -> list[int]:
    return [int(i) for i in _by_score(scores)[:n]]


def _by_score(scores: np.ndarray) -> np.ndarray:
    """Positions from the highest score down; equal scores in input order."""
    return np.lexsort((np.arange(len(scores)), -scores))


def cluster_balanced(labels: np.ndarray, n: int, seed: int, scores: np.ndarray | None) -> list[int]:
    """The same share from every cluster: best-scored first with scores, else seeded random."""
    rng = np.random.default_rng(seed)
    sizes = np.bincount(labels, minlength=labels.max() + 1 if len(labels) else 0)
    chosen: list[int] = []
    for cluster, take in enumerate(shares(sizes.tolist(), n)):
        members = np.flatnonzero(labels == cluster)
        ranked = members[_by_score(scores[members])] if scores is not None else rng.permutation(members)
        chosen.extend(int(i) for i in ranked[:take])
    return chosen


def shares(sizes: list[int], n: int) -> list[int]:
    """n split as evenly as the clusters' sizes allow: each gives min(size, level) rows for the
    highest level that fits, and the few left over come one each from the largest clusters."""
    n = min(n, sum(sizes))
    low, high = 0, max(sizes, default=0)
    while low < high:  # the highest level with sum(min(size, level)) <= n
        mid = (low + high + 1) // 2
        low, high = (mid, high) if sum(min(s, mid) for s in sizes) <= n else (low, mid - 1)
    take = [min(s, low) for s in sizes]
    larger = sorted((c for c, size in enumerate(sizes) if size > low), key=lambda c: (-sizes[c], c))
    for c in larger[: n - sum(take)]:
        take[c] += 1
    return take


def cluster_report(labels: np.ndarray, selected: np.ndarray, k: int) -> dict:
    sizes = np.bincount(labels, minlength=k)
    picked = np.bincount(labels[selected], minlength=k)
    return {
        "k": k,
        "covered": int(np.count_nonzero(picked)),
        "nonempty": int(np.count_nonzero(sizes)),
        "sizes": sizes.tolist(),
        "selected": picked.tolist(),
    }


def _why_not(options: SelectOptions) -> str:
    how = {
        ("diversity", "k-center"): "greedy k-center on prompt embeddings",
        ("diversity", "clusters"): "cluster-balanced sampling",
        (
            "score+diversity",
            "k-center",
        ): f"best {options.score} first, min cosine distance {options.min_distance:g}",
        ("score+diversity", "clusters"): f"best {options.score} of each cluster",
    }.get((options.by, options.method), f"the {options.n} best {options.score}")
    return f"not among the {options.n} selected ({how})"


def _write(
    records: Iterable[Record], writer: StageWriter, selected: np.ndarray, detail: str, progress: bool
) -> None:
    count = 0
    for record in tqdm(records, desc="select: writing", unit=" rows", disable=not progress):
        if count >= len(selected):
            raise DataError("the input has more rows than when it was embedded: it changed while selecting")
        if selected[count]:
            writer.keep(record)
        else:
            writer.remove(record, "not_selected", detail)
        count += 1
    if count != len(selected):
        raise DataError("the input has fewer rows than when it was embedded: it changed while selecting")
