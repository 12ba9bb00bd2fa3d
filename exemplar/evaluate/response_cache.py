"""An on-disk cache of answered requests, so a rerun or a resumed run does not ask a server again.

SQLite (stdlib) rather than one file per entry: each `put` is one committed transaction, so a
process killed mid-run leaves every answer stored before the kill readable and nothing torn.

The key is a SHA-256 of the endpoint (base URL), the model name and the full request body
(messages, tools, max tokens, temperature, top_p, seed): a different sampling setting or seed
is a different entry. The base URL is part of the key because two servers may serve different
models under one name. Only the body is stored, never headers, so an API key cannot end up here.
Failed requests are never stored: a rerun asks again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

FILE_NAME = "responses.sqlite"


def request_key(endpoint: str, body: dict[str, Any]) -> str:
    canonical = json.dumps({"endpoint": endpoint, "body": body}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """`get(key)` / `put(key, body, answer)`; safe to share between the threads of one process."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed answer survives a power cut too
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, request TEXT NOT NULL, answer TEXT NOT NULL)"
        )

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, request: dict[str, Any], answer: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, request, answer) VALUES (?, ?, ?)",
                (key, json.dumps(request, ensure_ascii=False), json.dumps(answer, ensure_ascii=False)),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
