"""Preference rows (DPO data: `chosen` / `rejected`) are their own format: SFT trains on the prompt +
`chosen` reply, `rejected` is ignored, and validate / stats / preview say so. Before, such rows
were read as ShareGPT and trained on the prompt's turns, never on the chosen reply."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from exemplar.cli import main
from exemplar.config import load_config
from exemplar.data.formats import FORMAT_NOTES, detect_format, to_example
from exemplar.data.schema import IGNORE_INDEX, SourceRow
from exemplar.errors import RowError
from exemplar.quickstart import tokenizer_path
from exemplar.train.finetune import finetune
from tests.train_helpers import write_run_config

pytestmark = pytest.mark.usefixtures("one_thread")

NOTE = "preference rows: training on `chosen`, `rejected` ignored"


def convert(row: dict, columns: dict | None = None):
    return to_example(SourceRow("dpo.jsonl", "line 2", 1, row), "auto", columns)


def turns(row: dict, columns: dict | None = None) -> list[tuple[str, str, bool | None]]:
    return [(m.role, m.content, m.train) for m in convert(row, columns).messages]


def error(row: dict) -> RowError:
    with pytest.raises(RowError) as e:
        convert(row)
    return e.value


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


HH_CHOSEN = (
    "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: An apple."
)
HH_REJECTED = (
    "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: A brick."
)

SHAPES = {
    "trl_explicit_strings": (
        {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A brick."},
        [("user", "Name a fruit.", False), ("assistant", "An apple.", None)],
    ),
    "trl_explicit_messages": (
        {
            "prompt": [msg("system", "Be brief."), msg("user", "Name a fruit.")],
            "chosen": [msg("assistant", "An apple.")],
            "rejected": [msg("assistant", "A brick.")],
        },
        [("system", "Be brief.", False), ("user", "Name a fruit.", False), ("assistant", "An apple.", None)],
    ),
    "ultrafeedback_implicit": (
        {
            "prompt": "Name a fruit.",
            "chosen": [msg("user", "Name a fruit."), msg("assistant", "An apple.")],
            "rejected": [msg("user", "Name a fruit."), msg("assistant", "A brick.")],
            "messages": [msg("user", "Name a fruit."), msg("assistant", "An apple.")],
            "score_chosen": 9.0,
        },
        [("user", "Name a fruit.", False), ("assistant", "An apple.", None)],
    ),
    "hh_rlhf": (
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        [
            ("user", "Hi there", False),
            ("assistant", "Hello! How can I help?", False),
            ("user", "Name a fruit.", False),
            ("assistant", "An apple.", None),
        ],
    ),
    "hh_prompt_trl_style": (
        {"prompt": "\n\nHuman: Name a fruit.\n\nAssistant:", "chosen": " An apple.", "rejected": " A brick."},
        [("user", "Name a fruit.", False), ("assistant", "An apple.", None)],
    ),
    "orca_dpo_pairs": (
        {"system": "Be brief.", "question": "Name a fruit.", "chosen": "An apple.", "rejected": "A brick."},
        [("system", "Be brief.", False), ("user", "Name a fruit.", False), ("assistant", "An apple.", None)],
    ),
    "llamafactory_alpaca_ranking": (
        {"instruction": "Name a fruit", "input": "red", "chosen": "An apple.", "rejected": "A brick."},
        [("user", "Name a fruit\n\nred", False), ("assistant", "An apple.", None)],
    ),
    "llamafactory_sharegpt_ranking": (
        {
            "conversations": [{"from": "human", "value": "Name a fruit."}],
            "chosen": {"from": "gpt", "value": "An apple."},
            "rejected": {"from": "gpt", "value": "A brick."},
        },
        [("user", "Name a fruit.", False), ("assistant", "An apple.", None)],
    ),
    "llamafactory_v1": (
        {
            "chosen_messages": [
                {"role": "user", "content": [{"type": "text", "value": "Name a fruit."}], "loss_weight": 0.0},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "value": "An apple."}],
                    "loss_weight": 1.0,
                },
            ],
            "rejected_messages": [
                {"role": "user", "content": [{"type": "text", "value": "Name a fruit."}], "loss_weight": 0.0},
                {"role": "assistant", "content": [{"type": "text", "value": "A brick."}], "loss_weight": 1.0},
            ],
        },
        [("user", "Name a fruit.", False), ("assistant", "An apple.", True)],
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_dpo_shape_is_detected_and_trains_on_chosen(shape):
    row, expected = SHAPES[shape]
    assert detect_format(row) == "preference"
    assert turns(row) == expected
    assert "brick" not in json.dumps([m.content for m in convert(row).messages])


def test_renamed_fields_and_a_partial_row():
    row = {"q": "Name a fruit.", "good": "An apple.", "bad": "A brick."}
    columns = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    assert detect_format(row, columns) == "preference"
    assert turns(row, columns) == [("user", "Name a fruit.", False), ("assistant", "An apple.", None)]
    assert detect_format({"prompt": "p", "chosen": "c"}) == "preference"
    e = error({"prompt": "p", "chosen": "c"})
    assert e.field == "rejected" and "missing required field 'rejected'" in e.message


@pytest.mark.parametrize(
    ("row", "field", "says"),
    [
        (
            {
                "chosen": [msg("user", "q"), msg("assistant", "a")],
                "rejected": [msg("user", "q"), msg("assistant", "a")],
            },
            "chosen",
            "chosen has no reply of its own: every message of it is also in rejected",
        ),
        (
            {"chosen": "An apple.", "rejected": "A brick."},
            "chosen",
            "chosen is a string but the row has no prompt",
        ),
        (
            {"prompt": [msg("user", "q")], "chosen": "a", "rejected": "b"},
            "chosen",
            "chosen is a string but prompt is a list of messages",
        ),
        (
            {"prompt": [msg("user", "q")], "chosen": [msg("user", "again")], "rejected": []},
            "chosen[0]",
            "its messages must be assistant (or tool), not 'user'",
        ),
        ({"prompt": "q", "chosen": "   ", "rejected": "b"}, "chosen", "chosen is empty"),
        (
            {
                "chosen": [msg("user", "q"), {"role": "assistant", "content": 3}],
                "rejected": [msg("user", "q")],
            },
            "chosen[1].content",
            "got a number (3)",
        ),
    ],
)
def test_bad_preference_rows_name_the_field(row, field, says):
    e = error(row)
    assert e.field == field and says in e.message
    assert str(e).startswith(f"dpo.jsonl, line 2, field '{field}'")


WORDS = st.text(alphabet="abcdefgh ", min_size=1, max_size=6).filter(str.strip)


@given(st.lists(st.tuples(WORDS, WORDS), max_size=3), WORDS, WORDS, WORDS)
def test_property_the_shared_turns_are_the_prompt(history, question, good, bad):
    """Whole conversations: what chosen and rejected share is the untrained prompt; the rest of
    chosen is the reply."""
    shared = [m for q, a in history for m in (msg("user", q), msg("assistant", a))] + [msg("user", question)]
    row = {
        "chosen": shared + [msg("assistant", good)],
        "rejected": shared + [msg("assistant", good + "!" + bad)],
    }
    got = turns(row)
    assert got == [(m["role"], m["content"], False) for m in shared] + [("assistant", good, None)]


# -- through the CLI, as a user runs it -----------------------------------------------------------


def dpo_rows(n: int = 8) -> list[dict]:
    """LLaMA-Factory's ShareGPT ranking shape (its dpo_en_demo): the shape that was read as
    ShareGPT before, training the question and not the chosen answer."""
    return [
        {
            "conversations": [{"from": "human", "value": f"Spell the number {i} in words."}],
            "chosen": {"from": "gpt", "value": f"GOOD answer {i}"},
            "rejected": {"from": "gpt", "value": f"REJECTED answer {i}"},
        }
        for i in range(n)
    ]


@pytest.fixture
def dpo_config(tmp_path):
    data = tmp_path / "dpo_en_demo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in dpo_rows()), encoding="utf-8")
    return write_run_config(tmp_path, [data], max_length=128)


def test_regression_dpo_rows_train_on_the_chosen_reply_not_the_prompt(dpo_config, capsys):
    assert main(["data", "preview", str(dpo_config), "--json", "--limit", "0"]) == 0
    items = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    assert [item["index"] for item in items] == list(range(8))
    for i, item in enumerate(items):
        assert item["format"] == "preference"
        ids, labels = item["input_ids"], item["labels"]
        trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
        assert trained == f"GOOD answer {i}<|im_end|>"
        assert "REJECTED" not in tok.decode(ids) and f"number {i}" in tok.decode(ids)


def test_validate_and_stats_say_chosen_is_trained_and_rejected_ignored(dpo_config, capsys):
    assert FORMAT_NOTES["preference"] == NOTE
    assert main(["data", "validate", str(dpo_config)]) == 0
    out = capsys.readouterr().out
    assert (
        f"dpo_en_demo.jsonl: format preference ({NOTE})" in out and "8 rows in 1 file(s) checked: ok" in out
    )
    assert main(["data", "stats", str(dpo_config)]) == 0
    assert f"  format: preference ({NOTE})" in capsys.readouterr().out
    assert main(["data", "stats", str(dpo_config), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert list(stats["formats"].values()) == ["preference"] and stats["train_examples"] == 8


def test_preference_rows_train_a_tiny_model(dpo_config, tmp_path):
    summary = finetune(load_config(dpo_config), progress=False)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert f"  format: preference ({NOTE})" in summary["data"][0]
    stats = json.loads((tmp_path / "out" / "data_stats.json").read_text())
    assert list(stats["sources"][0]["formats"].values()) == ["preference"]


def test_convert_writes_the_sft_conversation_of_each_preference_row(dpo_config, tmp_path, capsys):
    out = tmp_path / "records.jsonl"
    assert main(["data", "convert", str(dpo_config), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 8 and "REJECTED" not in out.read_text(encoding="utf-8")
    assert records[3]["messages"] == [
        {"role": "user", "content": "Spell the number 3 in words.", "train": False},
        {"role": "assistant", "content": "GOOD answer 3"},
    ]
