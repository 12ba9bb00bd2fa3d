"""`exemplar curate filter`: rules that remove bad rows, each with its own reason name.

A row is removed by the first rule it fails, in this order (defaults in config.FilterConfig):

| reason | removes |
| --- | --- |
| invalid_characters | control characters (other than tab and newlines), U+FFFD, lone surrogates, noncharacters |
| empty_response | no assistant reply, an assistant turn with no text and no tool call, or a placeholder reply |
| repeats_prompt | a reply that is the prompt again (or 90% of it, contained in it) |
| refusal | a reply matching a refusal or boilerplate pattern (editable list) |
| repetition | the Gopher repetition rules (Rae et al. 2021, table A1) on the reply |
| language | a reply not in `languages` (py3langid), when that list is set |
| too_short | fewer reply tokens than `min_response_tokens` (the training tokenizer) |
| too_long | more message tokens than `max_tokens` (default: the config's `max_length`) |
| min_score | a `meta.scores.NAME` below a `--min-score NAME=VALUE` |

Token counts are of the message text without the chat template (a few tokens a turn less than
training sees). Rules run on worker processes, a chunk of rows at a time.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from exemplar.config import Config, FilterConfig
from exemplar.curate import require
from exemplar.curate.io import Record, StageWriter
from exemplar.curate.parallel import map_chunks
from exemplar.curate.text import compared_text, normalise
from exemplar.errors import DataError

# Replies that refuse or talk about being a model instead of answering. Case-insensitive regexes.
REFUSAL_PATTERNS = [
    r"\bas an ai(?: language)? model\b",
    r"\bas a (?:large )?language model\b",
    r"\bi(?:'m| am) (?:sorry|afraid),? (?:but )?i (?:can(?:'|no)t|cannot|am (?:not able|unable)) "
    r"(?:help|assist|provide|fulfil|comply|do that)",
    r"\bi (?:can(?:'|no)t|cannot|won't|will not) (?:help|assist) (?:you )?with (?:that|this)\b",
    r"\bi(?:'m| am) (?:not able|unable) to (?:help|assist|comply|fulfil)",
    r"\bi (?:do not|don't) have (?:personal )?(?:opinions|feelings|emotions|the ability to browse)\b",
    r"\bmy (?:knowledge )?cutoff\b",
    r"\bi was (?:trained|created|developed) by openai\b",
]

_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]")
_CODE_BLOCK = re.compile(r"```.*?(?:```|$)", re.S)
# Gopher word n-grams: a word is a run of non-space characters, and each CJK character is a word.
_WORD = re.compile(
    r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\s\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]+"
)
# (Rae et al. 2021, "Scaling Language Models", table A1.) Written here rather than taken from a
# library: the one that has them (datatrove) is a whole pipeline framework.
GOPHER_LINES = (0.30, 0.20)  # duplicate line fraction; share of characters in duplicate lines
GOPHER_PARAGRAPHS = (0.30, 0.20)
GOPHER_TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUPLICATE_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

Verdict = tuple[str, str] | None  # (reason, detail), or None: the row passes


@dataclass
class Rules:
    """The rules with what they need loaded once per worker: tokenizer, language model."""

    options: FilterConfig
    min_scores: dict[str, float]
    max_tokens: int | None
    tokenizer: Any = None
    language_identifier: Any = None

    def __post_init__(self) -> None:
        patterns = self.options.refusal_patterns
        self.refusals = [re.compile(p, re.I) for p in (REFUSAL_PATTERNS if patterns is None else patterns)]
        self.placeholders = {normalise(p) for p in self.options.placeholders}

    def check(self, record: Record) -> Verdict:
        for rule in self.rules():
            verdict = rule(record)
            if verdict is not None:
                return verdict
        return None

    def rules(self) -> list[Callable[[Record], Verdict]]:
        o = self.options
        chosen = [
            (o.invalid_characters, self.invalid_characters),
            (True, self.empty_response),
            (o.repeats_prompt, self.repeats_prompt),
            (bool(self.refusals), self.refusal),
            (o.repetition, self.repetition),
            (bool(o.languages), self.language),
            (self.tokenizer is not None and o.min_response_tokens, self.too_short),
            (self.tokenizer is not None and self.max_tokens, self.too_long),
            (bool(self.min_scores), self.min_score),
        ]
        return [rule for on, rule in chosen if on]

    def invalid_characters(self, record: Record) -> Verdict:
        found = _INVALID.search(compared_text(record, "both") + _system_text(record))
        if found:
            return "invalid_characters", f"character U+{ord(found.group()):04X}"
        return None

    def empty_response(self, record: Record) -> Verdict:
        if "messages" in record:
            replies = [m for m in record["messages"] if m["role"] == "assistant"]
            if not replies:
                return "empty_response", "no assistant message"
            for m in replies:
                if not (m.get("content") or "").strip() and not m.get("tool_calls"):
                    return "empty_response", "an assistant message with no text and no tool call"
        response = normalise(compared_text(record, "response"))
        if not response:
            return "empty_response", "no text"
        if response in self.placeholders:
            return "empty_response", f"placeholder reply {response!r}"
        return None

    def repeats_prompt(self, record: Record) -> Verdict:
        prompt, response = normalise(_last_user(record)), normalise(compared_text(record, "response"))
        if prompt and response and response in prompt and len(response) >= 0.9 * len(prompt):
            return "repeats_prompt", "the reply repeats the prompt"
        return None

    def refusal(self, record: Record) -> Verdict:
        response = compared_text(record, "response")
        for pattern in self.refusals:
            found = pattern.search(response)
            if found:
                return "refusal", f"matches {pattern.pattern!r}: {found.group()!r}"
        return None

    def repetition(self, record: Record) -> Verdict:
        found = gopher_repetition(compared_text(record, "response"), self.options.repetition_min_words)
        return ("repetition", found) if found else None

    def language(self, record: Record) -> Verdict:
        text = _CODE_BLOCK.sub(" ", compared_text(record, "response"))
        if sum(c.isalpha() for c in text) < self.options.language_min_chars:
            return None
        lang, confidence = self.language_identifier.classify(text)
        if lang in self.options.languages:
            return None
        if confidence < self.options.language_min_confidence:
            return None  # the detector is not sure: keep the row
        return "language", f"language {lang} (confidence {confidence:.2f}), not in {self.options.languages}"

    def too_short(self, record: Record) -> Verdict:
        n = self._tokens(compared_text(record, "response"))
        if n < self.options.min_response_tokens:
            return "too_short", f"{n} reply tokens < {self.options.min_response_tokens}"
        return None

    def too_long(self, record: Record) -> Verdict:
        n = self._tokens(_system_text(record) + "\n" + compared_text(record, "both"))
        if n > self.max_tokens:
            return "too_long", f"{n} tokens > {self.max_tokens}"
        return None

    def min_score(self, record: Record) -> Verdict:
        scores = (record.get("meta") or {}).get("scores") or {}
        for name, low in self.min_scores.items():
            value = scores.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                where = (record.get("meta") or {}).get("source", {})
                raise DataError(
                    f"{where.get('path')}, row {where.get('row')}: no number at meta.scores.{name} "
                    f"for --min-score {name}={low:g} (run that scorer first)"
                )
            if value < low:
                return "min_score", f"scores.{name} = {value:g} < {low:g}"
        return None

    def _tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _last_user(record: Record) -> str:
    users = [m.get("content") or "" for m in record.get("messages", []) if m["role"] == "user"]
    return users[-1] if users else ""


def _system_text(record: Record) -> str:
    return "\n".join(
        m.get("content") or "" for m in record.get("messages", []) if m["role"] in ("system", "tool")
    )


def gopher_repetition(text: str, min_words: int) -> str | None:
    """Why the text fails a Gopher repetition rule, or None. Line and paragraph rules always
    apply; n-gram rules from `min_words` words (on a few words the fractions are noise)."""
    for parts, (count_limit, char_limit), what in (
        ([p for p in re.split(r"\n{2,}", text.strip()) if p.strip()], GOPHER_PARAGRAPHS, "paragraphs"),
        ([line for line in text.splitlines() if line.strip()], GOPHER_LINES, "lines"),
    ):
        count_share, char_share = _duplicate_share(parts)
        if count_share > count_limit:
            return f"duplicate {what}: {count_share:.2f} of them > {count_limit}"
        if char_share > char_limit:
            return f"duplicate {what}: {char_share:.2f} of the characters > {char_limit}"
    words = _WORD.findall(text)
    if len(words) < min_words:
        return None
    total = sum(map(len, words))
    for n, limit in GOPHER_TOP_NGRAM.items():
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        gram, count = grams.most_common(1)[0]
        share = count * sum(map(len, gram)) / total
        if count > 1 and share > limit:
            return f"top {n}-gram {' '.join(gram)!r} covers {share:.2f} of the characters > {limit}"
    for n, limit in GOPHER_DUPLICATE_NGRAM.items():
        share = _duplicate_ngram_share(words, n, total)
        if share > limit:
            return f"duplicate {n}-grams cover {share:.2f} of the characters > {limit}"
    return None


def _duplicate_share(parts: list[str]) -> tuple[float, float]:
    """Share of parts that repeat an earlier one, and share of characters in them."""
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_count = dup_chars = 0
    for part in parts:
        if part in seen:
            dup_count += 1
            dup_chars += len(part)
        seen.add(part)
    return dup_count / len(parts), dup_chars / max(1, sum(map(len, parts)))


def _duplicate_ngram_share(words: list[str], n: int, total: int) -> float:
    """Characters in the repeats of an n-gram seen earlier, counted without overlaps (a repeat
    skips past itself): the reading of Gopher's rule that datatrove uses, so the first copy of a
    phrase costs nothing."""
    seen: set[tuple[str, ...]] = set()
    repeated = i = 0
    while i <= len(words) - n:
        gram = tuple(words[i : i + n])
        if gram in seen:
            repeated += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated / max(1, total)


# ---------------------------------------------------------------------------------------------
# Running the rules over a stream, on workers

_RULES: Rules | None = None  # one per worker process


def _start_worker(config: Config, min_scores: dict[str, float], tokenizer_source: str | None) -> None:
    global _RULES
    options = config.curate.filter
    tokenizer = identifier = None
    if tokenizer_source is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if options.languages:
        langid = require("py3langid.langid", "the language rule")
        identifier = langid.LanguageIdentifier.from_modelpath(
            langid.MODEL_DIR / langid.MODEL_FILE, norm_probs=True
        )
    max_tokens = options.max_tokens or config.max_length
    _RULES = Rules(options, min_scores, max_tokens, tokenizer, identifier)


def _check_chunk(chunk: list[Record]) -> list[Verdict]:
    return [_RULES.check(record) for record in chunk]


def filter_records(
    records: Iterable[Record],
    writer: StageWriter,
    config: Config,
    min_scores: dict[str, float] | None = None,
    tokenizer_source: str | None = None,
    workers: int = 1,
    progress: bool = True,
) -> None:
    """Keep or remove each record by the rules; without a tokenizer the token rules are skipped
    (and the summary says so)."""
    if tokenizer_source is None:
        writer.extra["skipped_rules"] = ["too_short", "too_long"]
    initargs = (config, dict(min_scores or {}), tokenizer_source)
    with tqdm(desc="filter", unit=" rows", disable=not progress) as bar:
        for chunk, verdicts in map_chunks(_check_chunk, records, workers, 256, _start_worker, initargs):
            for record, verdict in zip(chunk, verdicts, strict=True):
                if verdict is None:
                    writer.keep(record)
                else:
                    writer.remove(record, *verdict)
                bar.update()
