"""`reward:PATH`: a local Hugging Face sequence-classification model with one output, the reward.

The scored text is the whole conversation up to and including the last assistant answer,
rendered by the tokenizer's chat template (or the config's `chat_template`) and tokenized as
`apply_chat_template` does. Each record is its own forward pass: no padding, so a record's reward
does not depend on which records share its batch. Eval mode, no_grad: deterministic.
"""

from __future__ import annotations

from pathlib import Path

from exemplar.config import Config
from exemplar.curate.scorers.base import Record, Score
from exemplar.curate.scorers.parts import NothingToScore, last_turn, score_each, use_config_template
from exemplar.errors import ExemplarError, TemplateError


class RewardScorer:
    def __init__(self, path: str, name: str = "reward", config: Config | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise ExemplarError(f"{path} is not a model folder (a local sequence-classification model)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ExemplarError(f"cannot load a reward model from '{path}': {e}") from None
        if model.config.num_labels != 1:
            raise ExemplarError(
                f"{path}: a reward model has one output (num_labels 1), this one has {model.config.num_labels}"
            )
        use_config_template(self.tokenizer, config, path)
        if not self.tokenizer.chat_template:
            raise TemplateError(
                f"{path}: the tokenizer has no chat template; set chat_template in a --config"
            )
        self.name = name
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def score(self, records: list[Record]) -> list[Score]:
        return score_each(records, self._ids, self._rewards)

    def _ids(self, record: Record) -> list[int]:
        turn = last_turn(record, need_prompt=False)
        if not turn.context:
            raise NothingToScore("not a conversation (a reward model scores a templated conversation)")
        messages = [*turn.context, turn.answer]
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tools=turn.tools, tokenize=True, return_dict=False
            )
        except Exception as e:  # a template that rejects this conversation (jinja raises many kinds)
            raise NothingToScore(f"the chat template failed on this conversation: {e}") from None
        if self.max_positions and len(ids) > self.max_positions:
            raise NothingToScore(f"{len(ids)} tokens, more than the model's {self.max_positions} positions")
        return ids

    def _rewards(self, rows: list[list[int]]) -> list[Score]:
        import torch

        device = next(self.model.parameters()).device
        with torch.no_grad():
            return [
                Score(float(self.model(input_ids=torch.tensor([ids], device=device)).logits[0, 0]))
                for ids in rows
            ]
