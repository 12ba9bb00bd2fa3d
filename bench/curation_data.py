"""Data for bench/curation.py: the quickstart's checkable task (reverse a list of letters,
exemplar/quickstart_data.py) as a large noisy set, and the verifier that checks an answer.

The noisy set is clean rows plus the four kinds of noise a scraped or generated SFT set has,
each row tagged with its kind in `meta.noise` (meta is never tokenized; the curation stages do
not read it: it is how the bench counts what each stage removed):

- wrong: a reversal answered wrongly (the list as given, shuffled, or reversed with a letter dropped);
- refusal: a reversal answered with a refusal ("I'm sorry, but I cannot help with that.");
- repetition: the right answer repeated on several lines, so the model does not learn to stop;
- duplicate: a few clean rows copied many times (verbatim, or with doubled or trailing spaces).

All letter lists are distinct and none is in the held-out set, as in the quickstart.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from exemplar.quickstart_data import is_persona, make_quickstart_data

NOISE_KINDS = ("wrong", "refusal", "repetition", "duplicate")
REFUSALS = (
    "I'm sorry, but I cannot help with that.",
    "As an AI language model, I cannot reverse lists.",
    "I am unable to assist with this request.",
)
_LETTER_LIST = re.compile(r"(?<![a-z])[a-z](?: [a-z]){2,}(?![a-z])")


@dataclass(frozen=True)
class NoiseSizes:
    clean: int = 4000
    wrong: int = 1800
    refusal: int = 800
    repetition: int = 800
    duplicated_rows: int = 8  # distinct clean rows copied ...
    copies: int = 150  # ... this many extra times each

    def total(self) -> int:
        return self.clean + self.wrong + self.refusal + self.repetition + self.duplicated_rows * self.copies


def reversal_verified(record: dict[str, Any]) -> bool:
    """Whether the answer is the prompt's letter list reversed: a verifier in the sense of
    `exemplar curate score --scorer verifier:module:function` (it gets the record)."""
    messages = record["messages"]
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    answer = next(m["content"] for m in messages if m["role"] == "assistant")
    found = _LETTER_LIST.search(" ".join(prompt.split()))  # a doubled space is still the same list
    return found is not None and answer == " ".join(reversed(found.group().split()))


def _tagged(row: dict[str, Any], kind: str) -> dict[str, Any]:
    return {**row, "meta": {"noise": kind}}


def _answered(row: dict[str, Any], answer: str) -> dict[str, Any]:
    user = row["messages"][0]
    return {"messages": [user, {"role": "assistant", "content": answer}]}


def wrong_answer(rng: random.Random, right: str) -> str:
    letters = right.split()
    kind = rng.randrange(3)
    if kind == 0:
        return " ".join(reversed(letters))  # the list as given
    if kind == 1:
        while (shuffled := rng.sample(letters, len(letters))) == letters:
            pass
        return " ".join(shuffled)
    dropped = letters[:]
    del dropped[rng.randrange(len(dropped))]
    return " ".join(dropped)


def respaced(rng: random.Random, row: dict[str, Any]) -> dict[str, Any]:
    """A copy that differs only in whitespace: verbatim, a doubled space, or a trailing one."""
    user = row["messages"][0]["content"]
    choice = rng.randrange(3)
    if choice == 1:
        user = user.replace(" ", "  ", 1)
    elif choice == 2:
        user += " "
    return {"messages": [{"role": "user", "content": user}, row["messages"][1]]}


def make_noisy_set(
    sizes: NoiseSizes = NoiseSizes(), seed: int = 0, n_heldout: int = 200
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(noisy training rows in random order, each with meta.noise; held-out reversal rows)."""
    rng = random.Random(seed)
    need = sizes.clean + sizes.wrong + sizes.refusal + sizes.repetition
    rows, heldout = make_quickstart_data(seed=seed, n_train=need, n_heldout=n_heldout, persona_repeats=0)
    heldout = [r for r in heldout if not is_persona(r)]
    rng.shuffle(rows)
    cuts = iter(rows)
    clean = [_tagged(next(cuts), "clean") for _ in range(sizes.clean)]
    out = list(clean)
    for _ in range(sizes.wrong):
        row = next(cuts)
        out.append(_tagged(_answered(row, wrong_answer(rng, row["messages"][1]["content"])), "wrong"))
    for _ in range(sizes.refusal):
        out.append(_tagged(_answered(next(cuts), rng.choice(REFUSALS)), "refusal"))
    for _ in range(sizes.repetition):
        row = next(cuts)
        answer = row["messages"][1]["content"]
        out.append(_tagged(_answered(row, "\n".join([answer] * rng.randint(3, 6))), "repetition"))
    for row in rng.sample(clean, sizes.duplicated_rows):
        out += [_tagged(respaced(rng, row), "duplicate") for _ in range(sizes.copies)]
    rng.shuffle(out)
    return _originals_first(out), heldout


def _originals_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Swap each duplicated row's clean original to the front of its copies, so that the copies
    are what a first-kept dedup removes."""
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        key = " ".join(row["messages"][0]["content"].split())
        if key not in first:
            first[key] = i
        elif row["meta"]["noise"] == "clean":
            j = first[key]
            rows[i], rows[j] = rows[j], rows[i]
    return rows
