"""Shared builders for tests: random trajectories with exact cumulative or re-rendered contexts."""

from __future__ import annotations

import random

import pytest
import torch

from steppo.core.records import Step, Trajectory


def make_trajectory(
    rng: random.Random,
    traj_id: str,
    group_id: str = "g0",
    num_steps: int | None = None,
    cumulative: bool | None = None,
    end: str | None = None,
    vocab: int = 50,
    anchors: int = 3,
    with_bootstrap: bool | None = None,
    first_prompt: list[int] | None = None,
) -> Trajectory:
    """A random episode. Cumulative contexts make step t+1's prompt = prompt + response + obs;
    otherwise some steps re-render their prompt (a fresh token list), starting a new chain."""
    num_steps = num_steps or rng.randint(1, 5)
    cumulative = rng.random() < 0.7 if cumulative is None else cumulative
    end = end or rng.choice(["terminated", "truncated"])
    steps: list[Step] = []
    prompt = list(first_prompt) if first_prompt else [rng.randrange(1, vocab) for _ in range(rng.randint(1, 6))]
    for t in range(num_steps):
        response = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 6))]
        last = t == num_steps - 1
        steps.append(
            Step(
                prompt_ids=list(prompt),
                response_ids=response,
                logprobs=[-rng.random() * 3 for _ in response],
                reward=rng.choice([0.0, 0.0, 1.0, -0.5]),
                terminated=last and end == "terminated",
                truncated=last and end == "truncated",
                anchor=f"s{rng.randrange(anchors)}" if rng.random() < 0.8 else None,
            )
        )
        obs = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 4))]
        if cumulative or rng.random() < 0.5:
            prompt = prompt + response + obs
        else:
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 6))]
    bootstrap = None
    if end == "truncated" and (with_bootstrap if with_bootstrap is not None else rng.random() < 0.5):
        bootstrap = list(prompt)
    return Trajectory(steps=steps, id=traj_id, group_id=group_id, bootstrap_ids=bootstrap)


def make_batch(seed: int, num: int = 6, groups: int = 2, shared_prompts: bool = True, **kw) -> list[Trajectory]:
    """Random trajectories; members of a group start from the same task prompt (as group
    sampling does) unless `shared_prompts` is off."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 50) for _ in range(rng.randint(1, 8))] for _ in range(groups)]
    return [
        make_trajectory(rng, f"t{i}", f"g{i % groups}", first_prompt=prompts[i % groups] if shared_prompts else None, **kw)
        for i in range(num)
    ]


def visibility(layout) -> torch.Tensor:
    """(R, L, L) bool: which positions each position may read in `layout` (causal; restarting at
    position-id resets for packed rows; the explicit mask for tree rows)."""
    R, L = layout.input_ids.shape
    if layout.tree_mask is not None:
        return layout.tree_mask
    causal = torch.ones(L, L, dtype=torch.bool).tril().expand(R, L, L)
    if layout.kind != "packed":
        return causal
    starts = torch.ones_like(layout.position_ids, dtype=torch.bool)
    starts[:, 1:] = layout.position_ids[:, 1:] != layout.position_ids[:, :-1] + 1
    seq = torch.cumsum(starts.long(), 1)
    return causal & (seq.unsqueeze(2) == seq.unsqueeze(1))


def causal_readout(layout, salt: float = 0.0) -> torch.Tensor:
    """(R, L, 3) outputs that depend only on the tokens (and positions) each position may read,
    like any causal model: used to check that layouts agree."""
    ids = layout.input_ids.double()
    pos = layout.position_ids.double()
    contrib = torch.sin(ids * 1.618 + pos * 0.37 + salt)  # (R, L): what token j contributes
    mixed = torch.einsum("rij,rj->ri", visibility(layout).double(), contrib)
    mixed = mixed + 0.11 * pos  # the reading position's own index matters too
    return torch.stack([torch.sin(mixed), torch.cos(mixed * 0.5), torch.tanh(mixed * 0.1)], -1)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny model + tokenizer trained on compass text (both tool-call and plain formats)."""
    from steppo.envs.compass import CompassEnv
    from steppo.models.builtin import build_tiny, env_corpus

    env = CompassEnv()
    corpus = env_corpus(env, env.tasks("train"), limit=100)
    tool_env = CompassEnv(action_format="tool_call")
    corpus += env_corpus(tool_env, tool_env.tasks("train"), limit=50)
    return build_tiny(corpus, tmp_path_factory.mktemp("tiny"), vocab_size=512, seed=0)


@pytest.fixture
def tiny_models(tiny_dir):
    from steppo.config import ModelConfig
    from steppo.models.build import build_models

    torch.manual_seed(0)
    return build_models(ModelConfig(device="cpu"), base_path=tiny_dir, with_critic=True, shared_critic=False,
                        with_reference=False, temperature=1.0)
