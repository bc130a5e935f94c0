"""Held-out evaluation of a checkpoint or a model on an environment split (``steppo eval``)."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from steppo.config import Config
from steppo.envs.registry import env_factory
from steppo.models.build import build_models, resolve_base_model
from steppo.rollout.engine import FAILED, RolloutEngine, RolloutResult
from steppo.rollout.local import LocalBackend


def _model_source(cfg: Config, checkpoint: Path | None, corpus) -> tuple[Any, Path, Path | None]:
    """(model config, base weights, adapter/policy dir) for a checkpoint or a model name."""
    m = cfg.model
    if checkpoint is not None:
        policy_dir = checkpoint / "policy" if (checkpoint / "policy").exists() else checkpoint
        adapter = policy_dir / "adapter_config.json"
        if adapter.exists():
            meta = json.loads(adapter.read_text())
            m = dataclasses.replace(m, lora_rank=int(meta.get("r", 8)))
            return m, Path(meta["base_model_name_or_path"]), policy_dir
        return dataclasses.replace(m, lora_rank=0), policy_dir, None
    base = resolve_base_model(m.name, Path(cfg.run.output_dir), corpus, m.tiny_size, m.tiny_vocab,
                              cfg.run.seed, cfg.run.cache_dir)
    return dataclasses.replace(m, lora_rank=0), base, None


def summarize(result: RolloutResult) -> dict[str, Any]:
    """Success, score, steps, invalid-action and truncation rates, overall and per task type.

    Episodes the environment failed (``env_error`` / ``env_timeout``) are not outcomes: success
    and score are over the others, failures are counted in ``env_failures``; when more than half
    failed, ``valid`` is false and success and score are None (not a score)."""
    eps = result.episodes

    def stats(group) -> dict[str, Any]:
        n = max(len(group), 1)
        steps = sum(len(e.steps) for e in group)
        ok = [e for e in group if e.end_reason not in FAILED]
        failed = len(group) - len(ok)
        valid = not (group and failed * 2 > len(group))
        return {
            "episodes": len(group),
            "env_failures": failed,
            "valid": valid,
            "success": (sum(e.success for e in ok) / max(len(ok), 1)) if valid else None,
            "score": (float(np.mean([sum(s.reward for s in e.steps) for e in ok])) if ok else 0.0) if valid else None,
            "mean_steps": steps / n,
            "invalid_action_rate": sum(e.invalid_actions for e in group) / max(steps, 1),
            "truncation_rate": sum(e.end_reason != "terminated" for e in group) / n,
        }

    out = stats(eps)
    by_type: dict[str, list] = defaultdict(list)
    for e in eps:
        if "task_type" in e.task.payload:
            by_type[e.task.payload["task_type"]].append(e)
    if by_type:
        out["by_task_type"] = {k: stats(v) for k, v in sorted(by_type.items())}
    return out


def evaluate(cfg: Config, checkpoint: Path | None = None, split: str | None = None,
             episodes: int | None = None, greedy: bool = True) -> dict[str, Any]:
    make_env = env_factory(cfg.env)
    env = make_env()
    split = split or cfg.env.eval_split
    tasks = env.tasks(split)[: episodes or cfg.trainer.eval_episodes]
    from steppo.trainer.trainer import env_corpus

    model_cfg, base, policy_dir = _model_source(
        cfg, checkpoint, lambda: env_corpus(make_env(), env.tasks(cfg.env.train_split))
    )
    models = build_models(model_cfg, base_path=base, with_critic=False, shared_critic=False,
                          with_reference=False, temperature=cfg.rollout.temperature, policy_dir=policy_dir)
    models.policy.eval()
    engine = RolloutEngine(
        make_env, models.chat,
        LocalBackend(models.policy.model, {models.chat.end_of_turn_id}, cfg.rollout.temperature,
                     models.tokenizer.pad_token_id,
                     kv_cache=cfg.rollout.kv_cache and cfg.rollout.context == "cumulative"),
        cfg.rollout, env.instructions(), env.settings,
    )
    try:
        result = engine.run(tasks, [t.id for t in tasks], cfg.run.seed, iteration="eval", greedy=greedy)
    finally:
        engine.close()
        env.close()
    summary = {
        "environment": cfg.env.name,
        "split": split,
        "model": str(checkpoint) if checkpoint else cfg.model.name,
        "decoding": "greedy" if greedy else f"sampled (T={cfg.rollout.temperature})",
        "seed": cfg.run.seed,
        **summarize(result),
    }
    return summary


def format_table(summary: dict[str, Any]):
    from rich.table import Table

    caption = None
    if not summary.get("valid", True):
        caption = (f"n/a ({summary['env_failures']} of {summary['episodes']} episodes failed in the environment): "
                   "not a score")
    table = Table(title=f"{summary['environment']} / {summary['split']} / {summary['model']} ({summary['decoding']})",
                  caption=caption)
    cols = ["episodes", "success", "score", "mean_steps", "invalid_action_rate", "truncation_rate", "env_failures"]
    table.add_column("rows")
    for c in cols:
        table.add_column(c, justify="right")
    rows = [("all", summary)] + list(summary.get("by_task_type", {}).items())
    for name, s in rows:
        table.add_row(name, *["n/a" if s[c] is None else f"{s[c]:.3f}" if isinstance(s[c], float) else str(s[c])
                              for c in cols])
    return table
