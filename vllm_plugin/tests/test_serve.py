"""`vllm serve CHECKPOINT` of a tiny SwiftKV checkpoint answers OpenAI completions over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from engines import BLOCK_SIZE, FIXTURES, KV_CACHE_BYTES

CHECKPOINT = "qwen2/g3"
START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def wait_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log.read_text()[-3000:]
            pytest.fail(f"vllm serve exited with {server.returncode} before answering:\n{tail}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve did not answer /health within {START_TIMEOUT_S} s", pytrace=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port, path = free_port(), str(FIXTURES / CHECKPOINT)
    vllm = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm), "serve", path, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    cmd += ["--enforce-eager", "--max-model-len", "256", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    cmd += ["--block-size", str(BLOCK_SIZE), "--max-num-seqs", "4", "--seed", "0"]
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    log = log_path.open("w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_path)
        yield url, path
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_completion_over_http_equals_hf(server, expected):
    url, path = server
    prompt = expected["prompts"][1]  # 37 tokens
    text = " ".join(f"w{t}" for t in prompt)  # the fixtures' word-level tokenizer: "w<id>" is token <id>
    body = {"model": path, "prompt": text, "max_tokens": expected["new_tokens"], "temperature": 0, "ignore_eos": True}
    status, answer = post(f"{url}/v1/completions", body)
    assert status == 200, answer
    want = [f"w{t}" for t in expected["models"][CHECKPOINT]["tokens"][1]]
    assert answer["choices"][0]["text"].split() == want
    assert answer["usage"]["prompt_tokens"] == len(prompt)


def test_prompt_logprobs_over_http_is_a_client_error(server):
    """Refused, never silently wrong. The server's own check runs before the plugin's, so the message is vLLM's
    (it names --kv-sharing-fast-prefill; docs/vllm.md and the server log say how SwiftKV turns it off)."""
    url, path = server
    body = {"model": path, "prompt": "w5 w6 w7", "max_tokens": 1, "prompt_logprobs": 1}
    status, answer = post(f"{url}/v1/completions", body)
    assert status == 400, answer
    assert "logprobs for prompt tokens" in answer["error"]["message"]
