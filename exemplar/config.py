"""One YAML config for everything, validated by pydantic with messages a user can act on.

Unknown keys are errors that name the key and suggest the nearest known one, because a typo
(`micro_bach_size`) that is silently ignored wastes a training run.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exemplar.errors import ConfigError

_Options = TypeVar("_Options", bound=BaseModel)


class _Strict(BaseModel):
    # No NaN or infinity in any number: `lr: .inf` or `adam_eps: .nan` is refused at load.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ModelConfig(_Strict):
    path: str | None = None  # local folder or Hub id
    from_config: str | dict[str, Any] | None = None  # config.json path or mapping with model_type
    trust_remote_code: bool = False  # run Python code shipped with a model (off: nothing from a model runs)
    allow_pickle_weights: bool = False  # load .bin (pickle) weights when a folder has no safetensors
    attn_implementation: str | None = None  # None: sdpa where supported

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.from_config is None):
            raise ValueError("set exactly one of model.path or model.from_config")
        return self


class DatasetSpec(_Strict):
    path: str  # file, folder (saved HF dataset or folder of files), or Hub dataset id
    # auto, a built-in format, or a name registered with `exemplar.register_format`.
    format: str = "auto"
    weight: float = Field(1.0, gt=0)  # examples per epoch = weight x rows (seeded subsample when < 1)
    columns: dict[str, str] = Field(default_factory=dict)  # canonical field -> field name in this file
    split: str = "train"  # for Hub ids and DatasetDict folders
    name: str | None = None  # Hub dataset config name
    file_type: Literal["auto", "json", "jsonl", "parquet", "csv", "arrow"] = "auto"

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from exemplar.data.formats import CONVERTERS  # the registry; imports this module

        if value != "auto" and value not in CONVERTERS:
            raise ValueError(
                f"unknown format '{value}'; expected auto or one of: {', '.join(CONVERTERS)} "
                "(a format of your own must be registered with exemplar.register_format first)"
            )
        return value


class DataConfig(_Strict):
    # May be empty when the rows are given in memory (exemplar.finetune(config, train_data=...)).
    train: list[DatasetSpec] = Field(default_factory=list)
    eval: list[DatasetSpec] | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1)  # held out from train when eval is not given
    num_proc: int | None = None  # preprocessing processes; None: min(cores, 8)
    cache_dir: str | None = None  # None: $EXEMPLAR_CACHE or ~/.cache/exemplar
    shuffle: bool = True
    skip_invalid: bool = False  # train on the valid rows, reporting the skipped ones (default: refuse)
    # What chat templates' `strftime_now` prints (LFM2.5 writes "Today's date" into the system
    # prompt): fixed, so masks and the cache are the same on every run. An ISO date.
    template_date: str = "2026-01-01"

    @field_validator("template_date")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"'{value}' is not an ISO date such as 2026-01-01") from None
        return value

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _single_to_list(cls, value: Any) -> Any:
        if isinstance(value, (dict, str)):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value


class MaskConfig(_Strict):
    train_roles: list[str] = Field(default_factory=lambda: ["assistant"])
    last_turn_only: bool = False  # train only the last trained-role message of each conversation
    train_on_everything: bool = False  # every token trained (prompt included)
    train_stop_token: bool = True  # the token that closes each trained turn (e.g. <|im_end|>)
    # as_rendered: each conversation is one example, rendered whole (a template may drop the
    # reasoning of earlier turns, as at inference); every_turn: each trained turn becomes its own
    # example, the conversation up to it rendered with it last, so every turn's reasoning is trained.
    reasoning: Literal["as_rendered", "every_turn"] = "as_rendered"


class LoraConfig(_Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    train_embeddings: bool | None = None  # None: only when the template added tokens


class TrainConfig(_Strict):
    method: Literal["full", "lora", "qlora"] = "full"
    micro_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_tokens_per_batch: int | None = Field(None, gt=0)  # token-budget batches instead of a count
    max_steps: int | None = Field(None, gt=0)
    epochs: float = Field(1.0, gt=0)
    lr: float | None = Field(None, gt=0)  # None: 2e-5 full, 2e-4 LoRA/QLoRA
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)  # 0 divides by zero where a second moment is 0: NaN weights
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_nonfinite_in_a_row: int = Field(5, gt=0)  # steps with a NaN/inf loss or gradient before the run stops
    seed: int = 0
    save_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    eval_every: int | None = Field(None, gt=0)
    keep_best: bool = False
    log_every: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    loss_chunk_size: int = Field(4096, gt=0)  # trained positions per cross-entropy chunk
    merge: bool = False  # write the merged model folder at the end of a LoRA run
    # Under torchrun with several ranks: auto = fsdp2 (ddp for qlora). micro_batch_size is per rank:
    # an optimizer step holds micro_batch_size x grad_accum x ranks sequences.
    distributed: Literal["auto", "fsdp2", "ddp", "none"] = "auto"
    cpu_offload_optimizer: bool = False  # FSDP2 on GPU: sharded weights, grads and AdamW state in CPU RAM
    lora: LoraConfig = Field(default_factory=LoraConfig)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-5 if self.method == "full" else 2e-4


class FilterConfig(_Strict):
    """`exemplar curate filter` rules (README "Curation" has the table); a rule set to None/[] is off."""

    placeholders: list[str] = Field(  # whole responses that are placeholders (compared normalised)
        default_factory=lambda: [
            "n/a",
            "na",
            "none",
            "null",
            "nan",
            "todo",
            "tbd",
            "...",
            "<nooutput>",
            "<noinput>",
            "[placeholder]",
            "placeholder",
            "lorem ipsum",
        ]
    )
    min_response_tokens: int | None = Field(1, ge=1)  # tokens of the assistant text (training tokenizer)
    max_tokens: int | None = Field(None, gt=0)  # tokens of all message text; None: the config's max_length
    repetition: bool = True  # the Gopher repetition rules on the response
    repetition_min_words: int = Field(50, ge=1)  # n-gram rules only from this many words (noisy below)
    refusal_patterns: list[str] | None = None  # regexes (case-insensitive); None: the built-in list
    languages: list[str] = Field(default_factory=list)  # ISO 639-1 codes to keep; empty: any language
    language_min_confidence: float = Field(0.5, ge=0, le=1)
    language_min_chars: int = Field(40, ge=1)  # shorter responses are not judged (detectors guess)
    repeats_prompt: bool = True
    invalid_characters: bool = True


class SelectOptions(_Strict):
    """`exemplar curate select` and a `select:` stage of `curate run` (curate/select.py says how)."""

    n: int = Field(gt=0)  # rows to keep
    by: Literal["diversity", "score", "score+diversity"] = "diversity"
    score: str | None = None  # the meta.scores NAME ranked by (by score, score+diversity)
    method: Literal["k-center", "clusters"] = "k-center"  # how diversity is had
    on: Literal["prompt", "response", "both"] = "prompt"  # the text embedded
    clusters: int | None = Field(None, gt=0)  # k-means clusters; None: min(n, sqrt(rows), 100)
    min_distance: float = Field(0.1, ge=0, le=2)  # Deita: cosine distance to every kept row above this
    seed: int = 0
    model: str | None = None  # a sentence-transformers folder; None: all-MiniLM-L6-v2

    @model_validator(mode="after")
    def _score_named(self) -> SelectOptions:
        if self.by != "diversity" and not self.score:
            raise ValueError(f"by: {self.by} ranks by a score: name it (score: NAME, of meta.scores.NAME)")
        return self


class FilterStage(_Strict):
    rules: FilterConfig | None = None  # the keys given replace those of curate.filter for this stage
    min_scores: dict[str, float] = Field(default_factory=dict)  # remove rows with meta.scores.NAME below
    tokenizer: str | None = None  # for the token length rules; None: the config's


class DedupStage(_Strict):
    method: Literal["exact", "minhash", "semantic"] = "exact"
    threshold: float | None = Field(None, gt=0, le=1)  # None: 0.8 minhash, 0.95 semantic
    on: Literal["prompt", "response", "both"] = "both"
    model: str | None = None  # semantic: a sentence-transformers folder


class ScoreStage(_Strict):
    scorers: list[str] = Field(min_length=1)  # specs, as `exemplar curate score --scorer`
    batch_size: int = Field(32, gt=0)


class CurateStage(_Strict):
    """One entry of curate.stages: a mapping with one key, the stage, e.g. `dedup: {method: minhash}`."""

    filter: FilterStage | None = None
    dedup: DedupStage | None = None
    score: ScoreStage | None = None
    select: SelectOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_stage(cls, value: Any) -> Any:
        if not isinstance(value, dict) or len(value) != 1:
            got = list(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(
                f"a stage is a mapping with one key, one of {', '.join(cls.model_fields)} (got {got})"
            )
        return {kind: {} if options is None else options for kind, options in value.items()}

    def kind(self) -> tuple[str, BaseModel]:
        """(the stage's name, its options)."""
        return next((k, v) for k in type(self).model_fields if (v := getattr(self, k)) is not None)


class ScoreConfig(_Strict):
    """`exemplar curate score` options (README "Scoring")."""

    rubric: str | None = None  # the judge's rubric file; None: exemplar/assets/judge_rubric.txt
    judge_max_new_tokens: int = Field(256, ge=1)  # room for the rationale and the "Score: N" line


class IterateConfig(_Strict):
    """`exemplar curate iterate`: rounds of best-of-K sampling, fine-tuning and evaluation."""

    prompts: str | None = None  # prompts to sample, any format; a reference answer goes to meta.reference
    heldout: str | None = None  # held-out conversations evaluated after every round (exemplar eval)
    out: str | None = None  # where round-1/, round-2/, ... go; None: output_dir
    scorer: str | None = None  # a scorer spec, e.g. verifier:module:function
    k: int = Field(8, ge=1)  # responses sampled per prompt
    keep: Literal["best", "all-passing", "distinct-passing"] = "best"
    min_score: float | None = 1.0  # a response passes at this score; prompts with none are left out
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    seed: int = 0  # round r samples with seed + (r - 1) * 1_000_000
    batch_size: int = Field(8, ge=1)  # prompts per model.generate call while evaluating
    train_from: Literal["current", "base"] = "current"  # fine-tune the latest model, or model.path each round


class CurateConfig(_Strict):
    filter: FilterConfig = Field(default_factory=FilterConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    out: str = "curated"  # `curate run`: stage folders OUT/01-filter, OUT/02-dedup, ... (beside the config)
    stages: list[CurateStage] = Field(default_factory=list)  # `curate run`, in order
    iterate: IterateConfig = Field(default_factory=IterateConfig)


class EvalConfig(_Strict):
    """`eval:`: `exemplar eval` on the exported model at the end of `exemplar train` (README "Evaluation").

    The same options as the command; paths are relative to the config's folder. The rows are
    `base` (default: the config's model.path, none for a model built from_config), `BASE+Kshot`
    with `few_shot`, `name` (the trained model) and any `models`. Written to OUTPUT/eval/.
    """

    data: str  # held-out conversations (any supported format); the last message is the reference
    name: str = "tuned"  # the trained model's row
    base: str | bool = True  # True: model.path as "base"; a folder or URL#served-name; False: none
    models: dict[str, str] = Field(default_factory=dict)  # more rows: NAME -> folder or URL#served-name
    general: str | None = None  # general text: NLL for forgetting
    few_shot: int = Field(0, ge=0)  # the base with K worked examples
    shots: str | None = None  # where the few-shot examples come from (default: `data`)
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0  # sampling seed (with temperature > 0)
    batch_size: int = Field(8, gt=0)  # prompts per model.generate call
    regex: str | None = None  # also score whether each response matches it
    json_schema: str | None = None  # a JSON-schema file: also score conformance
    verifier: str | None = None  # module:function, f(record, response) -> bool or number
    judge: str | None = None  # NAME=URL#served-name or NAME=FOLDER
    judge_prompt: str | None = None  # the judge's prompt template file (default: shipped)
    reference: str | None = None  # the row the judge compares against (default: the references)
    lm_eval_tasks: list[str] = Field(default_factory=list)  # lm-evaluation-harness task files (eval extra)
    lm_eval_limit: int | None = Field(None, gt=0)
    bootstrap_seed: int = 0
    device: str | None = None  # default: cuda when available

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        import re

        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return value


class Config(_Strict):
    model: ModelConfig | None = None  # data commands need only a tokenizer
    tokenizer: str | None = None  # defaults to model.path
    chat_template: str | None = None  # built-in name, Jinja file, or None for the tokenizer's own
    special_tokens: list[str] = Field(default_factory=list)  # extra special tokens to add
    data: DataConfig = Field(default_factory=DataConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    max_length: int = Field(2048, gt=1)
    truncation: Literal["drop", "truncate"] = "drop"
    packing: bool = True
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = "runs/exemplar"
    curate: CurateConfig = Field(default_factory=CurateConfig)
    eval: EvalConfig | None = None  # evaluate the exported model at the end of training

    # Where relative paths in the config are resolved from (the YAML file's folder).
    base_dir: str | None = Field(None, exclude=True)

    def resolve_path(self, path: str) -> str:
        """Resolve a path from the config relative to the config file's folder, if it exists there."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.base_dir is None:
            return str(p)
        candidate = Path(self.base_dir) / p
        return str(candidate) if candidate.exists() or not p.exists() else str(p)

    def tokenizer_source(self) -> str:
        if self.tokenizer:
            return self.resolve_path(self.tokenizer)
        if self.model is not None and self.model.path:
            return self.resolve_path(self.model.path)
        raise ConfigError("no tokenizer: set `tokenizer:` (a folder or Hub id) or `model.path`")


# ---------------------------------------------------------------------------------------------
# Loading, overrides, and error messages


def load_config(
    path: str | Path | Mapping[str, Any] | None = None, overrides: list[str] | None = None, **mapping: Any
) -> Config:
    """Load a YAML config file, or a config given as a mapping, apply `a.b=value` overrides, and validate.

    Keyword arguments set top-level keys (`load_config("run.yaml", output_dir="runs/x")`).
    Relative paths in a mapping are resolved from the working directory, in a file from its folder.
    """
    raw: dict[str, Any] = {}
    base_dir = None
    if isinstance(path, Mapping):
        raw, path = copy.deepcopy(dict(path)), None
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        raw = loaded
        base_dir = str(path.resolve().parent)
    raw.update(mapping)
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw, base_dir=base_dir, source=str(path) if path else "config")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (1, true, [a, b])."""
    if "=" not in item:
        raise ConfigError(f"--set expects dotted.key=value, got '{item}'")
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set expects dotted.key=value, got '{item}'")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a mapping")
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {key}: cannot set '{last}' inside a {type(node).__name__}")


def validate_config(raw: dict[str, Any], base_dir: str | None = None, source: str = "config") -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    config.base_dir = base_dir
    # Outputs land beside the config, like every other relative path in it.
    config.output_dir = config.resolve_path(config.output_dir)
    if config.eval is not None:  # files, models and the verifier: found now, not after training
        from exemplar.evaluate.config_section import check_eval_section

        check_eval_section(config, source)
    return config


def parse_options(options: type[_Options], source: str, **values: Any) -> _Options:
    """Command-line options checked by a config model: the same bounds and messages as in a config."""
    try:
        return options.model_validate(values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        if err["type"] == "extra_forbidden":
            parent, _, key = loc.rpartition(".")
            hint = _suggest(key, _known_keys(parent))
            lines.append(f"  unknown key '{loc}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        elif err["type"] == "missing":
            lines.append(f"  missing required key '{loc}'")
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            lines.append(f"  {loc or '(top level)'}: {err['msg']}{shown}")
    return "\n".join(lines)


def _known_keys(parent: str) -> list[str]:
    """The known keys of the model at a dotted location like 'train' or 'data.train.0'."""
    model: Any = Config
    for part in [p for p in parent.split(".") if p]:
        if part.isdigit():
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _suggest(key: str, known: list[str]) -> str | None:
    matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return matches[0] if matches else None
