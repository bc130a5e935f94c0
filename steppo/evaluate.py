"""Held-out evaluation: one path for training's validations, ``steppo eval`` and ``steppo compare``.

`evaluate(generation, tasks, greedy, tag)` plays each task once through the run's generation
side (so ``rollout.backend=vllm`` evaluates with vLLM too) and returns metrics in one
vocabulary, the rollout's (`steppo.rollout.engine.RolloutResult.metrics`): ``success``,
``score``, ``steps_mean``, ``truncated_frac``, ``invalid_action_frac``,
``malformed_action_frac``, ``env_failures``, ``valid``, ``time_s`` (the evaluation's wall
time), ..., prefixed ``eval/`` (greedy) or
``eval_sampled/`` (sampled). ``steppo eval`` prints the same keys without a prefix.

Episodes the environment failed (``env_error`` / ``env_timeout``) are not outcomes: success
and score are over the others; when more than half failed the evaluation is not a score
(``valid`` false, success and score NaN in metrics, None in ``steppo eval``'s JSON).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steppo.config import Config

if TYPE_CHECKING:
    from steppo.envs.base import Task
    from steppo.rollout.engine import RolloutResult
    from steppo.trainer.generation import Generation

# per-run throughput numbers, not properties of a subset of episodes
_RUN_ONLY = ("generated_tokens", "generation_tokens_per_s")


def eval_invalid(failed: int, episodes: int) -> bool:
    """An evaluation is not a score when more than half its episodes failed in the environment."""
    return episodes > 0 and failed * 2 > episodes


def summarize(result: RolloutResult, by_task_type: bool = True) -> dict[str, Any]:
    """The metrics of one evaluation (no prefix), and per task type when tasks have one."""
    out: dict[str, Any] = result.metrics("")
    trajs = result.trajectories  # episodes with steps that the environment did not fail
    out["score"] = sum(t.total_reward for t in trajs) / len(trajs) if trajs else 0.0
    out["valid"] = not eval_invalid(len(result.failed), len(result.episodes))
    if not out["valid"]:
        out["success"] = out["score"] = float("nan")
    groups: dict[str, list] = defaultdict(list)
    for e in result.episodes:
        if by_task_type and "task_type" in e.task.payload:
            groups[e.task.payload["task_type"]].append(e)
    if groups:
        out["by_task_type"] = {
            k: {m: v for m, v in summarize(_subset(result, eps), False).items() if m not in _RUN_ONLY}
            for k, eps in sorted(groups.items())
        }
    return out


def _subset(result: RolloutResult, episodes: list) -> RolloutResult:
    """The result restricted to `episodes` (one task type)."""
    tasks = {e.task.id for e in episodes}
    return dataclasses.replace(result, episodes=episodes, trajectories=[t for t in result.trajectories if t.task_id in tasks])


def outcome_record(tag: Any, greedy: bool, tasks: list[Task], result: RolloutResult) -> dict[str, Any]:
    """evals.jsonl's line for one validation: ``outcomes`` in `tasks` order, ``1`` success,
    ``0`` failure, ``x`` an episode the environment failed (paired task-level statistics in
    `steppo.report` read it)."""
    failed = {id(e) for e in result.failed}
    by_task = {e.task.id: "x" if id(e) in failed else str(int(bool(e.success))) for e in result.episodes}
    return {"iteration": 0 if tag in ("before", "sft") else tag, "mode": "greedy" if greedy else "sampled",
            "first_task": tasks[0].id if tasks else None, "outcomes": "".join(by_task.get(t.id, "x") for t in tasks)}


def evaluate(generation: Generation, tasks: list[Task], greedy: bool, tag: Any = "eval", runlog=None,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Play each of `tasks` once; metrics prefixed ``eval/`` (greedy) or ``eval_sampled/``.
    `runlog` (a `RunLog`) receives the per-task outcomes."""
    mode = "greedy" if greedy else "sampled"
    t0 = time.perf_counter()
    result = generation.play(tasks, [t.id for t in tasks], f"eval-{tag}-{mode}", greedy=greedy)
    summary = summarize(result)
    summary.pop("by_task_type", None)
    summary["time_s"] = time.perf_counter() - t0
    if runlog is not None:
        runlog.outcomes(outcome_record(tag, greedy, tasks, result))
    if not summary["valid"]:
        say(f"warning: evaluation {tag} ({mode}) is not valid: {len(result.failed)} of {len(result.episodes)} "
            f"episodes failed in the environment (env_error/env_timeout; first error: {result.failed[0].error})")
    prefix = "eval/" if greedy else "eval_sampled/"
    return {prefix + k: v for k, v in summary.items()}


