"""A vLLM OpenAI-compatible server: started as a subprocess of another Python (vLLM pins its own torch and
transformers, so it lives in its own environment) or reached at a given URL; JSON requests with bounded retries.

A started server gets `VLLM_ALLOW_RUNTIME_LORA_UPDATING` (runtime `/v1/load_lora_adapter`) and
`VLLM_SERVER_DEV_MODE` (`/collective_rpc` for weight reloads, `/reset_mm_cache`, `/reset_prefix_cache`). A request
that fails `retries + 1` times, or a server process that has exited, raises `VLLMServerError` naming the server,
the request and (for a started server) its exit status and the tail of its log.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTHON_ENV_VAR = "VERIPO_VLLM_PYTHON"


class VLLMServerError(RuntimeError):
    """The vLLM server failed to start, died, or did not answer."""


@dataclass(frozen=True)
class VLLMSettings:
    """How to reach the vLLM server of `GRPOModule(rollout_engine="vllm")`.

    Args:
        url: an already running server (e.g. "http://127.0.0.1:8000"); None starts one.
        python: the Python executable of the vLLM environment that starts the server (default: the
            VERIPO_VLLM_PYTHON environment variable).
        port: the started server's port on 127.0.0.1 (0 = a free one).
        max_lora_rank: the started server's `--max-lora-rank` (at least the adapter's rank).
        tower_connector_lora: the server accepts LoRA on the vision merger (`--enable-tower-connector-lora`),
            needed by the merger LoRA preset.
        enforce_eager: start without compilation (13 s instead of 47-89 s on CPU).
        extra_args: more command-line arguments for the started server (e.g. "--gpu-memory-utilization=0.4").
        startup_timeout_s / request_timeout_s: waits for readiness and for each request.
        retries: further attempts of a request that failed before the error.
        work_dir: where synced adapters and merged bases are written (default: a temporary directory).
        check_greedy: after each base reload, check that the server's greedy tokens on a text prompt equal the
            trainer's policy's.
    """

    url: str | None = None
    python: str | None = None
    port: int = 0
    max_lora_rank: int = 64
    tower_connector_lora: bool = False
    enforce_eager: bool = True
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 300.0
    retries: int = 2
    work_dir: str | None = None
    check_greedy: bool = True


def _die_with_parent() -> None:
    """In the server's process before it execs (Linux): SIGTERM when the trainer that started it dies, even by
    SIGKILL, so a killed fit leaves no server behind (the server stops its own engine processes on SIGTERM)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: stop() still stops it on a clean exit
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VLLMServer:
    """One server: `start()` launches or connects and waits for `/health`; `post` / `get` talk JSON; `stop()`."""

    def __init__(self, settings: VLLMSettings, model_dir: str, log_path: Path, dtype: str = "auto") -> None:
        self.settings = settings
        self.dtype = dtype  # the trainer's: vLLM's CPU build serves float32 checkpoints in bfloat16 otherwise
        self.model_dir = model_dir
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.url = settings.url.rstrip("/") if settings.url else ""

    def command(self, python: str, port: int) -> list[str]:
        s = self.settings
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port),
               "--enable-lora", "--max-lora-rank", str(s.max_lora_rank), "--max-logprobs", "1", "--dtype", self.dtype,
               "--trust-request-mm-kwargs", "--logprobs-mode", "processed_logprobs"]  # fmt: skip
        if s.tower_connector_lora:
            cmd.append("--enable-tower-connector-lora")
        if s.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd + list(s.extra_args)

    def start(self) -> None:
        if self.settings.url:
            self.wait_ready(None)
            return
        python = self.settings.python or os.environ.get(PYTHON_ENV_VAR)
        if not python:
            raise VLLMServerError(
                "GRPOModule(rollout_engine='vllm') needs a running server (vllm.url) or the Python of a vLLM "
                f"environment to start one: set vllm.python or {PYTHON_ENV_VAR} (README, 'Rollouts from vLLM')"
            )
        port = self.settings.port or _free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_SERVER_DEV_MODE": "1"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 (the configured interpreter, our arguments)
            self.command(python, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads touched: one libc call before exec)
        )
        log.close()
        self.wait_ready(self.process)

    def wait_ready(self, process: subprocess.Popen[bytes] | None) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise VLLMServerError(
                    f"the vLLM server exited with status {process.returncode} while starting{self._tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:  # noqa: S310 (our URL)
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise VLLMServerError(
            f"the vLLM server at {self.url} was not ready after {self.settings.startup_timeout_s:.0f} s "
            f"(vllm.startup_timeout_s){self._tail()}"
        )

    def _tail(self, lines: int = 25) -> str:
        if self.process is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"; its log {self.log_path} ends:\n" + "\n".join(text)

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """JSON request with `retries` further attempts; HTTP 4xx is not retried (the request is wrong)."""
        data = json.dumps(body).encode() if body is not None else None
        last: Exception | None = None
        for attempt in range(self.settings.retries + 1):
            if not self.alive():
                assert self.process is not None
                raise VLLMServerError(
                    f"the vLLM server at {self.url} has died (exit status {self.process.returncode}) before "
                    f"{method} {path}{self._tail()}"
                )
            req = urllib.request.Request(  # noqa: S310 (our URL)
                self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=self.settings.request_timeout_s) as r:  # noqa: S310
                    raw = r.read().decode(errors="replace")
                    try:
                        return json.loads(raw) if raw.strip() else None
                    except json.JSONDecodeError:
                        return raw  # e.g. /v1/load_lora_adapter's "Success: ..."
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:2000]
                if 400 <= e.code < 500:
                    raise VLLMServerError(
                        f"the vLLM server at {self.url} refused {method} {path}: HTTP {e.code} {detail}"
                    ) from e
                last = VLLMServerError(f"HTTP {e.code} {detail}")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = e
            if attempt < self.settings.retries:
                time.sleep(min(2.0**attempt, 10.0))
        raise VLLMServerError(
            f"the vLLM server at {self.url} did not answer {method} {path} after {self.settings.retries + 1} "
            f"attempts (timeout {self.settings.request_timeout_s:.0f} s each): {last}{self._tail()}"
        ) from last

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def stop(self) -> None:
        """Stop the server this object started (a server given by URL is left running)."""
        if self.process is None:
            return
        # its own session: the engine-core and worker processes it forked go with it
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None
