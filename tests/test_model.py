"""Model loading (five architectures, three sources), tokenizer fitting, LoRA wrapping, QLoRA checks."""

from __future__ import annotations

import json

import pytest
import torch

from exemplar.config import ModelConfig, TrainConfig
from exemplar.errors import ConfigError, ExemplarError
from exemplar.model import check_method_supported, load_model
from exemplar.model.lora import embedding_module_names, embeddings_tied

_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_CONFIGS = {
    "llama": {"model_type": "llama", **_SMALL, "num_key_value_heads": 1},
    "qwen2": {"model_type": "qwen2", **_SMALL, "num_key_value_heads": 1},
    "mistral": {"model_type": "mistral", **_SMALL, "num_key_value_heads": 1, "sliding_window": None},
    "gemma": {"model_type": "gemma", **_SMALL, "num_key_value_heads": 1, "head_dim": 16},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(arch: str, vocab: int, **extra) -> dict:
    return {**TINY_CONFIGS[arch], "vocab_size": vocab, **extra}


def cpu_train(**kwargs) -> TrainConfig:
    return TrainConfig(**kwargs)


def forward_logits(model, ids: list[int]) -> torch.Tensor:
    model.eval()  # no dropout (GPT-2's config has some)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_loads_from_mapping_file_and_saved_folder(arch, tokenizer, tmp_path):
    train = cpu_train(seed=3)
    from_mapping = load_model(
        ModelConfig(from_config=tiny(arch, len(tokenizer))), train, tokenizer, device="cpu"
    )
    assert from_mapping.config.model_type == arch
    assert from_mapping.get_input_embeddings().weight.dtype == torch.float32

    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(tiny(arch, len(tokenizer))))
    from_file = load_model(
        ModelConfig(from_config="config.json"),
        train,
        tokenizer,
        device="cpu",
        resolve=lambda p: str(tmp_path / p),
    )
    ids = tokenizer.encode("What is 37 + 48?")
    # Same seed, same config: the same random weights, whatever the source of the config.
    torch.testing.assert_close(forward_logits(from_mapping, ids), forward_logits(from_file, ids))

    from_mapping.save_pretrained(tmp_path / "saved")
    from_folder = load_model(ModelConfig(path=str(tmp_path / "saved")), train, tokenizer, device="cpu")
    torch.testing.assert_close(forward_logits(from_mapping, ids), forward_logits(from_folder, ids))


def test_seed_controls_random_init_and_leaves_global_rng_alone(tokenizer):
    cfg = ModelConfig(from_config=tiny("llama", len(tokenizer)))
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_model(cfg, cpu_train(seed=1), tokenizer, device="cpu")
    assert torch.equal(torch.rand(1), expected_next)
    b = load_model(cfg, cpu_train(seed=1), tokenizer, device="cpu")
    c = load_model(cfg, cpu_train(seed=2), tokenizer, device="cpu")
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_attention_backend_defaults_to_sdpa_and_can_be_set(tokenizer):
    default = load_model(
        ModelConfig(from_config=tiny("llama", len(tokenizer))), cpu_train(), tokenizer, device="cpu"
    )
    assert default.config._attn_implementation == "sdpa"
    eager = load_model(
        ModelConfig(from_config=tiny("llama", len(tokenizer)), attn_implementation="eager"),
        cpu_train(),
        tokenizer,
        device="cpu",
    )
    assert eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # untied and tied output embeddings
def test_new_tokens_get_mean_embedding_rows(arch, tokenizer):
    small_vocab = len(tokenizer) - 5
    model = load_model(ModelConfig(from_config=tiny(arch, small_vocab)), cpu_train(), tokenizer, device="cpu")
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = layer.weight
        assert weight.shape[0] == len(tokenizer)
        mean = weight[:small_vocab].mean(dim=0)
        torch.testing.assert_close(weight[small_vocab:], mean.expand(5, -1))
    assert model.config.vocab_size == len(tokenizer)


