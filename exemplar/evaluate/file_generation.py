"""`exemplar generate`: answer every row of a prompts JSONL file into an output JSONL file, resumably.

Output rows are in input order, one per input row: every input field plus "response" and
"stopped" (and "responses", the K texts, with `num_samples` K > 1). They are appended and fsynced
a batch at a time, so a killed run leaves a prefix of complete rows (and at most one torn line,
which the next run cuts off). Rerunning the same command keeps that prefix, checks it still
matches the input, and generates only the rows after it.

A row that still fails (an HTTP error after every retry, a conversation the chat template cannot
render) is never written as an empty response: it goes to OUT.failed.jsonl ({"line", "error",
"row"}), the rows after it wait, so that row i of the output is always row i of the input, and a
rerun retries it. With the HTTP backend's cache the rows after a failure are still answered and
kept, so the rerun does not ask again; without one, the run stops after the batch that failed.

Seeds: sample j of input row r (0-based) is drawn with seed `seed + r*K + j`, so every response
has its own seed and a rerun draws the same ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exemplar.errors import DataError, RowError
from exemplar.evaluate.generator import GenerationRequest, GenerationResult, Generator
from exemplar.fsio import atomic_write_text, fsync_dir

ADDED_FIELDS = ("response", "stopped", "responses")


@dataclass
class FileReport:
    """What one `generate_file` run did. `complete` is false while rows are missing (see `failed`)."""

    output: Path
    rows: int
    written: int
    kept: int
    failed: list[dict[str, Any]] = field(default_factory=list)
    failures_path: Path | None = None
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.written == self.rows


def generate_file(
    model: str | Path | Generator,
    input_jsonl: str | Path,
    output_jsonl: str | Path,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    system: str | None = None,
    *,
    num_samples: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> FileReport:
    """Answer each row of `input_jsonl` into `output_jsonl` with `model` (a `Generator`, or a model
    folder for the local backend); resume where an earlier run of the same command stopped.

    Input rows are {"prompt": str} or {"messages": [...]}; trailing assistant messages are cut
    from the prompt, so a held-out file with reference answers can be used as is.
    """
    output = Path(output_jsonl)
    numbered = read_numbered_prompt_rows(input_jsonl)
    kept = resume_output(output, [row for _, row in numbered], num_samples)
    failures_path = failures_path_of(output)
    report = FileReport(output, len(numbered), kept, kept, failures_path=failures_path)
    if kept < len(numbered):
        generator = model if isinstance(model, Generator) else _local(model, device, batch_size)
        try:
            _generate_rest(
                generator,
                numbered,
                output,
                report,
                num_samples,
                progress,
                system,
                seed,
                dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p),
            )
        finally:
            report.stats = generator.stats.as_dict()
            if generator is not model:
                generator.close()
    if report.failed:
        lines = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in report.failed)
        atomic_write_text(failures_path, lines)
    else:
        failures_path.unlink(missing_ok=True)
        report.failures_path = None
    return report


def _generate_rest(
    generator: Generator,
    numbered: list[tuple[int, dict[str, Any]]],
    output: Path,
    report: FileReport,
    num_samples: int,
    progress: Callable[[int, int], None] | None,
    system: str | None,
    seed: int,
    sampling: dict[str, Any],
) -> None:
    chunk = max(1, generator.preferred_batch)
    blocked = False  # after a failed row nothing more is written: output row i stays input row i
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a", encoding="utf-8") as f:
        fsync_dir(output.parent)  # a new output file's name survives a power cut too
        for start in range(report.kept, len(numbered), chunk):
            if blocked and not generator.remembers_answers:
                break  # answers that can neither be written nor kept would be generated again anyway
            part = numbered[start : start + chunk]
            requests = [
                GenerationRequest(
                    prompt_messages(row, system), n=num_samples, seed=seed + index * num_samples, **sampling
                )
                for index, (_, row) in enumerate(part, start=start)
            ]
            for (line, row), result in zip(part, generator.generate(requests), strict=True):
                if not result.ok:
                    report.failed.append({"line": line, "error": result.error, "row": row})
                    blocked = True
                elif not blocked:
                    f.write(json.dumps(output_row(row, result, num_samples), ensure_ascii=False) + "\n")
                    report.written += 1
            f.flush()
            os.fsync(f.fileno())
            if progress:
                progress(report.written, report.rows)


def output_row(row: dict[str, Any], result: GenerationResult, num_samples: int) -> dict[str, Any]:
    out = {**row, "response": result.text, "stopped": result.stopped}
    if num_samples > 1:
        out["responses"] = result.texts
    return out


def failures_path_of(output: str | Path) -> Path:
    """OUT.failed.jsonl beside OUT.jsonl: the rows that still failed, with their errors."""
    output = Path(output)
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".failed.jsonl")


def resume_output(output: Path, rows: list[dict[str, Any]], num_samples: int) -> int:
    """How many rows of `output` an earlier run completed; cut a torn last line off the file.

    Every kept line must be the output of the input row at its position, so a changed input file
    or a different --num-samples is an error rather than a silently mixed output.
    """
    if not output.is_file():
        return 0
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):  # a line cut by a kill: its row is generated again
        with output.open("r+b") as f:
            f.truncate(len(complete))
            os.fsync(f.fileno())
    lines = complete.decode("utf-8").splitlines()
    if len(lines) > len(rows):
        raise DataError(
            f"{output} has {len(lines)} rows but the input has {len(rows)}: not an output of this input"
        )
    for number, (line, row) in enumerate(zip(lines, rows, strict=False), start=1):
        _check_kept_row(output, number, line, row, num_samples)
    return len(lines)


def _check_kept_row(output: Path, number: int, line: str, row: dict[str, Any], num_samples: int) -> None:
    try:
        out = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError(
            str(output), f"line {number}", None, f"not valid JSON ({e}); delete the file to start over"
        ) from None
    inputs = {k: v for k, v in out.items() if k not in ADDED_FIELDS} if isinstance(out, dict) else None
    if inputs != {k: v for k, v in row.items() if k not in ADDED_FIELDS} or "response" not in out:
        raise RowError(
            str(output),
            f"line {number}",
            None,
            f"does not match input row {number} (was the input changed?); delete the output to start over",
        )
    if num_samples > 1 and len(out.get("responses") or []) != num_samples:
        raise RowError(
            str(output),
            f"line {number}",
            "responses",
            f"written with a different --num-samples than {num_samples}; delete the output to start over",
        )


def read_prompt_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a prompts JSONL file, each checked to have a usable "prompt" or "messages" field."""
    return [row for _, row in read_numbered_prompt_rows(path)]


