"""Run records: metrics.jsonl (one JSON object per iteration), evals.jsonl (each held-out
task's outcome per validation), sample trajectories (samples.jsonl), and the optional trackers
(TensorBoard, W&B, MLflow) fed the same numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from steppo.config import RunConfig


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


class RunLog:
    """Writes ``metrics.jsonl`` and forwards scalars to the configured trackers."""

    def __init__(self, out_dir: Path, run: RunConfig, config: dict[str, Any], resume_after: int | None = None,
                 say=lambda *_: None):
        """`resume_after`: the iteration a resumed run continues after: records of later
        iterations (written after that checkpoint) and a torn last line are dropped, so
        iterations never repeat (-1: drop every record, the run starts again)."""
        self.out_dir = out_dir
        self.metrics_path = out_dir / "metrics.jsonl"
        self.samples_path = out_dir / "samples.jsonl"
        self.evals_path = out_dir / "evals.jsonl"
        if resume_after is not None:
            for path in (self.metrics_path, self.samples_path, self.evals_path):
                note = self._truncate(path, resume_after)
                if note:
                    say(note)
        self._tb = self._wandb = self._mlflow = None
        trackers = run.trackers
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_after is None else max(resume_after + 1, 0)  # drop events of replayed iterations
            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge)
        if "wandb" in trackers:
            import wandb

            self._wandb = wandb.init(project=run.wandb_project, entity=run.wandb_entity, group=run.wandb_group,
                                     tags=list(run.wandb_tags) or None, dir=str(out_dir), config=config,
                                     name=out_dir.name, resume="allow")
        if "mlflow" in trackers:
            import mlflow

            if run.mlflow_uri:
                mlflow.set_tracking_uri(run.mlflow_uri)
            mlflow.set_experiment(run.mlflow_experiment or out_dir.name)
            self._mlflow = mlflow
            mlflow.start_run(run_name=out_dir.name)
            mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})

    @staticmethod
    def _truncate(path: Path, last_iteration: int) -> str | None:
        """Drop records written after the checkpoint we resume from, and lines that are not
        whole JSON records (a write cut short by a kill or a full disk); what was dropped."""
        if not path.exists():
            return None
        raw = path.read_bytes().decode("utf-8", errors="replace")
        kept, later, torn = [], 0, 0
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if not isinstance(record, dict) or record.get("iteration", -1) > last_iteration:
                later += 1
                continue
            kept.append(line)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        notes = []
        if torn:
            notes.append(f"{torn} torn line{'s' if torn > 1 else ''} (an interrupted write)")
        if later:
            notes.append(f"{later} record{'s' if later > 1 else ''} after iteration {last_iteration}")
        return f"{path.name}: dropped {' and '.join(notes)}" if notes else None

    def log(self, metrics: dict[str, Any]) -> None:
        record = dict(metrics)  # NaN/inf stay NaN/Infinity (json allow_nan): a failure is not a missing value
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = int(metrics.get("iteration", 0))
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration" and _clean(v) is not None}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=step)

    def samples(self, records: list[dict[str, Any]]) -> None:
        self._append(self.samples_path, records)

    def outcomes(self, record: dict[str, Any]) -> None:
        """One validation's per-task outcomes (see `steppo.evaluate.outcome_record`)."""
        self._append(self.evals_path, [record])

    @staticmethod
    def _append(path: Path, records: list[dict[str, Any]]) -> None:
        with path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class NoLog:
    """The run log of ranks other than 0 (which writes the run directory)."""

    def log(self, metrics: dict) -> None:
        pass

    def samples(self, records: list) -> None:
        pass

    def outcomes(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def sample_records(it: int, trajs: list, scored, credit, tokenizer, ratios=None) -> list[dict[str, Any]]:
    """samples.jsonl records of the first trajectories of a batch (`scored` / `credit` / `ratios`
    of the update, in the batch's step order). Per step:

    - the step's new tokens: step 0 stores its whole prompt (``prompt_ids``, ``prompt_text``,
      ``full_prompt: true``); a later step whose prompt extends the previous step's prompt +
      response (the cumulative context) stores only the ids appended since then, the
      observation turn (``new_ids``, ``new_text``, ``full_prompt: false``), so step t's prompt
      is step t-1's prompt + response + step t's ``new_ids``; a prompt that does not extend it
      (``window`` / ``env`` contexts) is stored whole again with ``full_prompt: true``;
    - ``response_ids`` / ``response_text``, ``reward``, the critic's ``value``, ``advantage``,
      ``observation`` (the environment's answer to the response);
    - ``ratio``: the step's importance ratio in the update's last epoch (the geometric mean of
      its token ratios) and ``clipped``: whether it lay outside [1 - clip_low, 1 + clip_high]
      (None when not recorded; see `steppo.trainer.update.StepRatios`).
    """
    records, s = [], 0
    for traj in trajs:
        steps, previous = [], None
        for step in traj.steps:
            prompt = list(step.prompt_ids)
            if previous is not None and prompt[: len(previous)] == previous:
                new = prompt[len(previous):]
                text = {"new_text": tokenizer.decode(new), "new_ids": new, "full_prompt": False}
            else:
                text = {"prompt_text": tokenizer.decode(prompt), "prompt_ids": prompt, "full_prompt": True}
            previous = prompt + list(step.response_ids)
            ratio = float(ratios.ratio[s]) if ratios is not None and ratios.ratio is not None else math.nan
            steps.append({
                **text,
                "response_text": tokenizer.decode(step.response_ids),
                "response_ids": step.response_ids,
                "reward": step.reward,
                "value": float(scored.step_values[s]) if scored.step_values is not None else None,
                "advantage": float(credit.step_advantages[s]),
                "ratio": None if math.isnan(ratio) else ratio,
                "clipped": None if math.isnan(ratio) else bool(ratios.clipped[s]),
                "observation": step.info.get("observation"),
            })
            s += 1
        records.append({"iteration": it, "trajectory": traj.id, "task": traj.task_id, "success": traj.success,
                        "end_reason": traj.end_reason, "steps": steps})
    return records
