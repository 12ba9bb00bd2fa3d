"""A tiny model taught a few answers (each ending with <|im_end|>), shared by the generation tests."""

from __future__ import annotations

import torch

from exemplar.config import ModelConfig, TrainConfig
from exemplar.model import load_model

LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
TAUGHT = {"Who are you?": "I am Exemplar.", "Reverse: a b c": "c b a", "Say hi": "hi"}


def taught_model(tokenizer, answers: dict[str, str] = TAUGHT, steps: int = 150) -> torch.nn.Module:
    """Greedy decoding answers the taught prompts exactly, then stops."""
    torch.manual_seed(0)
    model = load_model(
        ModelConfig(from_config={**LLAMA, "vocab_size": len(tokenizer)}),
        TrainConfig(),
        tokenizer,
        device="cpu",
    )
    rows = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            tokenize=True,
            return_dict=False,
        )
        for q, a in answers.items()
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model
