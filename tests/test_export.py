"""Export: full model and LoRA adapter folders that plain transformers/PEFT load, merging, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from exemplar.config import ModelConfig, TrainConfig
from exemplar.model import load_model, merge_adapter, save_model
from exemplar.model.loading import fit_embeddings_to_tokenizer, load_base_model, special_token_ids

LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
PROMPT = [{"role": "user", "content": "Who are you?"}]
ANSWER = "I am Exemplar."


pytestmark = pytest.mark.usefixtures("one_thread")


def prompt_ids(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)


def overfit(model, tokenizer, steps: int = 80) -> None:
    """Teach a tiny model one answer and its <|im_end|>, so generation has a stop to find."""
    ids = tokenizer.apply_chat_template(
        [*PROMPT, {"role": "assistant", "content": ANSWER}], tokenize=True, return_dict=False
    )
    batch = torch.tensor([ids])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def logits(model, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def randomize_lora(model, seed: int = 0) -> None:
    """LoRA's B starts at zero (the adapter is a no-op); make it non-trivial so merges are tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def test_full_model_export_loads_with_plain_transformers_and_stops(tokenizer, im_end, tmp_path):
    model = load_model(
        ModelConfig(from_config={**LLAMA, "vocab_size": len(tokenizer)}),
        TrainConfig(),
        tokenizer,
        device="cpu",
    )
    overfit(model, tokenizer)
    written = save_model(model, tokenizer, tmp_path, stop_token_ids=[im_end])
    folder = tmp_path / "model"
    assert written == {"model": folder}
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    # Readable by other users and services (vLLM, a serving account), like any folder made under
    # the umask; a folder made by mkdtemp would be 0700.
    umask = os.umask(0o022)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert set(loaded.generation_config.eos_token_id) == {im_end, tokenizer.eos_token_id}
    ids = prompt_ids(loaded_tokenizer)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))

    # Plain generate with the folder's own generation config stops at the end-of-turn token.
    out = loaded.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids) :].tolist()
    assert out[-1] == im_end and len(out) < 30
    assert loaded_tokenizer.decode(out, skip_special_tokens=True) == ANSWER


@pytest.fixture()
def lora_setup(tokenizer, tmp_path):
    """A base model saved in a folder, and a LoRA model on it with non-zero adapters."""
    base = load_model(
        ModelConfig(from_config={**LLAMA, "vocab_size": len(tokenizer)}),
        TrainConfig(),
        tokenizer,
        device="cpu",
    )
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    train = TrainConfig(method="lora", lora={"r": 4, "alpha": 8})
    model = load_model(ModelConfig(path=str(base_dir)), train, tokenizer, device="cpu")
    randomize_lora(model)
    return base_dir, model


def test_lora_adapter_reloads_with_plain_peft_and_merged_model_matches(
    tokenizer, im_end, lora_setup, tmp_path
):
    base_dir, model = lora_setup
    ids = prompt_ids(tokenizer)
    expected = logits(model, ids)
    written = save_model(model, tokenizer, tmp_path / "out", stop_token_ids=[im_end], merge=True)
    adapter, merged = written["adapter"], written["model"]
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir
    )

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(merged), ids), expected, atol=1e-5, rtol=0
    )
    assert not list(merged.glob("adapter_*"))

    # Merging worked on a copy: the training model still has its adapters and the same outputs.
    assert isinstance(model, PeftModel) and any("lora_A" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, ids), expected)


def test_merge_command_from_base_folder(tokenizer, im_end, lora_setup, tmp_path):
    base_dir, model = lora_setup
    ids = prompt_ids(tokenizer)
    save_model(model, tokenizer, tmp_path / "out", stop_token_ids=[im_end])
    assert not (tmp_path / "out" / "model").exists()  # merge not requested
    merged = merge_adapter(str(base_dir), tmp_path / "out" / "adapter", tmp_path / "merged")
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(merged), ids), logits(model, ids), atol=1e-5, rtol=0
    )
    assert im_end in AutoModelForCausalLM.from_pretrained(merged).generation_config.eos_token_id


@pytest.mark.parametrize("train_embeddings", [None, False])
def test_lora_with_added_tokens_and_random_base_round_trips(tokenizer, im_end, tmp_path, train_embeddings):
    # The template "added" tokens: the base vocabulary is smaller than the tokenizer, so the
    # embeddings are resized, and by default trained in full (modules_to_save) with the adapters.
    model_cfg = ModelConfig(from_config={**LLAMA, "vocab_size": len(tokenizer) - 4})
    train = TrainConfig(method="lora", seed=7, lora={"r": 4, "train_embeddings": train_embeddings})
    model = load_model(model_cfg, train, tokenizer, device="cpu")
    assert bool(model.peft_config["default"].modules_to_save) == (train_embeddings is None)
    randomize_lora(model)
    ids = prompt_ids(tokenizer) + [len(tokenizer) - 1]  # include a new token
    expected = logits(model, ids)
    written = save_model(model, tokenizer, tmp_path / "out", stop_token_ids=[im_end], merge=True)
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(written["model"]), ids), expected, atol=1e-5, rtol=0
    )

    # The same seeded random init (with the tokenizer's special ids), resized the same way.
    base = load_base_model(model_cfg, train, token_ids=special_token_ids(tokenizer))
    fit_embeddings_to_tokenizer(base, tokenizer)
    reloaded = PeftModel.from_pretrained(base, written["adapter"])
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=0)

    merged = merge_adapter(model_cfg, written["adapter"], tmp_path / "merged", seed=7)
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(merged), ids), expected, atol=1e-5, rtol=0
    )


def test_saving_replaces_an_older_folder_and_a_failed_save_keeps_it(tokenizer, im_end, tmp_path, monkeypatch):
    model = load_model(
        ModelConfig(from_config={**LLAMA, "vocab_size": len(tokenizer)}),
        TrainConfig(),
        tokenizer,
        device="cpu",
    )
    save_model(model, tokenizer, tmp_path, stop_token_ids=[im_end])
    (tmp_path / "model" / "stale.txt").write_text("from an older run")
    save_model(model, tokenizer, tmp_path, stop_token_ids=[im_end])
    assert not (tmp_path / "model" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left

    (tmp_path / "model" / "marker.txt").write_text("complete")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tokenizer, tmp_path, stop_token_ids=[im_end])
    assert (tmp_path / "model" / "marker.txt").read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
