"""The BPE word cache (exemplar.data.pieces.BpeWords) on text that does not repeat.

The data-preparation benchmark repeats alpaca_en_demo.json's 999 rows, so after the first pass
every word is a cache hit. This script measures the cache where it starts cold: on real,
non-repeating texts (Wikipedia articles, C4 documents, the 999 Alpaca rows once), it tokenizes
every text whole (the `tokenizers` library, all cores) and word by word through the cache (one
Python thread), checks that the ids are identical, and prints the times and the hit rate.

    python bench/word_cache.py
"""

from __future__ import annotations

import gc
import json
import time

import common


def _texts() -> dict[str, list[str]]:
    shared = common.SHARED
    wiki = [
        line for line in (shared / "wiki_demo.txt").read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    c4 = [
        json.loads(line)["text"]
        for line in (shared / "c4_demo.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    alpaca = [
        r[k] for r in json.loads(common.ALPACA.read_text(encoding="utf-8")) for k in ("instruction", "output")
    ]
    return {"wiki_demo.txt": wiki, "c4_demo.jsonl": c4, "alpaca_en_demo.json": alpaca}


def main() -> None:
    from transformers import AutoTokenizer

    from exemplar.data.pieces import BpeWords, PieceTokenizer
    from exemplar.data.tokenizer import prepare_tokenizer

    tokenizer = prepare_tokenizer(
        AutoTokenizer.from_pretrained(str(common.LLAMA2_TOKENIZER)), "chatml"
    ).tokenizer
    view, normalize, words = PieceTokenizer(tokenizer.backend_tokenizer)._later_text
    if words is None or normalize is None:
        raise SystemExit("this tokenizer does not use the word cache")
    gc.disable()  # as during data preparation
    print(
        "| texts | count | chars | tokens | whole texts (s) | word by word, cold (s) | words | distinct | hits |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, raw in _texts().items():
        texts = [normalize(t) for t in raw]
        whole_s = cold_s = float("inf")
        for _ in range(3):  # best of three: a shared machine
            start = time.perf_counter()
            expected = [e.ids for e in view.encode_batch_fast(texts, add_special_tokens=False)]
            whole_s = min(whole_s, time.perf_counter() - start)
            cache = BpeWords(view, "▁")
            start = time.perf_counter()
            got = [ids for at in range(0, len(texts), 2048) for ids in cache.encode(texts[at : at + 2048])]
            cold_s = min(cold_s, time.perf_counter() - start)
            if got != expected:
                raise SystemExit(f"{name}: word-by-word ids differ from whole-text ids")
        count = sum(len(cache._split(t)) for t in texts)
        print(
            f"| {name} | {len(texts):,} | {sum(map(len, texts)):,} | {sum(map(len, expected)):,} | {whole_s:.3f} "
            f"| {cold_s:.3f} | {count:,} | {len(cache._ids):,} | {1 - len(cache._ids) / count:.0%} |"
        )


if __name__ == "__main__":
    main()
