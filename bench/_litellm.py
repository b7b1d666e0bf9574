"""LiteLLM for ``bench.proxy``: its virtualenv (installed the first time), its
configuration aimed at the fake upstream, and its environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from bench._fake import MODEL

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