def success_of(metrics: dict, mode: str) -> float | str:
    """The held-out success of `mode` (eval / eval_sampled), or, for an evaluation that is not
    valid, the text ``n/a (k of n episodes failed in the environment)``."""
    if metrics.get(f"{mode}/valid", True):
        return metrics[f"{mode}/success"]
    k, n = int(metrics[f"{mode}/env_failures"]), int(metrics[f"{mode}/episodes"])
    return f"n/a ({k} of {n} episodes failed in the environment)"


def describe(metrics: dict, cfg: Config, episodes: int) -> str:
    """'0.625 greedy, 0.600 sampled (T=1.0) on 200 dev episodes'."""
    def fmt(mode: str) -> str:
        v = success_of(metrics, mode)
        return v if isinstance(v, str) else f"{v:.3f}"

    parts = [f"{fmt('eval')} greedy"]
    if "eval_sampled/success" in metrics:
        parts.append(f"{fmt('eval_sampled')} sampled (T={cfg.rollout.temperature})")
    return ", ".join(parts) + f" on {episodes} {cfg.env.eval_split} episodes"


# ----------------------------------------------------------------------------- steppo eval


def _model_source(cfg: Config, checkpoint: Path | None, corpus) -> tuple[Any, Path, Path | None]:
    """(model config, base weights, adapter/policy dir) for a checkpoint or a model name."""
    from steppo.models.build import resolve_base_model

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


