"""The gateway over loopback with the real `openai` client: a real uvicorn server in front of the
tiny policy (and, where a test needs the model to emit a given tool call, a backend that replays
scripted ids through the same server)."""

from __future__ import annotations

import json
import math
import threading
import time

import httpx
import pytest
import torch

from steppo.config import ModelConfig
from steppo.envs.actions import openai_tools, tool_call_text
from steppo.envs.searchqa import TOOLS
from steppo.gateway.pool import DataPool, read_pool
from steppo.gateway.server import BackgroundServer, create_app
from steppo.gateway.service import Limits, gateway_for
from steppo.models.build import build_models
from steppo.models.generation import Sample

openai = pytest.importorskip("openai")
SCHEMAS = openai_tools(TOOLS)


@pytest.fixture(scope="module")
def models(tiny_dir):
    torch.manual_seed(0)
    return build_models(ModelConfig(device="cpu"), base_path=tiny_dir, with_critic=False, shared_critic=False,
                        with_reference=False, temperature=1.0)


@pytest.fixture
def served(models, tmp_path):
    """(base url, gateway) of a fresh gateway over the tiny policy."""
    gw = gateway_for(models, tmp_path / "pool", limits=Limits(max_tokens=16, context_limit=1024))
    with BackgroundServer(create_app(gw)) as url:
        yield url, gw
    gw.batcher.close()


