"""``steppo serve`` through the real entry point: a subprocess serving the tiny policy, an
unmodified OpenAI-SDK agent pointed at a session URL, Ctrl-C, and a restart on the same pool."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from steppo.gateway.pool import read_pool

openai = pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path, pool, port):
    args = [sys.executable, "-m", "steppo.cli", "serve", "model.device=cpu", "rollout.max_new_tokens=8",
            f"run.output_dir={tmp_path / 'run'}", f"--pool={pool}", f"--port={port}"]
    # started with SIGINT ignored, as a shell script's background job is: Ctrl-C must still stop it
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"steppo serve did not come up: {proc.communicate()[1][-2000:]}")


def _episode(port, session):
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/sessions/{session}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "You stand in a room."}]
    r = c.chat.completions.create(model="tiny", messages=messages, seed=1)
    messages += [r.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "A wall."}]
    c.chat.completions.create(model="tiny", messages=messages, seed=2)
    httpx.post(f"http://127.0.0.1:{port}/sessions/{session}/reward", json={"reward": 1.0})
    assert httpx.post(f"http://127.0.0.1:{port}/sessions/{session}/end", json={}).json()["steps"] == 2


def test_serve_records_sessions_and_a_restart_keeps_the_pool(tmp_path):
    pool, port = tmp_path / "pool", _free_port()
    proc = _serve(tmp_path, pool, port)
    try:
        _episode(port, "first")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert "serving" in err and "Traceback" not in err
    proc = _serve(tmp_path, pool, port)  # the same pool after a restart: appended to, nothing lost
    try:
        _episode(port, "second")
    finally:
        proc.send_signal(signal.SIGTERM)  # a service manager's stop: the same clean exit
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped" in err and "Traceback" not in err
    trajs = read_pool(pool).trajectories
    assert [t.group_id for t in trajs] == ["first", "second"]
    assert all(len(t.steps) == 2 and t.steps[-1].reward == 1.0 and t.steps[-1].terminated for t in trajs)
