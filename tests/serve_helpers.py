"""`transformers serve` (the `serve` extra) on a free 127.0.0.1 port, serving a model folder, and the
taught model folder that tests/test_serve.py and the curate/eval tests built on it share."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import torch

from exemplar.model import save_model
from tests.generation_helpers import TAUGHT, taught_model

# Short taught answers stop at <|im_end|>; the long one runs into the length limit.
LONG = {"Count to ten": "one two three four five six seven eight nine ten"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_model_folder(tokenizer, out: Path) -> Path:
    """The TAUGHT and LONG answers, taught on one thread (tiny models are several times faster so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = taught_model(tokenizer, {**TAUGHT, **LONG})
    finally:
        torch.set_num_threads(threads)
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    folder = save_model(model, tokenizer, out, stop_token_ids=stop)["model"]
    # transformers serve samples (temperature > 0) only where the folder's generation config says
    # do_sample; greedy requests (temperature 0) switch it off again. The local backend builds its
    # own complete config and is unaffected.
    config_path = folder / "generation_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "do_sample": True}))
    return folder


class Server:
    """`transformers serve` on the CPU, pinned to one model folder, its output in `log_path`."""

    def __init__(self, model_dir: Path, log_path: Path):
        self.log_path = log_path
        self.log = log_path.open("w")
        port = free_port()
        command = [
            *(
                sys.executable,
                "-c",
                "import sys; from transformers.cli.transformers import main; sys.exit(main())",
            ),
            *("serve", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), str(model_dir)),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_until_healthy(self) -> None:
        for _ in range(240):  # at most a minute
            if self.process.poll() is not None:
                pytest.fail(
                    f"transformers serve exited with {self.process.returncode}: "
                    f"{self.log_path.read_text()[-2000:]}"
                )
            try:
                if httpx2.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.25)
        pytest.fail(f"transformers serve did not become healthy: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