def read_numbered_prompt_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line of a prompts JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RowError(str(path), f"line {number}", None, f"not valid JSON: {e}") from None
            _check_prompt_row(row, str(path), number)
            rows.append((number, row))
    return rows


def prompt_messages(row: dict[str, Any], system: str | None = None) -> list[dict[str, Any]]:
    """The conversation to answer: {"prompt"} becomes one user turn; trailing assistant turns are cut."""
    if "messages" in row:
        messages = list(row["messages"])
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
    else:
        messages = [{"role": "user", "content": row["prompt"]}]
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _check_prompt_row(row: Any, file: str, number: int) -> None:
    where = f"line {number}"
    if not isinstance(row, dict):
        raise RowError(file, where, None, "expected a JSON object with 'prompt' or 'messages'")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise RowError(file, where, "messages", "expected a list of {role, content} objects")
        if not any(m.get("role") != "assistant" for m in messages):
            raise RowError(file, where, "messages", "no prompt left after removing the assistant answer")
    elif "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise RowError(file, where, "prompt", "expected a string")
    else:
        raise RowError(file, where, None, "expected a 'prompt' or a 'messages' field")


def _local(model_dir: str | Path, device: str | None, batch_size: int) -> Generator:
    from exemplar.evaluate.local import LocalGenerator

    return LocalGenerator.from_folder(model_dir, device=device, batch_size=batch_size)
