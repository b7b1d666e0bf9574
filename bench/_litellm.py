"""LiteLLM for ``bench.proxy``: its virtualenv (installed the first time), its
configuration aimed at the fake upstream, its environment, and the server itself."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import yaml

from bench._fake import MODEL
from bench._load import Endpoint, first_success
from bench._servers import Child, spawned
from tests.processes import free_port

INSTALL_TIMEOUT_S = 1200.0


def _litellm_version(python: Path) -> str | None:
    probe = "import importlib.metadata as m, fastapi, uvicorn; print(m.version('litellm'))"
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_litellm(venv: Path) -> tuple[Path, str] | None:
    """The LiteLLM venv's bin directory and version, installing it the first time."""
    bin_dir = venv / "bin"
    version = _litellm_version(bin_dir / "python")
    if version and (bin_dir / "litellm").exists():
        return bin_dir, version
    print(f"installing litellm[proxy] into {venv} (once; may take minutes)", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(bin_dir / "pip"), "install", "--quiet", "litellm[proxy]"],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"LiteLLM skipped: {' '.join(step)}: {exc}")
            return None
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
            print(f"LiteLLM skipped: {' '.join(step)} failed:\n{tail}")
            return None
    version = _litellm_version(bin_dir / "python")
    return (bin_dir, version) if version else None


def litellm_config(home: Path, fake_base: str) -> Path:
    entry = {
        "model_name": MODEL,
        "litellm_params": {"model": f"openai/{MODEL}", "api_base": fake_base, "api_key": "sk"},
    }
    path = home / "litellm.yaml"
    path.write_text(yaml.safe_dump({"model_list": [entry]}, sort_keys=False))
    return path


def litellm_env(master_key: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    return keep | {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_MASTER_KEY": master_key,  # it refuses to start without one
    }


@contextlib.asynccontextmanager
async def litellm_served(
    bin_dir: Path, home: Path, fake_base: str, start_timeout_s: float
) -> AsyncIterator[tuple[Endpoint, Child, float] | None]:
    """The LiteLLM proxy aimed at the fake (its default single process, checking a master
    key): its endpoint, process and seconds from spawn to its first good answer; None if it
    did not start."""
    port = free_port()
    argv = [str(bin_dir / "litellm"), "--config", str(litellm_config(home, fake_base))]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    key = f"sk-{secrets.token_hex(32)}"
    endpoint = Endpoint("litellm", f"http://127.0.0.1:{port}/v1/chat/completions", key)
    with spawned("litellm", argv, litellm_env(key), home / "litellm.log") as child:
        endpoint.pid = child.process.pid
        try:
            started_s = await first_success(endpoint, child, start_timeout_s)
        except RuntimeError as exc:
            print(f"LiteLLM skipped: it did not start: {exc}")
            yield None
            return
        yield endpoint, child, started_s
