"""The ``steppo`` command: train, eval, sft.

    steppo train                                  # the embedded default: tiny + SFT + StepPO on compass
    steppo train algo=grpo trainer.iterations=20 run.output_dir=runs/grpo
    steppo train run.output_dir=runs/default --resume   # the run's own config + only what you override
    steppo train run.output_dir=runs/default --overwrite                # delete that run, start again
    steppo eval --checkpoint runs/default/checkpoints/iter_000060 env=compass
    steppo sft run.output_dir=runs/sft            # warm start only, saved as a checkpoint
    steppo compare configs/compare/compass.yaml --jobs 2          # presets x seeds, one protocol
    steppo config                                 # every key, its default and what it does (--yaml)
    steppo view runs/default                      # one HTML page: every sampled step, values, advantages
    torchrun --nproc_per_node 8 -m steppo.cli train --config ...  # DDP / FSDP (trainer.parallel)

Heavy modules (torch, transformers) load inside the subcommands, so ``steppo --help`` and
``steppo config`` start quickly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from steppo.config import ConfigError, load_config, resume_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steppo", description="Step-level RL for LLM agents.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in [
        ("train", "train a policy (SFT warm start for tiny, then RL)"),
        ("sft", "behaviour cloning on expert trajectories only"),
        ("eval", "evaluate a checkpoint or model on an environment's held-out split"),
    ]:
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo=grpo trainer.iterations=10 "
                        "(before or after --config; they always apply after the file)")
        sp.add_argument("--config", help="YAML config file applied before the overrides")
        if name == "train":
            sp.add_argument("--resume", action="store_true",
                            help="continue the run in run.output_dir from its newest intact checkpoint, with its "
                                 "saved config.yaml plus only the keys given here (--config and overrides)")
            sp.add_argument("--force", action="store_true",
                            help="with --resume: allow changing keys that define the run (model, env, algorithm, "
                                 "seed)")
        if name in ("train", "sft"):
            sp.add_argument("--overwrite", action="store_true",
                            help="delete the run already in run.output_dir, then start a new one")
        if name == "eval":
            sp.add_argument("--checkpoint", help="checkpoint directory (…/checkpoints/iter_N), …/checkpoints/latest, "
                            "or a run directory (its newest intact checkpoint); the run's config.yaml is the base")
            sp.add_argument("--split", help="split to evaluate (default env.eval_split)")
            sp.add_argument("--episodes", type=int, help="episodes (default trainer.eval_episodes)")
            sp.add_argument("--sampled", action="store_true", help="sample instead of greedy decoding")
            sp.add_argument("--json", help="also write the summary to this file")
    xp = sub.add_parser("export", help="write a checkpoint's policy as a plain Hugging Face model (LoRA merged)")
    xp.add_argument("--checkpoint", required=True, help="checkpoint directory, …/checkpoints/latest, or a run directory")
    xp.add_argument("--out", required=True, help="new directory for the model (config.json, weights, tokenizer)")
    xp.add_argument("overrides", nargs="*", help="dotted overrides on top of the run's config")
    cp = sub.add_parser("compare", help="run a comparison protocol (presets x seeds) and write tables and plots")
    cp.add_argument("protocol", help="protocol YAML (configs/compare/*.yaml)")
    cp.add_argument("--jobs", type=int, default=2, help="runs in parallel (threads split between them)")
    cp.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    cp.add_argument("--presets", nargs="*", help="only these presets")
    cp.add_argument("--seeds", nargs="*", type=int, help="only these seeds")
    cp.add_argument("--out", help="results directory (default results/<protocol name>)")
    cp.add_argument("--runs", help="run directories (default runs/compare/<protocol name>)")
    sv = sub.add_parser("serve", help="the agent gateway: an OpenAI-compatible endpoint over a policy, recording "
                        "sessions as exact-token trajectories (see steppo.gateway)")
    sv.add_argument("overrides", nargs="*", help="dotted overrides (model.*, rollout.temperature, ...)")
    sv.add_argument("--checkpoint", help="checkpoint, …/checkpoints/latest or a run directory (default: model.name)")
    sv.add_argument("--pool", help="data pool directory (default <run.output_dir>/pool)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env STEPPO_API_KEY, else none)")
    gp = sub.add_parser("config", help="list every config key with its default and what it does")
    gp.add_argument("--yaml", action="store_true", help="print the defaults as a YAML config file instead")
    vp = sub.add_parser("view", help="write one HTML page of a run's sampled steps and curves (see steppo.view)")
    vp.add_argument("run", help="run directory (with samples.jsonl and metrics.jsonl)")
    vp.add_argument("--out", help="HTML file to write (default RUN/view.html)")
    vp.add_argument("--serve", action="store_true", help="serve the page on http://127.0.0.1:PORT/ instead")
    vp.add_argument("--port", type=int, default=8000, help="port for --serve (0: any free one)")
    vp.add_argument("--iteration", type=int, help="step charts of this iteration only (default: every iteration)")
    return p


def _console():
    from rich.console import Console

    # a log file or pipe: no 80-column wrapping of tables and messages
    return Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _say(console):
    """Messages as plain lines on stderr (paths unwrapped and copyable, no markup read into them)."""
    return lambda message: console.print(message, soft_wrap=True, markup=False, highlight=False)


def cmd_train(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from steppo.progress import IterationLines, describe_metrics, interactive
    from steppo.trainer.trainer import Trainer

    console = _console()
    if args.resume:
        if args.overwrite:
            raise ConfigError("--resume continues the run in run.output_dir and --overwrite deletes it; pass one")
        cfg, changes = resume_config(args.config, args.overrides, force=args.force)
        for line in changes:
            _say(console)(line)
    else:
        if args.force:
            raise ConfigError("--force only applies with --resume (it allows changing run-defining keys)")
        cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, log=_say(console))
    _INTERRUPTED["iteration"] = trainer.iteration
    show = cfg.run.progress and trainer.dist.is_main
    live = show and interactive() and interactive(console.file)  # a bar on a terminal; else a line per iteration
    try:
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, disable=not live,
        ) as bar:
            task = bar.add_task(f"{cfg.algo.name} on {cfg.env.name}", total=cfg.trainer.iterations,
                                completed=trainer.iteration, info="")
            lines = IterationLines(cfg.trainer.iterations, start=trainer.iteration)

            def progress(it: int, total: int, m: dict) -> None:
                _INTERRUPTED["iteration"] = it
                if _INTERRUPTED.get("requested"):  # a Ctrl-C something swallowed: stop here
                    raise KeyboardInterrupt
                if live:
                    bar.update(task, completed=it, info=describe_metrics(m))
                elif show:
                    lines(it, total, m)

            summary = trainer.train(progress)
    finally:
        trainer.close()
    if not trainer.dist.is_main:
        return 0
    table = Table(title=f"StepPO run: {cfg.run.output_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    last = summary.get("last", {})
    rows = [
        ("algorithm", cfg.algo.name), ("environment", cfg.env.name), ("model", cfg.model.name),
        ("iterations", str(trainer.iteration)), ("env steps", str(trainer.env_steps)),
        ("held-out success before RL (greedy)", _fmt(summary.get("eval/success_before"))),
        ("held-out success after RL (greedy)", _fmt(summary.get("eval/success_after"))),
        ("held-out success before RL (sampled)", _fmt(summary.get("eval_sampled/success_before"))),
        ("held-out success after RL (sampled)", _fmt(summary.get("eval_sampled/success_after"))),
        ("last train success", _fmt(last.get("train/success"))),
        ("wall time", f"{time.perf_counter() - t0:.0f} s"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    print(json.dumps({k: v for k, v in summary.items() if k != "last"}, default=str))
    return 0


def _fmt(v) -> str:
    if isinstance(v, str):  # e.g. "n/a (5 of 6 episodes failed in the environment)"
        return v
    return "-" if v is None else f"{v:.3f}"


def cmd_sft(args) -> int:
    from steppo.trainer.trainer import Trainer

    cfg = load_config(args.config, list(args.overrides) + ["sft.enabled=true"])
    console = _console()
    trainer = Trainer(cfg, overwrite=args.overwrite, log=_say(console))
    try:
        metrics = trainer.warm_start()
        metrics.update(trainer.evaluate("sft"))
        trainer.runlog.log({"iteration": 0, **metrics})
        path = trainer.save()
    finally:
        trainer.close()
    console.print(f"SFT checkpoint: {path}  (start runs from it with model.name={trainer.sft_dir})")
    print(json.dumps(metrics, default=str))
    return 0


def cmd_eval(args) -> int:
    from steppo.config import preflight
    from steppo.evaluate import checkpoint_config, evaluate_checkpoint, format_table

    # a checkpoint of a run: the run's config.yaml, then --config, then the overrides
    cfg, checkpoint = checkpoint_config(args.checkpoint, args.config, args.overrides, say=_say(_console()))
    preflight(cfg)
    summary = evaluate_checkpoint(cfg, checkpoint=checkpoint,
                                  split=args.split, episodes=args.episodes, greedy=not args.sampled)
    _console().print(format_table(summary))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def cmd_serve(args) -> int:
    import os

    from steppo.evaluate import checkpoint_config, serve_checkpoint

    if args.checkpoint:
        cfg, checkpoint = checkpoint_config(args.checkpoint, None, args.overrides, say=_say(_console()))
    else:
        cfg, checkpoint = load_config(None, args.overrides), None
    pool = Path(args.pool) if args.pool else Path(cfg.run.output_dir) / "pool"
    serve_checkpoint(cfg, checkpoint, pool, args.host, args.port, args.api_key or os.environ.get("STEPPO_API_KEY"),
                     say=_say(_console()))
    return 0


def cmd_export(args) -> int:
    from steppo.evaluate import checkpoint_config, export_checkpoint

    cfg, checkpoint = checkpoint_config(args.checkpoint, None, args.overrides, say=_say(_console()))
    out = export_checkpoint(cfg, checkpoint, Path(args.out))
    _say(_console())(f"exported {checkpoint} to {out}: load it with transformers.AutoModelForCausalLM.from_pretrained"
                     f"({str(out)!r}) or vllm.LLM({str(out)!r})")
    return 0


def _quiet_libraries() -> None:
    """Our own progress bars only: transformers' per-file bars and warnings are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cmd_compare(args) -> int:
    from steppo.compare import run_protocol
    from steppo.report import table

    results = run_protocol(args.protocol, args.out, args.jobs, args.presets, args.seeds, args.runs, args.threads)
    print(table(results))
    return 0


