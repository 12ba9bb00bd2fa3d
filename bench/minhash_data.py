"""Rows for the MinHash benchmark: distinct chats made from the reference data, with injected
exact and near duplicates whose ground truth is known.

An original row is a prompt (an Alpaca or self-instruct instruction) and a response of 2-4
sentences drawn at random from the reference texts (Alpaca outputs, C4, Wikipedia), so that a
few thousand source texts give a million rows that are not duplicates of one another. A copy
names one earlier original and comes after it in the file (so the first-kept rule keeps the
original): an exact copy is the same row; a near copy has 1-10 edits (swap two neighbouring
words, delete a word, change a word's case, double a space), so that near copies fall on both
sides of the usual thresholds. Case and whitespace edits vanish
under the normalisation dedup applies (NFKC, case folding, whitespace collapsed); swaps and
deletions change the shingles, and each near copy's true Jaccard similarity with its original
(character 5-grams of the normalised text, computed exactly) is stored with the truth.

The reference data is read at run time from EXEMPLAR_SHARED_DATA (or ../shared/data), never
copied into the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EXEMPLAR_SHARED_DATA") or REPO.parent / "shared" / "data")
SHINGLE = 5  # the same character n-grams as exemplar/curate/dedup.py, computed independently here
ORIGINAL, EXACT, NEAR = 0, 1, 2
EDITS = ("swap", "delete", "case", "space")


@dataclass
class Truth:
    """Per row of the made file (0-based): kind (ORIGINAL/EXACT/NEAR), the original it copies
    (-1 for an original), and the true Jaccard with that original (1.0 for an original)."""

    kind: np.ndarray
    copy_of: np.ndarray
    jaccard: np.ndarray

    def save(self, path: Path) -> None:
        np.savez(path, kind=self.kind, copy_of=self.copy_of, jaccard=self.jaccard)

    @classmethod
    def load(cls, path: Path) -> Truth:
        arrays = np.load(path)
        return cls(arrays["kind"], arrays["copy_of"], arrays["jaccard"])


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingle_set(text: str) -> set[str]:
    text = normalise(text)
    if len(text) <= SHINGLE:
        return {text}
    return {text[i : i + SHINGLE] for i in range(len(text) - SHINGLE + 1)}


def compared(row: dict) -> str:
    """What `exemplar curate dedup --on both` compares: user then assistant text."""
    return "\n".join(m["content"] for m in row["messages"])


def true_jaccard(a: str, b: str) -> float:
    """Exact Jaccard similarity of two compared texts' shingle sets."""
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / len(x | y)


def source_texts(shared: Path = SHARED) -> tuple[list[str], list[str]]:
    """(prompts, sentences) from the reference data."""
    alpaca = json.loads((shared / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    seeds = [json.loads(line) for line in (shared / "seed_tasks.jsonl").open(encoding="utf-8")]
    prompts = sorted({r["instruction"].strip() for r in alpaca + seeds if r["instruction"].strip()})
    documents = [r["output"] for r in alpaca]
    documents += [json.loads(line)["text"] for line in (shared / "c4_demo.jsonl").open(encoding="utf-8")]
    documents += (shared / "wiki_demo.txt").read_text(encoding="utf-8").splitlines()
    sentences = {
        s.strip() for doc in documents for s in re.split(r"(?<=[.!?])\s+", doc) if 30 <= len(s.strip()) <= 300
    }
    return prompts, sorted(sentences)


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def originals(rng: random.Random, count: int, prompts: list[str], sentences: list[str]) -> list[dict]:
    seen: set[bytes] = set()
    rows: list[dict] = []
    while len(rows) < count:
        row = _chat(rng.choice(prompts), " ".join(rng.sample(sentences, rng.randint(2, 4))))
        key = hashlib.blake2b(normalise(compared(row)).encode(), digest_size=16).digest()
        if key not in seen:  # distinct after normalisation, so no original is an exact copy
            seen.add(key)
            rows.append(row)
    return rows


def edit_text(rng: random.Random, text: str, edit: str) -> str:
    words = text.split(" ")
    if len(words) < 3:
        return text + "  "
    i = rng.randrange(len(words) - 1)
    if edit == "swap":
        words[i], words[i + 1] = words[i + 1], words[i]
    elif edit == "delete":
        del words[i]
    elif edit == "case":
        words[i] = words[i].upper() if words[i] != words[i].upper() else words[i].lower()
    else:
        words[i] += " "
    return " ".join(words)


def near_copy(rng: random.Random, row: dict) -> tuple[dict, list[str]]:
    """A copy with 1-10 edits, each in the user or assistant text (weighted by length)."""
    user, assistant = (m["content"] for m in row["messages"])
    edits = [rng.choice(EDITS) for _ in range(rng.randint(1, 10))]
    for edit in edits:
        if rng.random() < len(user) / (len(user) + len(assistant)):
            user = edit_text(rng, user, edit)
        else:
            assistant = edit_text(rng, assistant, edit)
    return _chat(user, assistant), edits


def make_rows(
    total: int, seed: int = 0, exact_share: float = 0.05, near_share: float = 0.05, shared: Path = SHARED
) -> tuple[list[dict], Truth]:
    """`total` rows in file order and their truth; copies of random originals, each after it."""
    rng = random.Random(seed)
    prompts, sentences = source_texts(shared)
    n_exact, n_near = round(total * exact_share), round(total * near_share)
    base = originals(rng, total - n_exact - n_near, prompts, sentences)
    # (position key, row, kind, original index in `base`): a copy's key lies after its original's.
    items = [(float(i), row, ORIGINAL, i) for i, row in enumerate(base)]
    for n, kind in ((n_exact, EXACT), (n_near, NEAR)):
        for _ in range(n):
            o = rng.randrange(len(base))
            row = base[o] if kind == EXACT else near_copy(rng, base[o])[0]
            items.append((o + 0.5 + rng.random() * (len(base) - o - 0.5), row, kind, o))
    items.sort(key=lambda item: item[0])
    position = {item[3]: p for p, item in enumerate(items) if item[2] == ORIGINAL}
    kind = np.array([item[2] for item in items], dtype=np.int8)
    copy_of = np.array([-1 if k == ORIGINAL else position[o] for _, _, k, o in items], dtype=np.int64)
    jaccard = np.array(
        [true_jaccard(compared(row), compared(base[o])) if k == NEAR else 1.0 for _, row, k, o in items],
        dtype=np.float32,
    )
    return [item[1] for item in items], Truth(kind, copy_of, jaccard)


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