def client(url, session=None, **kw):
    base = f"{url}/sessions/{session}/v1" if session else f"{url}/v1"
    return openai.OpenAI(base_url=base, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def test_models_and_a_plain_chat(served):
    url, gw = served
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["steppo-policy"]
    r = c.chat.completions.create(model="steppo-policy", messages=[{"role": "user", "content": "go north"}],
                                  max_tokens=8, seed=1)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 3
    assert gw.store.metrics()["gateway/live_sessions"] == 0  # outside a session: served, not recorded


def test_seeded_calls_repeat_and_logprobs_are_the_sampled_ones(served):
    url, gw = served
    c = client(url)
    kw = dict(model="m", messages=[{"role": "user", "content": "look"}], max_tokens=8, seed=7, logprobs=True)
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    lps = [t.logprob for t in a.choices[0].logprobs.content]
    assert len(lps) == a.usage.completion_tokens and all(lp <= 0 and math.isfinite(lp) for lp in lps)


def test_a_session_extends_its_exact_ids_and_the_pool_gets_the_trajectory(served, models):
    """Three calls where the agent sends back what it got: every prompt is the previous prompt +
    the ids sampled + the new turn, never re-encoded; rewards and the end reach the pool."""
    url, gw = served
    c = client(url, "ep-1")
    messages = [{"role": "system", "content": "You are exploring a grid."}, {"role": "user", "content": "You stand in a room."}]
    for obs in ["A wall blocks the way.", "You moved north."]:
        r = c.chat.completions.create(model="m", messages=messages, max_tokens=8, seed=3)
        messages += [r.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": obs}]
    c.chat.completions.create(model="m", messages=messages, max_tokens=8, seed=3)
    http = httpx.Client(base_url=url)
    assert http.post("/sessions/ep-1/reward", json={"reward": 0.5, "step": 0}).status_code == 200
    assert http.post("/sessions/ep-1/reward", json={"reward": 1.0}).status_code == 200
    assert http.post("/sessions/ep-1/end", json={"status": "terminated", "success": True}).json()["steps"] == 3
    [traj] = read_pool(gw.pool.root).trajectories
    steps = traj.steps
    assert [s.reward for s in steps] == [0.5, 0.0, 1.0] and steps[-1].terminated and traj.success
    for prev, nxt in zip(steps, steps[1:]):  # exact extension: previous prompt + sampled ids is a prefix
        assert nxt.prompt_ids[: len(prev.prompt_ids) + len(prev.response_ids)] == prev.prompt_ids + prev.response_ids
    assert steps[0].prompt_ids == models.chat.conversation_ids(messages[:2])
    m = gw.metrics()
    assert m["gateway/prefix_extended"] == 2 and m.get("gateway/retokenized_turns", 0) == 0
    assert m["gateway/prefix_extended_frac"] == 1.0
    # the ids the policy saw are what training gets: logprobs recomputed from the pool's ids match
    policy = models.policy
    for s in steps:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = policy.model(ids).logits[0, len(s.prompt_ids) - 1: -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        assert torch.allclose(lp, torch.tensor(s.logprobs), atol=1e-4)


def test_a_history_editing_agent_starts_a_new_chain_and_is_counted(served):
    url, gw = served
    c = client(url, "editor")
    messages = [{"role": "user", "content": "You stand in a room."}]
    r = c.chat.completions.create(model="m", messages=messages, max_tokens=6, seed=1)
    edited = {"role": "assistant", "content": "(summary of my last move)"}
    c.chat.completions.create(model="m", messages=messages + [edited, {"role": "user", "content": "ok"}], max_tokens=6)
    assert r.choices[0].message.content != edited["content"]
    m = gw.metrics()
    assert m["gateway/retokenized_turns"] == 1 and m["gateway/prefix_extended_frac"] == 0.0


def test_streaming_sends_the_same_completion_as_chunks(served):
    url, _ = served
    c = client(url)
    kw = dict(model="m", messages=[{"role": "user", "content": "take lamp"}], max_tokens=8, seed=5)
    whole = c.chat.completions.create(**kw).choices[0].message.content
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_n_choices_are_batched_and_the_continued_one_is_kept(served):
    url, gw = served
    c = client(url, "fork")
    messages = [{"role": "user", "content": "You stand in a room."}]
    r = c.chat.completions.create(model="m", messages=messages, max_tokens=6, n=3, seed=11)
    assert len(r.choices) == 3
    pick = r.choices[2].message.model_dump(exclude_none=True)
    c.chat.completions.create(model="m", messages=messages + [pick, {"role": "user", "content": "next"}], max_tokens=6)
    httpx.post(f"{url}/sessions/fork/end", json={"status": "truncated"})
    [traj] = read_pool(gw.pool.root).trajectories
    assert len(traj.steps) == 2 and traj.steps[0].info["choice"] == 2 and traj.steps[-1].truncated
    assert gw.metrics()["gateway/dropped_choices"] == 2


def test_concurrent_sessions_share_generate_calls(served):
    url, gw = served
    errors = []

    def agent(i):
        try:
            c = client(url, f"par-{i}")
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": f"room {i}"}], max_tokens=12)
            httpx.post(f"{url}/sessions/par-{i}/end", json={"status": "terminated"})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(read_pool(gw.pool.root).trajectories) == 8
    assert gw.batcher.calls < 8  # some calls were served together


@pytest.mark.parametrize("body, status, needle", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "context"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "each tool"),
])
def test_bad_requests_get_openai_shaped_errors(served, body, status, needle):
    url, _ = served
    r = httpx.post(f"{url}/sessions/bad/v1/chat/completions", json={"model": "m", **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_the_openai_client_raises_on_an_over_long_prompt(served):
    url, _ = served
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|context is"):
        client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 2000}])


def test_rewards_and_ends_are_checked(served):
    url, _ = served
    http = httpx.Client(base_url=url)
    assert http.post("/sessions/nobody/reward", json={"reward": 1}).status_code == 404
    client(url, "r1").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert http.post("/sessions/r1/reward", json={"reward": 1, "step": 5}).status_code == 400
    r = http.post("/sessions/r1/reward", content=b'{"reward": NaN}', headers={"content-type": "application/json"})
    assert r.status_code == 400  # a NaN reward never reaches the pool
    assert http.post("/sessions/r1/end", json={"status": "exploded"}).status_code == 400
    assert http.post("/sessions/r1/end", json={}).status_code == 200
    assert http.post("/sessions/r1/end", json={}).status_code == 409
    r = http.post("/sessions/r1/v1/chat/completions", json={"messages": [{"role": "user", "content": "again"}]})
    assert r.status_code == 409 and "has ended" in r.json()["error"]["message"]