def cmd_view(args) -> int:
    from steppo.view import main as view

    return view(args.run, args.out, args.serve, args.iteration, args.port)


def cmd_config(args) -> int:
    from steppo.config import defaults_yaml, describe, yaml_value

    if args.yaml:
        sys.stdout.write(defaults_yaml())
        return 0
    rows = [(key, yaml_value(value), text) for key, value, text in describe()]
    width = max(len(key) for key, _, _ in rows)
    shown = min(max(len(value) for _, value, _ in rows), 24)
    print(f"{'key':<{width}}  {'default':<{shown}}  help")
    for key, value, text in rows:
        print(f"{key:<{width}}  {value:<{shown}}  {text}".rstrip())
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """argparse stops collecting positional overrides at the first option, so
    ``train algo=grpo --config X trainer.iterations=3`` would reject the last one: overrides on
    both sides of an option are gathered (in order); anything else unknown is an error."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = list(args.overrides) + extra
    return args


_INTERRUPTED: dict[str, int] = {}  # the last finished iteration of the running train command


def _catch_ctrl_c():
    """SIGINT always ends a run cleanly: it raises KeyboardInterrupt at once, even in a process
    started with SIGINT ignored (a shell script's background job, ``cmd &``: Python then installs
    no handler of its own and the run trained on through ``kill -INT``), and it is remembered, so
    an interrupt that some library catches and drops still ends the run at the next iteration
    boundary. Returns the function that restores the old handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        _INTERRUPTED["requested"] = 1
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    return lambda: signal.signal(signal.SIGINT, previous)