def _is_model_dir(path: Path) -> bool:
    """A checkpoint (``policy/`` inside) or a model directory (Hugging Face or LoRA adapter)."""
    return (path / "policy").is_dir() or (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def resolve_checkpoint(path: str | Path, say: Callable[[str], None] = print) -> tuple[Path, Path | None]:
    """What ``steppo eval --checkpoint PATH`` evaluates: (checkpoint or model directory, the run
    directory it belongs to, or None). PATH is a checkpoint directory
    (``runs/x/checkpoints/iter_000060``), the ``runs/x/checkpoints/latest`` file (it names the
    newest checkpoint), a run directory (``runs/x``: its newest intact checkpoint, newer broken
    ones reported through `say`) or its ``checkpoints/`` directory, or a model directory
    (``runs/x/sft_model``, a Hugging Face directory). Anything else is a `ConfigError`."""
    from steppo.config import ConfigError
    from steppo.trainer import checkpoint as ckpt

    given = path = Path(path)
    if not path.exists():
        raise ConfigError(f"--checkpoint {given} does not exist")
    if path.is_file():
        if path.name != ckpt.LATEST:
            raise ConfigError(f"--checkpoint {given} is a file; pass a checkpoint directory "
                              f"(runs/x/checkpoints/iter_N), runs/x/checkpoints/{ckpt.LATEST}, or a run directory")
        name = path.read_text().strip()
        path = path.parent / name
        if not name or not _is_model_dir(path):
            raise ConfigError(f"--checkpoint {given} names checkpoint {name!r}, which is not a checkpoint in "
                              f"{given.parent}")
    if _is_model_dir(path):
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return path, run if (run / "config.yaml").is_file() else None
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path if path.name == "checkpoints" else None
    if root is None:
        raise ConfigError(f"--checkpoint {given} is neither a checkpoint directory (runs/x/checkpoints/iter_N, "
                          f"with policy/ inside), nor runs/x/checkpoints/{ckpt.LATEST}, nor a run directory (with "
                          f"checkpoints/ and config.yaml)")
    for candidate in ckpt.checkpoints(root):
        problem = ckpt.verify(candidate)
        if problem is None:
            run = root.parent
            return candidate, run if (run / "config.yaml").is_file() else None
        say(f"eval: skipping checkpoint {candidate}: {problem}")
    raise ConfigError(f"--checkpoint {given}: no intact checkpoint in {root}")


def checkpoint_config(checkpoint: str | Path | None, path: str | Path | None = None,
                      overrides: list[str] | None = None,
                      say: Callable[[str], None] = print) -> tuple[Config, Path | None]:
    """``steppo eval``'s config and checkpoint: the run's saved ``config.yaml`` when the
    checkpoint belongs to a run (so a TextWorld run is evaluated on its TextWorld games, with its
    context policy and settings), then the ``--config`` file, then the overrides, as
    `steppo.config.load_config` layers them; without a run, `load_config` (the defaults)."""
    from steppo.config import ConfigError, _build, load_config, parse_overrides, read_yaml

    if checkpoint is None:
        return load_config(path, overrides), None
    checkpoint, run = resolve_checkpoint(checkpoint, say)
    if run is None:
        return load_config(path, overrides), checkpoint
    saved = read_yaml(run / "config.yaml", "saved run config")
    layers = [saved, *([read_yaml(path)] if path is not None else []), parse_overrides(overrides or [])]
    try:
        cfg = _build(layers)
    except ConfigError as exc:
        raise ConfigError(f"{run / 'config.yaml'} with the overrides given: {exc}") from exc
    say(f"eval: {checkpoint} with its run's config {run / 'config.yaml'} (env.name={cfg.env.name})")
    return cfg, checkpoint


def evaluate_checkpoint(cfg: Config, checkpoint: Path | None = None, split: str | None = None,
                        episodes: int | None = None, greedy: bool = True) -> dict[str, Any]:
    """``steppo eval``: a checkpoint (or ``model.name``) on `split`, through the same
    generation side as training (``rollout.backend`` honoured); `summarize`'s keys."""
    from steppo.envs.registry import env_factory, with_tools
    from steppo.models.build import build_models
    from steppo.models.builtin import env_corpus
    from steppo.trainer.generation import Generation

    make_env = env_factory(cfg.env)
    env = make_env()
    split = split or cfg.env.eval_split
    tasks = env.tasks(split)[: episodes or cfg.trainer.eval_episodes]
    model_cfg, base, policy_dir = _model_source(
        cfg, checkpoint, lambda: env_corpus(make_env(), env.tasks(cfg.env.train_split)))
    models = build_models(model_cfg, base_path=base, with_critic=False, shared_critic=False,
                          with_reference=False, temperature=cfg.rollout.temperature, policy_dir=policy_dir)
    models.policy.eval()
    make_env = with_tools(make_env, models.chat)
    env.settings = make_env.settings
    generation = Generation(cfg, models, env, make_env, own_copy=False)
    try:
        result = generation.play(tasks, [t.id for t in tasks], "eval", greedy=greedy)
    finally:
        generation.close()
        env.close()
    summary = summarize(result)
    for key in ("success", "score"):  # JSON: a missing score, not NaN
        if isinstance(summary[key], float) and math.isnan(summary[key]):
            summary[key] = None
    return {"environment": cfg.env.name, "split": split, "model": str(checkpoint) if checkpoint else cfg.model.name,
            "decoding": "greedy" if greedy else f"sampled (T={cfg.rollout.temperature})", "seed": cfg.run.seed,
            **summary}


def serve_checkpoint(cfg: Config, checkpoint: Path | None, pool: Path, host: str = "127.0.0.1", port: int = 8000,
                     api_key: str | None = None, say: Callable[[str], None] = print) -> None:
    """``steppo serve``: the agent gateway (`steppo.gateway`) over a checkpoint's policy (or
    ``model.name``), finished sessions appended to the data pool in `pool`, until interrupted."""
    from steppo.envs.registry import env_factory
    from steppo.gateway.server import BackgroundServer, create_app
    from steppo.gateway.service import Limits, gateway_for
    from steppo.models.build import build_models
    from steppo.models.builtin import env_corpus

    make_env = env_factory(cfg.env)
    model_cfg, base, policy_dir = _model_source(
        cfg, checkpoint, lambda: env_corpus(make_env(), make_env().tasks(cfg.env.train_split)))
    models = build_models(model_cfg, base_path=base, with_critic=False, shared_critic=False, with_reference=False,
                          temperature=cfg.rollout.temperature, policy_dir=policy_dir)
    models.policy.eval()
    limits = Limits(max_tokens=cfg.rollout.max_new_tokens or 512, context_limit=cfg.rollout.context_limit)
    from steppo.trainer.generation import make_backend

    gateway = gateway_for(models, pool, temperature=cfg.rollout.temperature, limits=limits,
                          model_name=str(checkpoint or cfg.model.name), threaded=False,
                          backend=make_backend(cfg, models, models.policy.model))  # rollout.backend=vllm: vLLM
    say(f"serving {gateway.model_name} on http://{host}:{port}/v1 (a session: http://{host}:{port}/sessions/ID/v1); "
        f"tools: {'the template' if models.chat.native_tools else 'system prompt'}, {models.chat.tool_syntax} syntax; "
        f"pool: {pool}")
    import signal

    def stop(signum, frame):  # SIGTERM ends the server as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:  # HTTP on a thread; generation on this one (see `steppo.gateway.service.Batcher`)
        with BackgroundServer(create_app(gateway, api_key=api_key), host=host, port=port):
            gateway.batcher.serve()
    except KeyboardInterrupt:
        say("stopped")
    finally:
        gateway.batcher.close()
        signal.signal(signal.SIGTERM, previous)


def export_checkpoint(cfg: Config, checkpoint: Path, out: Path) -> Path:
    """``steppo export``: the checkpoint's policy as a plain Hugging Face model directory (LoRA
    adapters merged, tokenizer and chat template included) that transformers or vLLM load with
    no StepPO code. Refuses to write into a non-empty directory."""
    from steppo.config import ConfigError
    from steppo.models.build import build_models
    from steppo.models.policy import save_merged

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; choose a new directory")
    model_cfg, base, policy_dir = _model_source(cfg, checkpoint, lambda: [])
    models = build_models(model_cfg, base_path=base, with_critic=False, shared_critic=False,
                          with_reference=False, temperature=cfg.rollout.temperature, policy_dir=policy_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_merged(models.policy.model, out)
    models.tokenizer.save_pretrained(out)
    return out


def format_table(summary: dict[str, Any]):
    from rich.table import Table

    caption = None
    if not summary.get("valid", True):
        caption = (f"n/a ({summary['env_failures']} of {summary['episodes']} episodes failed in the environment): "
                   "not a score")
    table = Table(title=f"{summary['environment']} / {summary['split']} / {summary['model']} ({summary['decoding']})",
                  caption=caption)
    cols = ["episodes", "success", "score", "steps_mean", "invalid_action_frac", "truncated_frac", "env_failures"]
    table.add_column("rows")
    for c in cols:
        table.add_column(c, justify="right")
    rows = [("all", summary)] + list(summary.get("by_task_type", {}).items())
    for name, s in rows:
        table.add_row(name, *["n/a" if s[c] is None else f"{s[c]:.3f}" if isinstance(s[c], float) else str(s[c])
                              for c in cols])
    return table
