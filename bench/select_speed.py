"""Seconds that `curate select` spends choosing, after embedding, on synthetic embeddings.

    python bench/select_speed.py --rows 100000 --n 1000

The embeddings are unit vectors of all-MiniLM-L6-v2's size (384) around 200 random centres; the
scores are random. Embedding itself is timed separately (`--embed ROWS`: Alpaca prompts with the
default model), since it is the model's speed, not selection's. Wall and CPU seconds are both
printed: on a shared machine the wall time depends on the other processes.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from exemplar.curate.select import cluster_balanced, deita, k_center, kmeans


def timed(label: str, fn, results: dict) -> object:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    results[label] = {
        "wall_s": round(time.perf_counter() - wall, 2),
        "cpu_s": round(time.process_time() - cpu, 2),
    }
    print(label, results[label], flush=True)
    return value


def synthetic(rows: int, dim: int = 384, centres: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dim))
    vectors = middle[rng.integers(centres, size=rows)] + rng.normal(scale=0.5, size=(rows, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def embed_speed(rows: int, results: dict) -> None:
    from exemplar.curate.dedup import load_encoder
    from exemplar.curate.io import read_inputs
    from exemplar.curate.text import compared_text
    from tests.conftest import shared_data_dir

    records = list(read_inputs([str(shared_data_dir() / "alpaca_en_demo.json")]))[:rows]
    texts = [compared_text(r, "prompt") for r in records]
    encoder = load_encoder(None, "bench")
    timed(
        f"embed {len(texts)} Alpaca prompts", lambda: encoder.encode(texts, show_progress_bar=False), results
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--embed", type=int, default=0, help="also time embedding this many Alpaca prompts")
    args = parser.parse_args()
    results: dict = {}
    vectors = synthetic(args.rows)
    scores = np.random.default_rng(1).random(args.rows)
    timed(f"k-center n={args.n}", lambda: k_center(vectors, args.n, 0), results)
    timed(f"deita n={args.n}", lambda: deita(vectors, scores, args.n, 0.1), results)
    labels = timed(f"k-means k={args.clusters}", lambda: kmeans(vectors, args.clusters, 0), results)
    timed(f"cluster-balanced n={args.n}", lambda: cluster_balanced(labels, args.n, 0, None), results)
    if args.embed:
        embed_speed(args.embed, results)
    print(json.dumps({"rows": args.rows, "n": args.n, **results}))


if __name__ == "__main__":
    main()
