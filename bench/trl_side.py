"""TRL's side of the benchmark (SFTTrainer), run in its own process.

    python bench/trl_side.py train WORKDIR --steps 20 --precision fp32
    python bench/trl_side.py prep WORKDIR --num-proc 1

The rows are the same single-turn chats Exemplar trains on, given to TRL in its conversational
prompt/completion format with `completion_only_loss=True`: TRL refuses `assistant_only_loss` for a
template without `{% generation %}` tags, and for single-turn data the completion is exactly the
assistant turn. Packing is TRL's default `bfd` strategy, which turns on its padding-free batches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common


def _dataset(workdir: Path, data_file: str):
    from datasets import Dataset

    rows = json.loads((workdir / data_file).read_text(encoding="utf-8"))
    return Dataset.from_list([common.prompt_completion(r) for r in rows])


def _sft_config(workdir: Path, steps: int, precision: str, num_proc: int | None, tag: str):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(workdir / "runs" / f"trl-{tag}"),
        max_steps=steps,
        per_device_train_batch_size=common.SEQS_PER_STEP,
        gradient_accumulation_steps=1,
        learning_rate=common.LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=common.SEED,
        bf16=precision == "bf16",
        fp16=False,
        gradient_checkpointing=False,
        packing=True,
        packing_strategy="bfd",
        max_length=common.MAX_LENGTH,
        completion_only_loss=True,
        dataset_num_proc=num_proc,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=common.DEVICE == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _model(workdir: Path, dtype: str = "fp32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(workdir / "model"),
        dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
        attn_implementation="sdpa",
    )


def _lora_config():
    """Exemplar's LoRA defaults (train.lora): r 16, alpha 32, no dropout, every linear layer."""
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


class BatchCounter:
    """Counts what the batches that reach the loss hold: real tokens, trained tokens, documents."""

    def __init__(self):
        self.tokens = self.trained = self.doc_sq_sum = 0

    def add(self, inputs) -> None:
        labels = inputs["labels"]
        if "attention_mask" in inputs:
            self.tokens += int(inputs["attention_mask"].sum())
            lengths = inputs["attention_mask"].sum(dim=1).tolist()
        else:  # padding-free: one row of real tokens, documents start where position ids restart
            position_ids = inputs["position_ids"][0]
            self.tokens += int(position_ids.numel())
            starts = (position_ids == 0).nonzero().flatten().tolist() + [position_ids.numel()]
            lengths = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        self.doc_sq_sum += sum(n * n for n in lengths)
        self.trained += int((labels[:, 1:] != -100).sum())


def train(workdir: Path, steps: int, precision: str, method: str = "full") -> dict:
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin = self.end = None
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    counter = BatchCounter()

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                counter.add(inputs)
            return super().compute_loss(model, inputs, *args, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "tokenizer"))
    dataset = _dataset(workdir, "train.json")
    timer = Timer()
    # LoRA: the frozen base in bf16 under bf16 training, as Exemplar stores it (full: fp32 masters).
    lora = method == "lora"
    trainer = CountingSFTTrainer(
        model=_model(workdir, precision if lora else "fp32"),
        args=_sft_config(workdir, steps, precision, None, f"{method}-{precision}"),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
        **({"peft_config": _lora_config()} if lora else {}),
    )
    trainer.train()
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    return {
        "tool": "trl",
        "precision": precision,
        "method": method,
        "steps": trainer.state.global_step,
        "wall_s": timer.end - timer.begin,
        "tokens": counter.tokens,
        "trained": counter.trained,
        "doc_sq_sum": counter.doc_sq_sum,
        "losses": timer.losses,
        "fill_ratio": sum(lengths) / (len(lengths) * common.MAX_LENGTH),
        "peak_rss_mb": common.peak_rss_mb(),
        **common.peak_gpu(),
        "load": common.loadavg(),
    }


def prep(workdir: Path, num_proc: int) -> dict:
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    class TimedSFTTrainer(SFTTrainer):
        """Times TRL's dataset preparation (tokenize, build labels, pack) inside its own __init__."""

        prep_seconds = 0.0

        def _prepare_dataset(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._prepare_dataset(*args, **kwargs)
            finally:
                TimedSFTTrainer.prep_seconds += time.perf_counter() - start

    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "tokenizer"))
    model = _model(workdir)
    start = time.perf_counter()
    dataset = _dataset(workdir, "prep.json")  # the rows as TRL wants them: counted, like Exemplar's reading
    convert = time.perf_counter() - start
    trainer = TimedSFTTrainer(
        model=model,
        args=_sft_config(workdir, 1, "fp32", num_proc if num_proc > 1 else None, "prep"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    packed = trainer.train_dataset
    lengths = [len(x) for x in packed["input_ids"]]
    return {
        "tool": "trl",
        "num_proc": num_proc,
        "rows": len(dataset),
        "kept": int(sum(len(s) for s in packed["seq_lengths"]))
        if "seq_lengths" in packed.column_names
        else None,
        "seconds": convert + TimedSFTTrainer.prep_seconds,
        "bins": len(lengths),
        "fill_ratio": sum(lengths) / (len(lengths) * common.MAX_LENGTH),
        "peak_rss_mb": common.peak_rss_mb(),
        "load": common.loadavg(),
    }


def main() -> None:
    parser = common.side_parser()
    args = common.parse_side_args(parser)
    if args.what == "train":
        common.emit(train(args.workdir, args.steps, args.precision, args.method))
    else:
        common.emit(prep(args.workdir, args.num_proc))


if __name__ == "__main__":
    main()
