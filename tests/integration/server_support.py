"""Helpers for tests that run the service as real processes and talk to it over HTTP."""

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(base_url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait until `/healthz` answers 200; fail at once if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode} while starting"
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{base_url} did not answer /healthz within {timeout_s:.0f} s")
