"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# The project's own small tokenizer (exemplar/assets/tokenizer, built by scripts/build_tokenizer.py).
ASSET_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "exemplar" / "assets" / "tokenizer"


def shared_data_dir() -> Path:
    """The third-party reference data beside the project, or $EXEMPLAR_SHARED_DATA."""
    env = os.environ.get("EXEMPLAR_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The reference data folder; tests using it skip where it is absent (a user's clone)."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"reference data not found at {path} (set EXEMPLAR_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every test's torch runs on one thread. The tests' models and batches are tiny, and on two
    shared cores (CI, or a machine running other jobs) two threads wait on each other: measured on
    tests/test_curate_select.py (sentence embeddings, k-means) on a busy 2-core machine, 54 s with
    one thread against 118 s with two. Session-wide, so module and session fixtures that train or
    embed run on one thread too. Subprocesses are unaffected (the tests that start them pass
    OMP_NUM_THREADS=1 where it matters)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One torch thread for a test, whatever an earlier test or fixture set (one_torch_thread is
    the session's default). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    """The project's asset tokenizer (ChatML template, <|im_end|> special). Modules that need
    another one define their own `tokenizer` fixture."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSET_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def im_end(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory) -> Path:
    """The model folder tests/test_serve.py serves (tests.serve_helpers.served_model_folder), taught
    once per session: the serve, curate and eval modules all use this one."""
    from transformers import AutoTokenizer

    from tests.serve_helpers import served_model_folder

    tokenizer = AutoTokenizer.from_pretrained(ASSET_TOKENIZER_DIR)
    return served_model_folder(tokenizer, tmp_path_factory.mktemp("served") / "run")


@pytest.fixture(scope="session")
def serve(tmp_path_factory):
    """serve(folder) -> the URL of a `transformers serve` of that folder, started once per folder
    per session (starting one costs seconds: a Python process importing torch and transformers)."""
    from transformers.utils.import_utils import is_serve_available

    from tests.serve_helpers import Server

    servers: dict[Path, Server] = {}
    failed: dict[Path, str] = {}  # a server that did not start fails each later test at once

    def url_of(folder: Path) -> str:
        if not is_serve_available():
            pytest.skip('transformers serve needs the serve extra: pip install "exemplar-sft[serve]"')
        if folder in failed:
            pytest.fail(failed[folder])
        if folder not in servers:
            try:
                servers[folder] = Server(folder, tmp_path_factory.mktemp("serve_log") / "serve.log")
            except pytest.fail.Exception as error:
                failed[folder] = str(error)
                raise
        return servers[folder].url

    yield url_of
    for server in servers.values():
        server.stop()


# Property tests explore the same examples on every run: a failure seen once is seen again.
settings.register_profile("exemplar", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("exemplar")
