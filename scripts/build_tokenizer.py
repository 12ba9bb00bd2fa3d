"""Build the small tokenizer Exemplar ships in exemplar/assets/tokenizer/.

A byte-level BPE trained on text this script generates itself (no third-party data), so the
quickstart and the tests run offline with a real tokenizer. Byte-level means any text encodes
(no unknown tokens); digits are split one per token, as in Qwen2 and Llama 3, so "37 + 48"
tokenizes the same way wherever it appears and sums are learnable digit by digit.

Deterministic: the corpus comes from fixed seeds and BPE training breaks ties by a fixed
order, so every run writes the same files (tests/test_quickstart_data.py checks it).

    python scripts/build_tokenizer.py [--out exemplar/assets/tokenizer] [--vocab-size 3072]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from exemplar.quickstart_data import sample_text

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]  # ids 0, 1, 2

# ChatML, as used by Qwen2: each turn is <|im_start|>role\ncontent<|im_end|>\n.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenization regex: words, single digits, punctuation runs, whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A small general vocabulary so the tokenizer is useful beyond the quickstart (tests, examples).
WORDS = [
    "the",
    "a",
    "an",
    "and",
    "or",
    "but",
    "if",
    "then",
    "else",
    "when",
    "while",
    "for",
    "with",
    "without",
    "from",
    "to",
    "of",
    "in",
    "on",
    "at",
    "by",
    "as",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "have",
    "has",
    "had",
    "do",
    "does",
    "did",
    "done",
    "can",
    "could",
    "will",
    "would",
    "should",
    "may",
    "might",
    "must",
    "shall",
    "not",
    "no",
    "yes",
    "all",
    "any",
    "some",
    "many",
    "much",
    "more",
    "most",
    "less",
    "few",
    "each",
    "every",
    "other",
    "another",
    "such",
    "same",
    "own",
    "only",
    "just",
    "also",
    "very",
    "too",
    "so",
    "than",
    "here",
    "there",
    "where",
    "what",
    "which",
    "who",
    "whom",
    "whose",
    "why",
    "how",
    "this",
    "that",
    "these",
    "those",
    "i",
    "you",
    "he",
    "she",
    "it",
    "we",
    "they",
    "me",
    "him",
    "her",
    "us",
    "them",
    "my",
    "your",
    "his",
    "its",
    "our",
    "their",
    "mine",
    "yours",
    "model",
    "data",
    "train",
    "training",
    "fine",
    "tune",
    "tuned",
    "loss",
    "token",
    "tokens",
    "batch",
    "step",
    "steps",
    "learning",
    "rate",
    "epoch",
    "eval",
    "evaluation",
    "test",
    "answer",
    "question",
    "please",
    "thank",
    "thanks",
    "hello",
    "hi",
    "help",
    "explain",
    "write",
    "read",
    "list",
    "sort",
    "reverse",
    "number",
    "numbers",
    "sum",
    "add",
    "plus",
    "minus",
    "times",
    "divide",
    "equal",
    "equals",
    "result",
    "value",
    "first",
    "second",
    "third",
    "last",
    "next",
    "new",
    "old",
    "small",
    "large",
    "big",
    "little",
    "good",
    "bad",
    "great",
    "best",
    "better",
    "right",
    "wrong",
    "true",
    "false",
    "time",
    "day",
    "year",
    "people",
    "world",
    "way",
    "thing",
    "man",
    "woman",
    "child",
    "work",
    "life",
    "hand",
    "part",
    "place",
    "case",
    "point",
    "group",
    "problem",
    "fact",
    "make",
    "know",
    "think",
    "take",
    "see",
    "come",
    "want",
    "look",
    "use",
    "find",
    "give",
    "tell",
    "ask",
    "seem",
    "feel",
    "try",
    "leave",
    "call",
    "keep",
    "let",
    "begin",
    "show",
    "hear",
    "play",
    "run",
    "move",
    "live",
    "believe",
    "hold",
    "bring",
    "happen",
    "provide",
    "sit",
    "stand",
    "lose",
    "pay",
    "meet",
    "include",
    "continue",
    "set",
    "learn",
    "change",
    "lead",
    "understand",
    "watch",
    "follow",
    "stop",
    "create",
    "speak",
    "allow",
    "spend",
    "grow",
    "open",
    "walk",
    "win",
    "offer",
    "remember",
    "love",
    "consider",
    "appear",
    "buy",
    "wait",
    "serve",
    "die",
    "send",
    "expect",
    "build",
    "stay",
    "fall",
    "cut",
    "reach",
    "kill",
    "remain",
    "suggest",
    "raise",
    "pass",
    "sell",
    "require",
    "report",
    "decide",
    "pull",
    "file",
    "folder",
    "config",
    "output",
    "input",
    "prompt",
    "response",
    "message",
    "system",
    "user",
    "assistant",
    "role",
    "content",
    "chat",
    "template",
    "mask",
    "label",
    "labels",
    "length",
    "sequence",
    "padding",
    "packing",
    "example",
    "examples",
    "python",
    "code",
    "function",
    "return",
    "class",
    "import",
    "print",
    "def",
    "self",
    "string",
    "int",
    "float",
    "dict",
    "list",
    "none",
]

SUFFIXES = ["s", "ed", "ing", "er", "ly", "ness", "able", "ment", "ion", "ful"]

CODE_LINES = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    'config = {"lr": 2e-4, "batch_size": 8}\n',
    "if x > 0 and y < 0:\n    z = x - y\n",
    "result = [n * 2 for n in numbers if n % 2 == 0]\n",
    'with open("data.jsonl") as f:\n    rows = [json.loads(line) for line in f]\n',
]


def generated_corpus(seed: int = 0) -> list[str]:
    """Text this script writes itself: quickstart prompts, chat turns, sentences, code, numbers."""
    rng = random.Random(seed)
    quick = sample_text(seed, n=3000)
    corpus = list(quick)
    for line in quick[:600]:  # the same text as the model sees it between chat markers
        corpus.append(f"user\n{line}\nassistant\n")
    # Inflected forms give BPE enough distinct words to learn a few thousand merges.
    vocab = WORDS + [w + suffix for w in WORDS for suffix in SUFFIXES if len(w) > 2]
    for _ in range(12000):
        words = rng.choices(vocab, k=rng.randint(4, 14))
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"])
        corpus.append(sentence)
    for _ in range(200):
        corpus.append(rng.choice(CODE_LINES))
        corpus.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(8)))
    corpus.append("".join(chr(c) for c in range(32, 127)))  # every printable ASCII character
    return corpus


def build_tokenizer(vocab_size: int = 3072, seed: int = 0) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Split first (digits singly), then map bytes to printable characters without a second regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS/EOS added: the template decides
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(generated_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def save(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("chat_template.jinja", "special_tokens_map.json"):
        (out / stale).unlink(missing_ok=True)
    # Keep the template inside tokenizer_config.json, where both old and new transformers read it.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    # The generic class name loads in transformers 4.x too (5.x maps it to TokenizersBackend).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # transformers 5 no longer writes special_tokens_map.json; older readers still look for it.
    special = {"eos_token": EOS, "pad_token": EOS, "additional_special_tokens": [IM_START, IM_END]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_out = Path(__file__).resolve().parents[1] / "exemplar" / "assets" / "tokenizer"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--vocab-size", type=int, default=3072)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # One training thread (read when the thread pool starts) so the files are byte-for-byte
    # reproducible whatever the machine.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    tokenizer = build_tokenizer(args.vocab_size, args.seed)
    save(tokenizer, args.out)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
