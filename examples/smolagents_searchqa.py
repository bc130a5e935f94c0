"""The search-QA agent built with a real agent framework (smolagents' ToolCallingAgent, from
PyPI), pointed at the gateway: the framework writes its own prompts and memory; StepPO only
sets its base URL.

    steppo train env=agent env.params.entrypoint=examples.smolagents_searchqa:run \\
        env.params.tasks=tasks.jsonl sft.enabled=false      # tasks: examples/searchqa_agent.py

smolagents re-renders its memory on every call (observations as its own user messages), so
the gateway starts a new chain per call and counts it (``gateway/retokenized_turns``): the
steps are still the exact ids each call saw and sampled.
"""

from __future__ import annotations

from smolagents import OpenAIServerModel, Tool, ToolCallingAgent

from examples.searchqa_agent import MAX_STEPS, task_env
from steppo.envs.actions import ToolCall, render_tool_call
from steppo.envs.qa_data import exact_match
from steppo.envs.searchqa import SearchQAEnv


class Search(Tool):
    name = "search"
    description = "Search the passage collection; returns the best-matching passages."
    inputs = {"query": {"type": "string", "description": "keywords, e.g. an entity name"}}
    output_type = "string"

    def __init__(self, env: SearchQAEnv):
        super().__init__()
        self.env = env

    def forward(self, query: str) -> str:
        return self.env.step(render_tool_call(ToolCall("search", {"query": query}))).observation


def run(task: dict, base_url: str) -> dict:
    env, question = task_env(task, MAX_STEPS + 1)
    model = OpenAIServerModel(model_id="policy", api_base=base_url, api_key="steppo", max_tokens=48)
    agent = ToolCallingAgent(tools=[Search(env)], model=model, max_steps=MAX_STEPS, verbosity_level=0)
    answer = str(agent.run(question))
    gold = env._questions[env.task.payload["qid"]].answers
    reward = float(max(exact_match(answer, g) for g in gold))
    return {"reward": reward, "success": reward > 0}
