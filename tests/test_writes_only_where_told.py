"""A training run writes into its output folder and its data cache, and nowhere else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.test_finetune import ARCHITECTURES, config_dict


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


def test_a_run_writes_only_its_output_dir_and_cache(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    config = config_dict(work, ARCHITECTURES["llama"], max_steps=2, save_every=1)
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    before = _files(tmp_path)
    env = {
        **os.environ,
        "HOME": str(home),  # where ~/.cache and friends would land
        "XDG_CACHE_HOME": str(home / ".cache"),
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "HF_DATASETS_CACHE": str(home / ".cache" / "huggingface" / "datasets"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "exemplar", "train", str(work / "config.yaml")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    new = _files(tmp_path) - before
    # matplotlib (the end-of-run report) keeps its font list in the XDG cache, as it does for any
    # program: the one file allowed outside the run's own places.
    allowed = {("work", "out"), ("work", "cache")}
    outside = sorted(
        str(p) for p in new if p.parts[:2] not in allowed and p.parts[:3] != ("home", ".cache", "matplotlib")
    )
    assert outside == []
    assert any(p.parts[:2] == ("work", "out") for p in new) and any(
        p.parts[:2] == ("work", "cache") for p in new
    )
