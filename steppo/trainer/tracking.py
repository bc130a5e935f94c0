"""Run records: metrics.jsonl (one JSON object per iteration), sample trajectories, and the
optional trackers (TensorBoard, W&B, MLflow) fed the same numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


class RunLog:
    """Writes ``metrics.jsonl`` and forwards scalars to the configured trackers."""

    def __init__(self, out_dir: Path, trackers: list[str], config: dict[str, Any],
                 wandb_project: str = "steppo", mlflow_uri: str | None = None, resume_after: int | None = None):
        self.out_dir = out_dir
        self.metrics_path = out_dir / "metrics.jsonl"
        self.samples_path = out_dir / "samples.jsonl"
        if resume_after is not None:
            self._truncate(self.metrics_path, resume_after)
            self._truncate(self.samples_path, resume_after)
        self._tb = self._wandb = self._mlflow = None
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if "wandb" in trackers:
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=str(out_dir), config=config,
                                     name=out_dir.name, resume="allow")
        if "mlflow" in trackers:
            import mlflow

            if mlflow_uri:
                mlflow.set_tracking_uri(mlflow_uri)
            mlflow.set_experiment(out_dir.name)
            self._mlflow = mlflow
            mlflow.start_run(run_name=out_dir.name)
            mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})

    @staticmethod
    def _truncate(path: Path, last_iteration: int) -> None:
        """Drop records written after the checkpoint we resume from."""
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", -1) <= last_iteration]
        path.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in metrics.items()}
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
        with self.samples_path.open("a") as f:
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
