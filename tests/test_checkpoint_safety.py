"""Checkpoints from elsewhere run no code; damaged ones are skipped; a full disk loses nothing.

Each test does the real thing to a real checkpoint folder: a pickle that would run code, a file
cut short, a flipped byte, a tmpfs too small for the next save.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from exemplar.errors import ExemplarError
from exemplar.train.checkpoint import (
    checkpoint_problem,
    latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    vet_sharded_metadata,
)
from exemplar.train.loop import run_training
from tests.train_helpers import make_config, synthetic_dataset, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class _RunsCode:
    """Unpickling this creates a marker file: proof that loading executed code."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _train(output_dir: Path, resume: bool = False, steps: int = 4) -> dict:
    config = make_config(
        output_dir, f"train.max_steps={steps}", "train.save_every=2", "train.keep_last=3", "train.lr=1e-3"
    )
    return run_training(config, tiny_model(), None, synthetic_dataset(24, seed=1), resume=resume)


def test_rng_state_round_trips_every_generator():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_code_planted_in_rng_pt_is_refused_and_never_runs(tmp_path):
    _train(tmp_path / "run", steps=2)
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    torch.save({"python": payload}, checkpoint / "rng.pt")
    # A careful attacker also rewrites the manifest, so the checksums pass: loading must still refuse.
    from exemplar.train.checkpoint import _write_manifest

    (checkpoint / "manifest.json").unlink()
    _write_manifest(checkpoint)
    with pytest.raises(ExemplarError, match=r"rng\.pt: refusing to load"):
        _train(tmp_path / "run", resume=True, steps=4)
    assert not marker.exists()


def test_a_truncated_newest_checkpoint_is_reported_and_the_older_one_resumes(tmp_path, caplog):
    reference = _train(tmp_path / "ref", steps=6)
    _train(tmp_path / "run", steps=4)  # checkpoints at steps 2 and 4
    root = tmp_path / "run" / "checkpoints"
    weights = root / "step-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "truncated" in checkpoint_problem(root / "step-000004")
    with caplog.at_level(logging.WARNING):
        resumed = _train(tmp_path / "run", resume=True, steps=6)
    assert "skipping checkpoint" in caplog.text and "step-000004" in caplog.text
    assert resumed["resumed_from"].endswith("step-000002")
    assert resumed["final_loss"] == reference["final_loss"]


def test_a_flipped_byte_fails_the_checksum(tmp_path):
    _train(tmp_path / "run", steps=2)
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    data = bytearray((checkpoint / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (checkpoint / "optimizer.pt").write_bytes(bytes(data))
    assert "checksum" in checkpoint_problem(checkpoint)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None


def test_sharded_metadata_naming_other_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    (tmp_path / ".metadata").write_bytes(pickle.dumps(payload))
    with pytest.raises(ExemplarError, match="refusing to load"):
        vet_sharded_metadata(tmp_path / ".metadata")
    assert not marker.exists()


def test_real_sharded_metadata_passes_the_vetting(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp_path / "dcp"))
    vet_sharded_metadata(tmp_path / "dcp" / ".metadata")  # does not raise


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a given size (needs the rights to mount; skipped where they are missing)."""
    mounts = []

    def make(size_bytes: int) -> Path:
        point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(point)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(point)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.skipif(shutil.which("mount") is None or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_during_a_checkpoint_names_the_path_and_keeps_the_previous_one(tmp_path, small_disk):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    kwargs = dict(model=model, optimizer=optimizer, schedule={}, trainer_state={"step": 1})
    probe = save_checkpoint(tmp_path / "probe", 1, **kwargs)
    size = sum(f.stat().st_size for f in probe.iterdir())

    root = small_disk(int(size * 1.5)) / "checkpoints"  # room for one checkpoint, not two
    first = save_checkpoint(root, 1, **kwargs)
    with pytest.raises(
        ExemplarError, match=r"no space left on device while writing checkpoint .*step-000002"
    ):
        save_checkpoint(root, 2, **kwargs)
    assert checkpoint_problem(first) is None
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no partial folder left


@pytest.mark.skipif(shutil.which("mount") is None or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_while_exporting_the_model_keeps_the_previous_folder(tmp_path, small_disk):
    from transformers import AutoTokenizer

    from exemplar.model.export import save_model
    from exemplar.quickstart import tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
    small, big = tiny_model(), tiny_model("gemma")
    big.resize_token_embeddings(40_000)  # about 5 MB of weights: more than the disk holds
    disk = small_disk(3 << 20)
    save_model(small, tokenizer, disk, stop_token_ids=[tokenizer.eos_token_id])
    before = sorted(p.name for p in (disk / "model").iterdir())
    with pytest.raises(ExemplarError, match=r"no space left on device while writing .*model: it needs about"):
        save_model(big, tokenizer, disk, stop_token_ids=[tokenizer.eos_token_id])
    assert sorted(p.name for p in (disk / "model").iterdir()) == before
    assert sorted(p.name for p in disk.iterdir()) == ["model"]  # no partial folder beside it


@pytest.mark.skipif(shutil.which("mount") is None or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_while_caching_the_data_names_the_cache_and_leaves_nothing(tmp_path, small_disk):
    import json

    from exemplar.config import load_config
    from exemplar.data.pipeline import prepare_data
    from exemplar.quickstart import tokenizer_path

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i} " * 20},
                {"role": "assistant", "content": "x" * 200},
            ]
        }
        for i in range(400)
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = small_disk(64 << 10)
    config = load_config(
        None,
        tokenizer=tokenizer_path(),
        chat_template="chatml",
        data={"train": [{"path": str(tmp_path / "d.jsonl")}], "cache_dir": str(cache), "num_proc": 1},
        max_length=512,
    )
    with pytest.raises(
        ExemplarError, match=r"no space left on device while writing the data cache .*data.cache_dir"
    ):
        prepare_data(config, progress=False)
    assert not list(cache.rglob(".tmp-*"))  # the partial cache folder is gone