def test_an_idle_session_times_out_into_the_pool_marked_as_such(models, tmp_path):
    gw = gateway_for(models, tmp_path / "pool", limits=Limits(max_tokens=8), session_timeout_s=0.2)
    with BackgroundServer(create_app(gw, expire_every_s=0.1)) as url:
        client(url, "idle").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        deadline = __import__("time").time() + 10
        while not read_pool(gw.pool.root).trajectories and __import__("time").time() < deadline:
            __import__("time").sleep(0.05)
    gw.batcher.close()
    [traj] = read_pool(gw.pool.root).trajectories
    assert traj.end_reason == "timeout" and traj.steps[-1].truncated and not traj.steps[-1].terminated
    assert gw.metrics()["gateway/timed_out"] == 1


def test_an_api_key_is_required_when_set(models, tmp_path):
    gw = gateway_for(models, tmp_path / "pool", limits=Limits(max_tokens=4))
    with BackgroundServer(create_app(gw, api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert client(url, api_key="s3cret").models.list().data
    gw.batcher.close()


class Replay:
    """A backend that answers with given texts (encoded), through the real server: the tests of
    tool-call parsing need the model to emit a particular call."""

    def __init__(self, chat, texts):
        self.chat, self.texts = chat, list(texts)

    def generate(self, prompts, max_new_tokens, generators, greedy, keys):
        out = []
        for _ in prompts:
            ids = self.chat.encode(self.texts.pop(0)) + [self.chat.end_of_turn_id]
            out.append(Sample(ids, [-0.5] * len(ids), False))
        return out

    def release(self, key):
        pass


def test_tool_calls_come_back_as_tool_calls_and_tool_results_continue_the_chain(models, tmp_path):
    chat = models.chat
    texts = ["I will search. " + tool_call_text("search", query="Ada"), tool_call_text("answer", text="1815"),
             '<tool_call>{"name": "search", "arguments": {"query": </tool_call>']
    gw = gateway_for(models, tmp_path / "pool", limits=Limits(max_tokens=64), backend=Replay(chat, texts))
    with BackgroundServer(create_app(gw)) as url:
        c = client(url, "tools")
        messages = [{"role": "user", "content": "When was Ada born?"}]
        r = c.chat.completions.create(model="m", messages=messages, tools=SCHEMAS)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content == "I will search."
        assert msg.tool_calls[0].function.name == "search" and json.loads(msg.tool_calls[0].function.arguments) == {"query": "Ada"}
        messages += [msg.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "Ada Lovelace: born 1815."}]
        r2 = c.chat.completions.create(model="m", messages=messages, tools=SCHEMAS)
        assert r2.choices[0].message.tool_calls[0].function.name == "answer"
        r3 = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=SCHEMAS)
        assert r3.choices[0].finish_reason == "stop" and "<tool_call>" in r3.choices[0].message.content
        httpx.post(f"{url}/sessions/tools/end", json={"status": "terminated"})
    gw.batcher.close()
    m = gw.metrics()
    assert m["gateway/tool_calls"] == 2 and m["gateway/malformed_tool_calls"] == 1
    steps = read_pool(gw.pool.root).trajectories[0].steps
    assert steps[1].prompt_ids[: len(steps[0].prompt_ids) + len(steps[0].response_ids)] == \
        steps[0].prompt_ids + steps[0].response_ids  # the tool result extended the exact ids
    assert "Tools:" in chat.tokenizer.decode(steps[0].prompt_ids)  # ChatML has no tool list: described in the system turn
    assert "Ada Lovelace: born 1815." in chat.tokenizer.decode(steps[1].prompt_ids)


def test_a_restarted_pool_repairs_a_torn_tail_and_readers_skip_garbage(models, tmp_path):
    root = tmp_path / "pool"
    gw = gateway_for(models, root, limits=Limits(max_tokens=4))
    with BackgroundServer(create_app(gw)) as url:
        for i in range(2):
            client(url, f"s{i}").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            httpx.post(f"{url}/sessions/s{i}/end", json={"status": "terminated"})
    gw.batcher.close()
    path = root / "trajectories.jsonl"
    first = read_pool(root)
    assert len(first.trajectories) == 2 and first.offset == path.stat().st_size
    with open(path, "ab") as f:
        f.write(b'not json at all\n{"format": 1, "steps": [{"prompt_ids": [1]')  # garbage, then a torn write
    later = read_pool(root, first.offset)
    assert later.trajectories == [] and len(later.skipped) == 1  # the torn tail is not read yet
    pool = DataPool(root)  # a restart cuts the torn tail
    assert pool.torn_repaired > 0 and path.read_bytes().endswith(b"\n")
    assert len(read_pool(root).trajectories) == 2 and len(read_pool(root).skipped) == 1


