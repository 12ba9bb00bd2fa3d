"""`perplexity:PATH` and `ifd:PATH`: how a small local causal LM finds the answers.

- perplexity: exp(mean NLL) of the answer's tokens given the conversation before it, as the model
  sees it at inference (the prompt encoded by the training prompt encoder, then the answer text).
  Lower: the answer is what the model expects. A text record is scored as a whole.
- ifd (instruction-following difficulty, Li et al. 2024, "From Quantity to Quality"): the answer's
  perplexity with its prompt divided by its perplexity after an empty user message, so both
  score exactly the same answer tokens in the same template. Near or above 1: the prompt does
  not help predict the answer (a hard instruction, or an answer unrelated to it); well below 1:
  the prompt makes the answer easy.
NLL per example comes from `exemplar.evaluate.heldout.response_nll` (the training loss, masked to
the answer). The model runs in eval mode under no_grad: the same records give the same scores.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from exemplar.config import Config
from exemplar.curate.scorers.base import Record, Score
from exemplar.curate.scorers.parts import NothingToScore, Turn, last_turn, score_each, use_config_template
from exemplar.data.schema import IGNORE_INDEX
from exemplar.errors import ExemplarError, TemplateError

Row = tuple[list[int], list[int]]
EMPTY_PROMPT = [{"role": "user", "content": ""}]  # IFD's "without the prompt": same template, no words


class CausalLM:
    """A causal LM folder with its tokenizer (the config's chat template, if it names one)."""

    def __init__(self, path: str, config: Config | None = None, micro_batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from exemplar.data.encode import prompt_encoder

        if not Path(path).is_dir():
            raise ExemplarError(f"{path} is not a model folder (a local Hugging Face causal LM)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ExemplarError(f"cannot load a causal LM from '{path}': {e}") from None
        use_config_template(tokenizer, config, path)
        self.tokenizer = tokenizer
        self.encode_prompt = prompt_encoder(tokenizer)
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.micro_batch_size = micro_batch_size

    def answer_row(self, turn: Turn, context: list[dict[str, Any]] | None = None) -> Row:
        """(ids, labels) of the answer after `context` (default: its own), labels on the answer only."""
        answer = self.tokenizer(turn.response, add_special_tokens=False)["input_ids"]
        context = turn.context if context is None else context
        if context:
            try:
                prompt = self.encode_prompt(context, turn.tools)
            except TemplateError as e:
                raise NothingToScore(str(e)) from None
        else:  # a text record: the tokenizer's own start (BOS) if it has one, as in training
            prompt = self.tokenizer("", add_special_tokens=True)["input_ids"]
        if not prompt:  # the first answer token needs something before it to be predicted from
            prompt, answer = answer[:1], answer[1:]
        if not answer:
            raise NothingToScore("the answer is a single token: nothing to predict")
        ids = [*prompt, *answer]
        if self.max_positions and len(ids) > self.max_positions:
            raise NothingToScore(f"{len(ids)} tokens, more than the model's {self.max_positions} positions")
        return ids, [IGNORE_INDEX] * len(prompt) + answer

    def mean_nll(self, rows: list[Row]) -> list[float]:
        from exemplar.evaluate.heldout import response_nll

        scores = response_nll(self.model, self.tokenizer, rows, self.micro_batch_size)
        return [s.loss_sum / s.tokens for s in scores]


class PerplexityScorer:
    def __init__(self, path: str, name: str = "perplexity", config: Config | None = None):
        self.name = name
        self.lm = CausalLM(path, config)

    def score(self, records: list[Record]) -> list[Score]:
        return score_each(records, self._row, self._scores)

    def _row(self, record: Record) -> Row:
        return self.lm.answer_row(last_turn(record, need_prompt=False))

    def _scores(self, rows: list[Row]) -> list[Score]:
        return [
            _exp_score(nll, {"nll": nll, "tokens": sum(label != IGNORE_INDEX for label in labels)})
            for nll, (_, labels) in zip(self.lm.mean_nll(rows), rows, strict=True)
        ]


class IfdScorer:
    def __init__(self, path: str, name: str = "ifd", config: Config | None = None):
        self.name = name
        self.lm = CausalLM(path, config)

    def score(self, records: list[Record]) -> list[Score]:
        return score_each(records, self._rows, self._scores)

    def _rows(self, record: Record) -> tuple[Row, Row]:
        turn = last_turn(record)
        return self.lm.answer_row(turn), self.lm.answer_row(turn, EMPTY_PROMPT)

    def _scores(self, pairs: list[tuple[Row, Row]]) -> list[Score]:
        nlls = self.lm.mean_nll([row for pair in pairs for row in pair])
        scores = []
        for with_prompt, without in zip(nlls[0::2], nlls[1::2], strict=True):
            detail = {"nll_with_prompt": with_prompt, "nll_without_prompt": without}
            scores.append(_exp_score(with_prompt - without, detail))
        return scores


def _exp_score(log_value: float, detail: dict[str, Any]) -> Score:
    if log_value > 700:  # exp overflows: no number to write
        return Score(None, f"log value {log_value:.1f} overflows", detail)
    return Score(math.exp(log_value), detail=detail)
