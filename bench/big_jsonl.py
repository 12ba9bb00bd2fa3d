"""A large chat JSONL made from the reference Alpaca rows, for measuring peak memory on huge inputs
(RELIABILITY.md, "huge inputs"): `python bench/big_jsonl.py OUT.jsonl --gib 1`.

The 999 rows repeat with a varying tag in both messages, so every row is distinct (no cache or
deduplication can shortcut the work) and its length stays that of a real Alpaca row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alpaca_rows, prompt_completion  # noqa: E402


def write_rows(path: Path, size: int) -> int:
    """Write rows until the file holds at least `size` bytes; returns the number of rows."""
    chats = [prompt_completion(row) for row in alpaca_rows()]
    rows, written = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < size:
            chat = chats[rows % len(chats)]
            tag = f"(variant {rows // len(chats)})"
            line = json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"{chat['prompt'][0]['content']} {tag}"},
                        {"role": "assistant", "content": f"{chat['completion'][0]['content']} {tag}"},
                    ]
                },
                ensure_ascii=False,
            )
            f.write(line + "\n")
            written += len(line.encode("utf-8")) + 1
            rows += 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--gib", type=float, default=1.0, help="file size in GiB (default 1)")
    args = parser.parse_args()
    rows = write_rows(args.out, int(args.gib * 2**30))
    print(f"{args.out}: {rows} rows, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