def test_a_larger_max_tokens_than_the_runs_budget_is_clamped_and_counted(served):
    url, gw = served
    r = client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4096)
    assert r.usage.completion_tokens <= 16 and gw.metrics()["gateway/max_tokens_clamped"] == 1


def _staggered_agents(url, n, gap_s, prefix):
    errors = []

    def agent(i):
        try:
            time.sleep(i * gap_s)
            client(url, f"{prefix}-{i}").chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"room {i}"}], max_tokens=4, temperature=0)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, errors


def test_a_batch_waits_for_the_calls_it_expects_and_no_longer_than_its_window(models, tmp_path):
    """Four agents arriving 0.1 s apart are one generate call when four are expected; when only
    two of four expected arrive, the batch goes after the window, not never."""
    gw = gateway_for(models, tmp_path / "pool", limits=Limits(max_tokens=4, context_limit=1024),
                     batch_wait_s=1.5, expected=lambda: 4)
    with BackgroundServer(create_app(gw)) as url:
        threads, errors = _staggered_agents(url, 4, 0.1, "a")
        for t in threads:
            t.join()
        assert not errors and (gw.batcher.calls, gw.batcher.rows) == (1, 4)
        t0 = time.perf_counter()
        threads, errors = _staggered_agents(url, 2, 0.0, "b")
        for t in threads:
            t.join()
        waited = time.perf_counter() - t0
    gw.batcher.close()
    assert not errors and (gw.batcher.calls, gw.batcher.rows) == (2, 6)
    assert 1.4 < waited < 10


def test_generation_on_the_callers_thread_and_a_close_fails_what_is_queued(models, tmp_path):
    gw = gateway_for(models, tmp_path / "pool", limits=Limits(max_tokens=4, context_limit=1024), threaded=False)
    with BackgroundServer(create_app(gw)) as url:
        threads, errors = _staggered_agents(url, 3, 0.05, "c")
        gw.batcher.serve(until=lambda: not any(t.is_alive() for t in threads))  # returns once they are served
        assert not errors and gw.batcher.rows == 3
        assert threading.current_thread() is threading.main_thread()
        ids = gw.chat.conversation_ids([{"role": "user", "content": "hi"}])
        pending = gw.batcher.generate([ids], [4], [torch.Generator().manual_seed(0)], True, ["k"])
        gw.batcher.close()  # nobody serves it any more: the caller hears so instead of waiting forever
        with pytest.raises(RuntimeError, match="shutting down"):
            pending.result(timeout=5)
        late = gw.batcher.generate([ids], [4], [torch.Generator().manual_seed(0)], True, ["k"])
        with pytest.raises(RuntimeError, match="shutting down"):
            late.result(timeout=5)


def test_the_search_qa_example_sends_the_built_in_environments_prompt_token_for_token(models, tmp_path, monkeypatch):
    """examples/searchqa_agent.py lists its tools in the built-in environment's own words and
    passes them as ``tools=``: the gateway adds no second description, so its first prompt is the
    built-in engine's first prompt, id for id, and later calls extend it exactly."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    from examples import searchqa_agent as example

    env = example.SearchQAEnv(example.EnvSettings(max_steps=example.MAX_STEPS), **example.KB)
    task = env.tasks("dev")[0]
    gw = gateway_for(models, tmp_path / "pool", limits=Limits(max_tokens=16, context_limit=2048))
    with BackgroundServer(create_app(gw)) as url:
        example.run({"task_id": task.id}, f"{url}/sessions/ex/v1")
        gw.store.end("ex")
    gw.batcher.close()
    [traj] = read_pool(gw.pool.root).trajectories
    question, _ = env.reset(task)
    assert traj.steps[0].prompt_ids == models.chat.initial_prompt(env.instructions(), question, env.chat_tools())
    assert gw.counts["tools_listed_by_agent"] == len(traj.steps) >= 1
    for before, after in zip(traj.steps, traj.steps[1:]):
        assert after.prompt_ids[: len(before.prompt_ids) + len(before.response_ids)] == \
            before.prompt_ids + before.response_ids
