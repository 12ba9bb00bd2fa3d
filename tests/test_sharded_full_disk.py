"""A full disk while 2 ranks (torchrun, Gloo on CPU, FSDP2) write a sharded checkpoint: every rank
stops with the clear message naming the checkpoint and the space needed, the previous checkpoint
is intact and no partial folder is left. The disk is a real tmpfs, filled but for half a checkpoint
after the first one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exemplar.train.checkpoint import checkpoint_problem
from tests.test_checkpoint_safety import small_disk  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("mount") is None or os.geteuid() != 0, reason="mounting a tmpfs needs root"
)

# Each rank: a tiny model sharded with FSDP2, one optimizer step, checkpoint 1, then a file fills
# the disk but for half a checkpoint, and checkpoint 2; prints what each save did.
SAVE_TWICE = textwrap.dedent(
    """
    import os, shutil, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from exemplar.train.checkpoint import save_checkpoint
    from exemplar.train.distributed import World
    from tests.train_helpers import tiny_model

    dist.init_process_group("gloo")
    world = World(rank=dist.get_rank(), world_size=dist.get_world_size(), backend="gloo")
    model = tiny_model()
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    kwargs = dict(model=model, optimizer=optimizer, schedule={}, trainer_state={"step": 1}, world=world)
    root = Path(sys.argv[1])
    save_checkpoint(root, 1, **kwargs)
    print(f"rank {world.rank}: saved 1", flush=True)
    if world.is_main:  # leave room for half a checkpoint more
        size = sum(f.stat().st_size for f in (root / "step-000001").rglob("*") if f.is_file())
        free = shutil.disk_usage(root).free
        (root.parent / "filler").write_bytes(b"x" * (free - size // 2))
    dist.barrier()
    try:
        save_checkpoint(root, 2, **kwargs)
        print(f"rank {world.rank}: saved 2", flush=True)
    except Exception as e:
        print(f"rank {world.rank}: {type(e).__name__}: {e}", flush=True)
    dist.destroy_process_group()
    """
)


def test_a_full_disk_during_a_sharded_checkpoint_stops_every_rank_clearly(tmp_path, small_disk):  # noqa: F811
    root = small_disk(16 * 2**20) / "checkpoints"
    script = tmp_path / "save_twice.py"
    script.write_text(SAVE_TWICE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, str(script), str(root)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for rank in (0, 1):
        assert f"rank {rank}: saved 1" in output
        assert (
            f"rank {rank}: ExemplarError: no space left on device while writing checkpoint "
            f"{root / 'step-000002'}: it needs about"
        ) in output, output
    assert "saved 2" not in output
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no partial folder left
    assert checkpoint_problem(root / "step-000001") is None
