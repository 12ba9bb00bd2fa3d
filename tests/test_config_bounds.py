"""Options that cannot train are refused when the config loads, naming the key and the bound."""

from __future__ import annotations

import pytest

from exemplar.config import load_config
from exemplar.errors import ConfigError


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.adam_eps=0", "train.adam_eps: Input should be greater than 0"),
        ("train.adam_beta2=1", "train.adam_beta2: Input should be less than 1"),
        ("train.lr=.inf", "train.lr: Input should be a finite number"),
        ("train.weight_decay=.nan", "train.weight_decay: Input should be a finite number"),
    ],
)
def test_options_that_cannot_train_are_refused_at_load_with_the_bound(tmp_path, override, message):
    (tmp_path / "config.yaml").write_text("data: {train: [{path: rows.jsonl}]}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "config.yaml", [override])
