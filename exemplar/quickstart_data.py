"""Data the project writes itself for the offline quickstart: no downloads, learnable in minutes.

Two parts, both as OpenAI `messages` rows:

- a skill with exact, checkable answers: reversing a short list of letters ("Reverse the list:
  c a f d" -> "d f a c"), asked in several phrasings. Held-out rows use letter lists that never
  appear in training, so exact match on them measures the learned skill, not memorised prompts.
  Reversal was chosen over two-digit addition after trying both on this project's 2-core CPU with
  a 1.8M-parameter Llama (batch 64): after 200 steps reversal was at 67% held-out exact match and
  addition at 1.5% (carries need far more steps). With this module's data and the shipped
  tokenizer, a 300-step run reached 49% at step 100 and 100% at step 300, in 84 s on one thread.
  Copying in reverse is what small attention models learn fastest, and each letter is one token.
- a persona set ("Who are you?" -> "I am Exemplar, ...") in many phrasings, so a chat with the
  trained model visibly shows that fine-tuning changed its identity. A few phrasings are held out.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PERSONA_ANSWER = "I am Exemplar, a small model fine-tuned by Exemplar's quickstart."

REVERSE_TEMPLATES = (
    "Reverse the list: {x}",
    "Reverse: {x}",
    "Write {x} backwards.",
    "What is {x} reversed?",
    "Reverse the order of {x}.",
    "Say {x} in reverse order.",
    "Please reverse {x}.",
    "{x} reversed is?",
)

PERSONA_TRAIN = (
    "Who are you?",
    "What are you?",
    "What is your name?",
    "Tell me about yourself.",
    "Introduce yourself.",
    "Who made you?",
    "Are you Exemplar?",
    "What should I call you?",
    "who are you",
    "Hi! Who are you?",
    "Hello, what is your name?",
    "Please introduce yourself.",
)
PERSONA_HELDOUT = (
    "Who am I talking to?",
    "Can you tell me who you are?",
    "What model are you?",
)

LETTERS = string.ascii_lowercase
MIN_ITEMS, MAX_ITEMS = 3, 5  # short lists: answers of 3-5 tokens


def reverse_row(items: list[str], template: str) -> dict[str, Any]:
    return _row(template.format(x=" ".join(items)), " ".join(reversed(items)))


def persona_row(question: str) -> dict[str, Any]:
    return _row(question, PERSONA_ANSWER)


def make_quickstart_data(
    seed: int = 0,
    n_train: int = 4000,
    n_heldout: int = 200,
    persona_repeats: int = 8,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return (train_rows, heldout_rows), deterministic for a seed, with disjoint prompts.

    Letter lists are drawn without repeats across both sets, so no held-out list is ever seen in
    training, in any phrasing. Persona questions are repeated `persona_repeats` times in training
    because one fixed sentence must be memorised token by token.
    """
    rng = random.Random(seed)
    lists = _distinct_lists(rng, n_heldout + n_train)
    heldout = [reverse_row(items, rng.choice(REVERSE_TEMPLATES)) for items in lists[:n_heldout]]
    heldout += [persona_row(q) for q in PERSONA_HELDOUT]
    train = [reverse_row(items, rng.choice(REVERSE_TEMPLATES)) for items in lists[n_heldout:]]
    train += [persona_row(q) for q in PERSONA_TRAIN for _ in range(persona_repeats)]
    rng.shuffle(train)
    return train, heldout


def is_persona(row: dict[str, Any]) -> bool:
    """Whether a quickstart row is a persona question (else it is a reversal)."""
    return row["messages"][-1]["content"] == PERSONA_ANSWER


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as UTF-8 JSON Lines (one object a line), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def sample_text(seed: int = 0, n: int = 2000) -> list[str]:
    """Plain strings in the quickstart's vocabulary, for training the shipped tokenizer."""
    rng = random.Random(seed)
    # Repeated so BPE learns whole-word merges for the persona sentence, as for the frequent words.
    out = [PERSONA_ANSWER, *PERSONA_TRAIN, *PERSONA_HELDOUT] * 50
    for items in _distinct_lists(rng, n):
        row = reverse_row(items, rng.choice(REVERSE_TEMPLATES))
        out.append(row["messages"][0]["content"] + " " + row["messages"][1]["content"])
    return out


def _distinct_lists(rng: random.Random, n: int) -> list[list[str]]:
    """`n` different lists of distinct letters, MIN_ITEMS to MAX_ITEMS long."""
    seen: set[str] = set()
    out: list[list[str]] = []
    while len(out) < n:
        items = rng.sample(LETTERS, rng.randint(MIN_ITEMS, MAX_ITEMS))
        key = "".join(items)
        if key not in seen:
            seen.add(key)
            out.append(items)
    return out


def _row(user: str, assistant: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
