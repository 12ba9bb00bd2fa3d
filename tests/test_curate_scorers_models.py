"""The model-based scorers on small local models: reward, IFD and perplexity, relevance."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from exemplar.config import load_config
from exemplar.curate.scorers import make_scorer
from exemplar.errors import ExemplarError
from tests.generation_helpers import TAUGHT
from tests.scorer_helpers import conversation, reward_model_dir, taught_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [
    conversation("Who are you?", "I am Exemplar.", 1),
    conversation("Reverse: a b c", "c b a", 2, system="Be brief."),
    conversation("Say hi", "hi there, how are you doing today?", 3),
]


@pytest.fixture(scope="module")
def taught_dir(tokenizer, tmp_path_factory):
    return taught_model_dir(tokenizer, TAUGHT, tmp_path_factory.mktemp("taught") / "run")


@functools.cache
def _reward_model(folder):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


def _forward_reward(folder, ids):
    """The reward by a plain forward pass of the saved model."""
    model = _reward_model(folder)
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_reward_is_the_models_output_on_the_templated_conversation(kind, tokenizer, tmp_path):
    folder = reward_model_dir(kind, tokenizer, tmp_path / kind)
    scorer = make_scorer(f"reward:{folder}")
    scores = scorer.score(RECORDS)
    for record, score in zip(RECORDS, scores, strict=True):
        ids = tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=False)
        assert score.error is None and score.value == pytest.approx(_forward_reward(folder, ids), abs=1e-5)
    assert len({s.value for s in scores}) == 3  # different conversations, different rewards
    assert [s.value for s in scorer.score(RECORDS[::-1])] == [s.value for s in scores][::-1]  # batch-free


def test_reward_with_the_configs_template_and_bad_rows(tokenizer, tmp_path):
    folder = reward_model_dir("llama", tokenizer, tmp_path / "rm")
    config = load_config({"chat_template": "zephyr", "tokenizer": str(folder)})
    text_record = {"text": "just text", "meta": {}}
    no_answer = {"messages": [{"role": "user", "content": "hello?"}]}
    good, text_score, missing = make_scorer(f"rm=reward:{folder}", config).score(
        [RECORDS[0], text_record, no_answer]
    )
    zephyr = (
        "<|user|>\nWho are you?<|endoftext|>\n<|assistant|>\nI am Exemplar.<|endoftext|>\n"  # EOS ends turns
    )
    assert tokenizer.decode(tokenizer(zephyr, add_special_tokens=False)["input_ids"]) == zephyr
    expected = _forward_reward(folder, tokenizer(zephyr, add_special_tokens=False)["input_ids"])
    assert good.value == pytest.approx(expected, abs=1e-5)
    assert text_score.value is None and "not a conversation" in text_score.error
    assert missing.value is None and missing.error == "no assistant message to score"


def test_a_reward_model_needs_one_output(tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tests.scorer_helpers import SMALL

    config = AutoConfig.for_model("llama", **SMALL, vocab_size=len(tokenizer), num_labels=3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "three")
    tokenizer.save_pretrained(tmp_path / "three")
    with pytest.raises(ExemplarError, match="one output .num_labels 1., this one has 3"):
        make_scorer(f"reward:{tmp_path / 'three'}")
    with pytest.raises(ExemplarError, match="is not a model folder"):
        make_scorer(f"reward:{tmp_path / 'none'}")


def test_a_template_with_tokens_the_model_lacks_is_refused(taught_dir):
    config = load_config({"chat_template": "llama3", "tokenizer": str(taught_dir)})
    with pytest.raises(
        ExemplarError, match="needs tokens the model was not trained with .*<\\|start_header_id\\|>"
    ):
        make_scorer(f"perplexity:{taught_dir}", config)


def _answer_nll(model, tokenizer, context, answer):
    """Mean NLL of `answer`'s tokens after the generation prompt of `context`, by a plain forward."""
    prompt = tokenizer.apply_chat_template(
        context, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return float(torch.nn.functional.cross_entropy(logits.double(), torch.tensor(answer_ids)))


def test_ifd_and_perplexity_match_a_plain_forward_and_rank_a_taught_answer(taught_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    records = [conversation("Reverse: a b c", "c b a", 1), conversation("Who are you?", "c b a", 2)]
    ifd = make_scorer(f"ifd:{taught_dir}").score(records)
    ppl = make_scorer(f"perplexity:{taught_dir}").score(records)
    model = AutoModelForCausalLM.from_pretrained(taught_dir).eval()
    for record, i, p in zip(records, ifd, ppl, strict=True):
        context = record["messages"][:1]
        with_prompt = _answer_nll(model, tokenizer, context, "c b a")
        without = _answer_nll(model, tokenizer, [{"role": "user", "content": ""}], "c b a")
        assert p.value == pytest.approx(math.exp(with_prompt), rel=1e-4)
        assert i.value == pytest.approx(math.exp(with_prompt - without), rel=1e-4)
        assert i.detail["nll_without_prompt"] == pytest.approx(without, rel=1e-4)
    # the taught prompt makes its answer easy; another prompt does not
    # (measured: IFD 0.02 against 0.21, perplexity 1.003 against 9.5)
    assert 5 * ifd[0].value < ifd[1].value and ppl[0].value < 1.1 < 2 < ppl[1].value


def test_perplexity_of_text_records_and_errors(taught_dir):
    text = {"text": "I am Exemplar.", "meta": {}}
    scores = make_scorer(f"ppl=perplexity:{taught_dir}").score([text, {"messages": [], "meta": {}}])
    assert scores[0].error is None and scores[0].value > 1 and scores[0].detail["tokens"] >= 2
    assert scores[1].error == "no assistant message to score"
    (no_prompt,) = make_scorer(f"ifd:{taught_dir}").score([text])
    assert no_prompt.value is None and "not a conversation" in no_prompt.error


def test_relevance_ranks_an_on_topic_answer_above_an_off_topic_one():
    pytest.importorskip("sentence_transformers")
    question = "How do I boil an egg?"
    records = [
        conversation(question, "Put the egg in boiling water for about nine minutes, then cool it.", 1),
        conversation(question, "The stock market closed higher on Tuesday after bank earnings.", 2),
    ]
    on_topic, off_topic = make_scorer("relevance").score(records)
    assert -1 <= off_topic.value < on_topic.value <= 1 and on_topic.value > 0.5


def test_reward_on_real_tool_call_conversations(tokenizer, tmp_path, shared_data):
    from exemplar.curate.io import read_inputs

    records = list(read_inputs([str(shared_data / "glaive_toolcall_en_demo.json")]))[:4]
    assert sum(bool(r.get("tools")) for r in records) == 2  # rows 1 and 4 call tools; 2 and 3 do not
    folder = reward_model_dir("qwen2", tokenizer, tmp_path / "rm")
    scores = make_scorer(f"reward:{folder}").score(records)
    for record, score in zip(records, scores, strict=True):
        ids = tokenizer.apply_chat_template(
            record["messages"], tools=record.get("tools"), tokenize=True, return_dict=False
        )
        assert score.value == pytest.approx(_forward_reward(folder, ids), abs=1e-5)
