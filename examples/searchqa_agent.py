"""A search-QA agent written only against the `openai` SDK, with tool calling, trained by StepPO
through the gateway (``env=agent``): nothing in it knows about StepPO's training.

    python examples/searchqa_agent.py tasks.jsonl          # write the task file (synthetic KB)
    steppo train env=agent env.params.entrypoint=examples.searchqa_agent:run \\
        env.params.tasks=tasks.jsonl sft.enabled=false

Its tools (`search`, `answer`) run here, in the agent's process, over the synthetic knowledge
base of the built-in `searchqa` environment (same questions, same BM25 search, same reward:
exact match), so its learning curve can be set beside the built-in environment's. Each task
line names its question and the knowledge base it comes from (``kb``: the `searchqa` params),
so a task file written for one KB plays the same questions wherever it is read.
"""

from __future__ import annotations

import functools
import json

import openai

from steppo.envs.actions import ToolCall, openai_tools, render_tool_call
from steppo.envs.base import EnvSettings
from steppo.envs.searchqa import TOOLS, SearchQAEnv

MAX_STEPS = 4
KB = {"source": "synthetic", "num_tasks": {"train": 400, "dev": 50, "test": 50}}
TOOL_LIST = openai_tools(TOOLS)
CLIENT = openai.OpenAI(base_url="http://127.0.0.1", api_key="steppo", max_retries=0)  # one connection pool


@functools.cache
def _tasks(kb: str) -> dict:
    env = SearchQAEnv(EnvSettings(max_steps=MAX_STEPS), **json.loads(kb))
    return {t.id: t for split in ("train", "dev", "test") for t in env.tasks(split)}


def task_env(task: dict, max_steps: int = MAX_STEPS) -> tuple[SearchQAEnv, str]:
    """The search engine and grader of a task line (its KB), reset to its question."""
    kb = task.get("kb", KB)
    env = SearchQAEnv(EnvSettings(max_steps=max_steps), **kb)
    question, _ = env.reset(_tasks(json.dumps(kb, sort_keys=True))[task["task_id"]])
    return env, question


def run(task: dict, base_url: str) -> dict:
    """One episode: ask, search, answer. Returns the reward (exact match) and success."""
    client = CLIENT.with_options(base_url=base_url)
    env, question = task_env(task)
    # The built-in environment's own instructions, tool list included (as it shows them to a model
    # whose chat template has no tool list, e.g. SmolLM2's): the gateway sees the schemas listed and
    # adds no second description, so the model reads exactly the built-in environment's prompt.
    messages = [{"role": "system", "content": env.instructions()}, {"role": "user", "content": question}]
    for _ in range(MAX_STEPS):
        reply = client.chat.completions.create(model="policy", messages=messages, tools=TOOL_LIST)
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            result = env.step(message.content or "")  # the grader counts the step as malformed
            follow = {"role": "user", "content": result.observation}
        else:
            call = message.tool_calls[0]
            result = env.step(render_tool_call(ToolCall(call.function.name, json.loads(call.function.arguments))))
            follow = {"role": "tool", "tool_call_id": call.id, "content": result.observation}
        if result.terminated or result.truncated:
            return {"reward": result.reward, "success": bool(result.info.get("success")),
                    "status": "terminated" if result.terminated else "truncated"}
        messages.append(follow)
    return {"reward": 0.0, "success": False, "status": "truncated"}


def write_tasks(path: str, train: int = 400, dev: int = 50, kb: dict | None = None) -> None:
    """The task file: one line per question ({"id", "split", "task_id", "kb"}), the first `train`
    and `dev` questions of the KB's splits in the built-in environment's order."""
    kb = kb or KB
    env = SearchQAEnv(EnvSettings(max_steps=MAX_STEPS), **kb)
    with open(path, "w") as f:
        for split, n in (("train", train), ("dev", dev)):
            for t in env.tasks(split)[:n]:
                f.write(json.dumps({"id": t.id, "split": split, "task_id": t.id, "kb": kb}) + "\n")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write the task file")
    ap.add_argument("path", nargs="?", default="tasks.jsonl")
    ap.add_argument("--kb", type=json.loads, default=None, help="searchqa params as JSON (default: KB)")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--dev", type=int, default=50)
    a = ap.parse_args()
    write_tasks(a.path, a.train, a.dev, a.kb)
