"""`mask.reasoning: every_turn`: each trained turn becomes its own example, rendered as the last turn,
so a template that drops what earlier turns carried (their reasoning) still trains every turn."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoTokenizer

from exemplar.cli import main
from exemplar.config import load_config
from exemplar.data.schema import IGNORE_INDEX
from exemplar.quickstart import tokenizer_path
from exemplar.train.finetune import finetune
from tests.train_helpers import write_run_config

pytestmark = pytest.mark.usefixtures("one_thread")

# ChatML that shows an assistant turn in full only after the last user message, as reasoning
# templates treat reasoning (Qwen3, GLM-4.5, MiniMax-M2): earlier replies are cut to a stub.
EARLIER_REPLIES_CUT = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '\\n' -}}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last_user -%}{{- '(earlier reply)' -}}"
    "{%- else -%}{{- m.content -}}{%- endif -%}"
    "{%- for call in m.tool_calls or [] -%}{{- '<tool_call>' + call.function.name + '</tool_call>' -}}{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# The same with the reasoning field: kept after the last user message, dropped before it.
EARLIER_REASONING_DROPPED = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '\\n' -}}"
    "{%- if m.role == 'assistant' and m.reasoning_content and loop.index0 > ns.last_user -%}"
    "{{- '<think>' + m.reasoning_content + '</think>' -}}{%- endif -%}"
    "{{- m.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def conversation(i: int, reasoning: bool = False) -> dict:
    messages = []
    for turn in range(3):
        messages.append({"role": "user", "content": f"question {turn} of row {i}"})
        reply = {"role": "assistant", "content": f"answer {turn} of row {i}"}
        if reasoning:
            reply["reasoning_content"] = f"thought {turn} of row {i}"
        messages.append(reply)
    return {"messages": messages}


def write_config(tmp_path, template: str, rows: list[dict], **extra) -> str:
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "template.jinja").write_text(template)
    extra = {"chat_template": str(tmp_path / "template.jinja"), **extra}
    return str(write_run_config(tmp_path, [data], special_tokens=["<|im_start|>", "<|im_end|>"], **extra))


def preview(config: str, capsys, *overrides: str) -> list[dict]:
    sets = [arg for o in overrides for arg in ("--set", o)]
    assert main(["data", "preview", config, "--json", "--limit", "0", *sets]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def decoded(item: dict, trained: bool = True) -> str:
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    pairs = zip(item["input_ids"], item["labels"], strict=True)
    return tok.decode([t for t, lab in pairs if (lab != IGNORE_INDEX) == trained])


def test_as_rendered_trains_what_the_template_shows_of_the_whole_conversation(tmp_path, capsys):
    config = write_config(tmp_path, EARLIER_REPLIES_CUT, [conversation(0)])
    [item] = preview(config, capsys)
    assert "turn" not in item
    assert decoded(item) == "answer 2 of row 0<|im_end|>"  # the earlier replies are not shown


def test_every_turn_makes_one_example_per_turn_each_rendered_last(tmp_path, capsys):
    config = write_config(tmp_path, EARLIER_REPLIES_CUT, [conversation(0), conversation(1)])
    items = preview(config, capsys, "mask.reasoning=every_turn")
    assert [(item["index"], item["turn"]) for item in items] == [(r, t) for r in (0, 1) for t in range(3)]
    for item in items:
        row, turn = item["index"], item["turn"]
        assert decoded(item) == f"answer {turn} of row {row}<|im_end|>"
        shown = decoded(item, trained=False)
        assert f"question {turn} of row {row}" in shown and f"question {turn + 1} " not in shown


def test_every_turn_counts_examples_and_conversations_in_stats(tmp_path, capsys):
    config = write_config(tmp_path, EARLIER_REPLIES_CUT, [conversation(0), conversation(1)])
    assert main(["data", "stats", config, "--json", "--set", "mask.reasoning=every_turn"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 2 and stats["train_examples"] == 6
    assert stats["every_turn"] == {"examples": 6, "conversations": 2}
    assert main(["data", "stats", config, "--set", "mask.reasoning=every_turn"]) == 0
    out = capsys.readouterr().out
    assert (
        "chats.jsonl: 2 rows, 6 kept" in out
        and "mask.reasoning every_turn: 6 examples from 2 conversations" in out
    )
    # the cache of the default (one example per row) is a different one
    assert main(["data", "stats", config, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["train_examples"] == 2 and "every_turn" not in stats


def test_every_turn_with_last_turn_only_and_tool_calls(tmp_path, capsys):
    calls = {
        "messages": [
            {"role": "user", "content": "look it up"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "search", "arguments": {}}}],
            },
            {"role": "tool", "content": "found"},
            {"role": "assistant", "content": "done"},
        ]
    }
    config = write_config(tmp_path, EARLIER_REPLIES_CUT, [calls, conversation(1)])
    items = preview(config, capsys, "mask.reasoning=every_turn")
    assert [(item["index"], item["turn"]) for item in items] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert decoded(items[0]) == "<tool_call>search</tool_call><|im_end|>"
    assert decoded(items[1]) == "done<|im_end|>" and "found" in decoded(items[1], trained=False)
    items = preview(config, capsys, "mask.reasoning=every_turn", "mask.last_turn_only=true")
    assert [decoded(item) for item in items] == ["done<|im_end|>", "answer 2 of row 1<|im_end|>"]


def test_every_turn_trains_and_records_the_counts(tmp_path):
    config = write_config(
        tmp_path, EARLIER_REPLIES_CUT, [conversation(i) for i in range(4)], mask={"reasoning": "every_turn"}
    )
    summary = finetune(load_config(config), progress=False)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert "  mask.reasoning every_turn: 12 examples from 4 conversations" in summary["data"][0]
    stats = json.loads((tmp_path / "out" / "data_stats.json").read_text())
    assert stats["train_examples"] == 12
    assert stats["sources"][0]["every_turn"] == {"examples": 12, "conversations": 4}


def test_every_turn_trains_the_reasoning_of_every_turn(tmp_path, capsys):
    config = write_config(tmp_path, EARLIER_REASONING_DROPPED, [conversation(0, reasoning=True)])
    [whole] = preview(config, capsys)
    if "thought 2 of row 0" not in decoded(whole):
        pytest.skip("chat templates do not receive reasoning_content yet (the masks change gives it to them)")
    assert "thought 0" not in decoded(whole) + decoded(whole, trained=False)  # dropped by the template
    items = preview(config, capsys, "mask.reasoning=every_turn")
    assert [decoded(item) for item in items] == [
        f"<think>thought {t} of row 0</think>answer {t} of row 0<|im_end|>" for t in range(3)
    ]