def test_pad_and_eos_ids_are_filled_from_the_tokenizer(tokenizer):
    config = tiny("llama", len(tokenizer), pad_token_id=None, eos_token_id=None, bos_token_id=None)
    model = load_model(ModelConfig(from_config=config), cpu_train(), tokenizer, device="cpu")
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_bin_only_folder_is_refused_unless_the_config_allows_pickles(tokenizer, tmp_path):
    model = load_model(
        ModelConfig(from_config=tiny("llama", len(tokenizer))), cpu_train(), tokenizer, device="cpu"
    )
    folder = tmp_path / "bin_only"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="only .bin .pickle. weights.*allow_pickle_weights"):
        load_model(ModelConfig(path=str(folder)), cpu_train(), tokenizer, device="cpu")
    with pytest.warns(UserWarning, match="pickle"):
        loaded = load_model(
            ModelConfig(path=str(folder), allow_pickle_weights=True), cpu_train(), tokenizer, device="cpu"
        )
    ids = tokenizer.encode("hello")
    torch.testing.assert_close(forward_logits(model, ids), forward_logits(loaded, ids))


def test_folder_without_weights_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "config.json").write_text(json.dumps(tiny("llama", 100)))
    with pytest.raises(ConfigError, match="no weights"):
        load_model(ModelConfig(path=str(tmp_path)), cpu_train(), tokenizer, device="cpu")


def test_from_config_errors_name_the_problem(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        load_model(ModelConfig(from_config={"hidden_size": 32}), cpu_train(), tokenizer, device="cpu")
    with pytest.raises(ConfigError, match="not found"):
        load_model(ModelConfig(from_config=str(tmp_path / "nope.json")), cpu_train(), tokenizer, device="cpu")


def test_lora_wraps_all_linear_layers_and_freezes_the_base(tokenizer):
    train = cpu_train(method="lora", lora={"r": 4, "alpha": 8})
    model = load_model(ModelConfig(from_config=tiny("llama", len(tokenizer))), train, tokenizer, device="cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(proj in n for n in trainable), proj
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)


def test_lora_target_list(tokenizer):
    train = cpu_train(method="lora", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    model = load_model(ModelConfig(from_config=tiny("qwen2", len(tokenizer))), train, tokenizer, device="cpu")
    trainable = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "v_proj"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_trains_embeddings_when_the_tokenizer_added_tokens(arch, tokenizer):
    train = cpu_train(method="lora", lora={"r": 4})
    base_names = embedding_module_names(
        load_model(ModelConfig(from_config=tiny(arch, len(tokenizer))), cpu_train(), tokenizer, device="cpu")
    )
    assert len(base_names) == 2  # input embeddings and output layer, named generically
    model = load_model(
        ModelConfig(from_config=tiny(arch, len(tokenizer) - 3)), train, tokenizer, device="cpu"
    )
    saved = set(model.peft_config["default"].modules_to_save)
    base = model.get_base_model()
    if arch == "gpt2":
        # Tied: PEFT trains one copy of the shared matrix, and the output layer uses it too.
        assert saved == {base_names[0]}
        assert embeddings_tied(base)
    else:
        assert saved == set(base_names)
    assert base.get_input_embeddings().weight.requires_grad
    assert base.get_output_embeddings().weight.requires_grad


def test_lora_train_embeddings_can_be_forced_off(tokenizer):
    train = cpu_train(method="lora", lora={"r": 4, "train_embeddings": False})
    model = load_model(
        ModelConfig(from_config=tiny("llama", len(tokenizer) - 3)), train, tokenizer, device="cpu"
    )
    assert not model.peft_config["default"].modules_to_save


def test_qlora_is_refused_before_any_work_on_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExemplarError, match="CUDA"):
        check_method_supported(cpu_train(method="qlora"))
    check_method_supported(cpu_train(method="lora"))  # fine everywhere


def test_qlora_without_bitsandbytes_names_the_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ExemplarError, match="bitsandbytes"):
        check_method_supported(cpu_train(method="qlora"))


def test_a_quantized_base_is_seen_through_its_wrappers():
    import peft

    from exemplar.model.lora import is_quantized
    from exemplar.train.loss import LMLoss
    from tests.train_helpers import tiny_model

    base = tiny_model("llama")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules="all-linear"))
    assert not is_quantized(base) and not is_quantized(lora) and not is_quantized(LMLoss(lora))
    base.is_loaded_in_4bit = True  # what transformers' bitsandbytes quantizer marks a 4-bit model with
    assert is_quantized(lora) and is_quantized(LMLoss(lora))
