"""Generation, interactive chat, and simple metrics for trained models."""

from exemplar.evaluate.chat import chat_loop
from exemplar.evaluate.generation import default_encode_prompt, generate_batch, generate_file
from exemplar.evaluate.likelihood import evaluate_rows as evaluate_rows
from exemplar.evaluate.metrics import exact_match, stop_rate

__all__ = [
    "chat_loop",
    "default_encode_prompt",
    "exact_match",
    "generate_batch",
    "generate_file",
    "stop_rate",
]