def _interrupted(args) -> str:
    """What an interrupted command says instead of a traceback."""
    if args.command != "train":
        return f"{args.command} interrupted"
    it = _INTERRUPTED.get("iteration", 0)
    again = " ".join(["steppo train", *(["--config", args.config] if args.config else []), *args.overrides, "--resume"])
    return (f"interrupted at iteration {it + 1} (iterations 1-{it} finished; the newest checkpoint holds the "
            f"last one saved); resume with: {again}" if it else f"interrupted before the first iteration finished; "
            f"run the same command again, or continue with: {again}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command not in ("config", "view"):  # these stay light (no transformers)
        _quiet_libraries()
    _INTERRUPTED.clear()
    restore = _catch_ctrl_c()  # every command stops on Ctrl-C / kill -INT, even when started with SIGINT ignored
    try:
        commands = {"train": cmd_train, "sft": cmd_sft, "eval": cmd_eval, "compare": cmd_compare, "export": cmd_export, "serve": cmd_serve,
                    "config": cmd_config, "view": cmd_view}
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"steppo: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nsteppo: {_interrupted(args)}", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from steppo.rollout.engine import RolloutError
        from steppo.trainer.update import NonFiniteError

        if not isinstance(exc, (NonFiniteError, RolloutError)):
            raise
        print(f"steppo: training stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
