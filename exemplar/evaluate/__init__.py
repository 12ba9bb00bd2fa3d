"""Generation (one `Generator` interface, a local and an OpenAI-compatible HTTP backend), interactive
chat, and simple metrics for trained models."""

from exemplar.evaluate.chat import chat_loop
from exemplar.evaluate.file_generation import FileReport, generate_file, read_prompt_rows
from exemplar.evaluate.generation import default_encode_prompt, generate_batch
from exemplar.evaluate.generator import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    Generator,
    GeneratorStats,
    Sample,
)
from exemplar.evaluate.http_generator import HttpGenerator
from exemplar.evaluate.likelihood import evaluate_rows as evaluate_rows
from exemplar.evaluate.local import LocalGenerator
from exemplar.evaluate.metrics import exact_match, stop_rate
from exemplar.evaluate.response_cache import ResponseCache

__all__ = [
    "FileReport",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "GeneratorStats",
    "HttpGenerator",
    "LocalGenerator",
    "ResponseCache",
    "Sample",
    "chat_loop",
    "default_encode_prompt",
    "exact_match",
    "generate_batch",
    "generate_file",
    "read_prompt_rows",
    "stop_rate",
]
