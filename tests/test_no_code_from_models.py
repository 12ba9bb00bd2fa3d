"""A downloaded model folder runs no code of its own unless the config says so, and the package
never runs a shell."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import exemplar
from exemplar.config import ModelConfig, TrainConfig
from exemplar.errors import ExemplarError
from exemplar.model.loading import load_model
from exemplar.quickstart import tokenizer_path

MALICIOUS_MODELING = """
from pathlib import Path
Path({marker!r}).touch()  # runs on import: proof that the model's own code executed
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "evil"
"""


def _folder_with_remote_code(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "configuration_evil.py").write_text(MALICIOUS_MODELING.format(marker=str(marker)))
    config = {
        "model_type": "evil",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 3072,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


@pytest.mark.parametrize("as_path", [True, False])
def test_remote_code_in_a_model_folder_does_not_run_by_default(tmp_path, as_path):
    from transformers import AutoTokenizer

    folder, marker = _folder_with_remote_code(tmp_path)
    model_cfg = ModelConfig(path=str(folder)) if as_path else ModelConfig(from_config=str(folder))
    with pytest.raises(ExemplarError, match=r"ships its own Python code .*model.trust_remote_code: true"):
        load_model(model_cfg, TrainConfig(), AutoTokenizer.from_pretrained(tokenizer_path()), device="cpu")
    assert not marker.exists()


def test_the_package_never_runs_a_shell():
    """No os.system / os.popen / shell=True anywhere in the package: user strings never reach a shell."""
    offenders = []
    for path in Path(exemplar.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            os_call = isinstance(node, ast.Attribute) and node.attr in {"system", "popen"}
            if os_call and isinstance(node.value, ast.Name) and node.value.id == "os":
                offenders.append(f"{path}:{node.lineno} os.{node.attr}")
            shell = isinstance(node, ast.keyword) and node.arg == "shell"
            if shell and not (isinstance(node.value, ast.Constant) and node.value.value is False):
                offenders.append(f"{path}:{node.lineno} shell=")
    assert offenders == []
