"""`r1tune serve RUN.yaml` as a real process: binds 127.0.0.1 by default, answers the openai client,
requires the API key from R1TUNE_API_KEY."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from r1tune.train.stages.sft import run_sft
from tests.conftest import make_cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_the_openai_client(tiny_qwen, parity_file, tmp_path):
    out = tmp_path / "out"
    run_sft(make_cfg(tiny_qwen, parity_file, out, max_steps=2, bf16=False))
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model_name_or_path": str(tiny_qwen), "dataset": str(parity_file),
                                  "output_dir": str(out)}), encoding="utf-8")
    port = free_port()
    env = {**os.environ, "R1TUNE_API_KEY": "secret"}
    proc = subprocess.Popen([sys.executable, "-m", "r1tune", "serve", str(config), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("server did not come up: " + (proc.stdout.read() if proc.poll() is not None else ""))
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="secret")
        reply = client.chat.completions.create(model="out", messages=[{"role": "user", "content": "Is 4 even?"}],
                                               max_tokens=6)
        assert reply.choices[0].message is not None and reply.usage.completion_tokens <= 6
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong").models.list()
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/v1" in output and "API key required" in output
