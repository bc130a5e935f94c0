"""Side by side with TRL: the same multi-turn search-QA task, model, warm start and budget,
trained by TRL's ``GRPOTrainer`` (its multi-turn ``environment_factory`` mode) and by StepPO
(``algo=grpo`` and ``algo=steppo``), in one run of this script.

The task: the synthetic 1-hop search-QA KB of the built-in ``searchqa`` environment (tools
``search(query)`` and ``answer(text)``, reward = exact match), SmolLM2-135M-Instruct with LoRA
rank 16, warm-started once by LoRA SFT on 96 gold trajectories (the same start for every run;
the warm start of ``bench/gateway_learning.py``). Equal settings for all: group size 4, 16
trajectories per update (4 questions x 4), at most 4 model turns per episode, 48 new tokens per
turn, learning rate 2e-4, KL coefficient 0.02 against the warm start, clip 0.2, one epoch, the
same training questions in the same order of seeds, and held-out success measured by the same
greedy evaluation (``steppo eval`` on the same 40 dev questions) after about the same number of
environment steps (``--env-steps``). TRL's model sees StepPO's prompt token for token: its chat
template is a ChatML template that writes tool calls and tool results the way StepPO renders
them for SmolLM2 (checked at start: the first prompt is compared id for id).

Differences that remain, by design of each framework (recorded in the output):
- TRL gives one reward per episode and ends an episode only on a turn without a tool call or at
  its turn cap, so after ``answer`` the model takes further turns (answered "The episode is
  over.") that are generated and trained on; StepPO ends the episode at ``answer``.
- TRL generates each turn with a fresh ``generate`` over the whole context (no KV reuse across
  turns) and recomputes log-probs with a forward pass; StepPO keeps the KV cache across an
  episode's turns and trains each step in the prefix-shared layout.

    pip install -e ".[peers]"
    python bench/peers.py [--seeds 0 1] [--env-steps 320] [--only trl steppo_grpo steppo] [--out runs/peers]

Resumable (a finished run is kept). Prints one JSON object: per framework and seed, the wall
time per update and per environment step, tokens forwarded per update (generation prefill +
decode, and the update's forward), peak RSS, held-out success before and after, and both
frameworks' configurations, and each run's commit; also written to ``results/peers/peers.json``,
with the README's table in ``results/peers/table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway_learning import KB, MODEL, configs  # noqa: E402  (the shared SFT warm start)

from steppo.trainer.rundir import code_version  # noqa: E402

GROUP, PER_UPDATE, TURNS, NEW_TOKENS, LR, KL, CLIP = 4, 16, 4, 48, 2.0e-4, 0.02, 0.2
EVAL = 40
# ChatML that writes a tool call as StepPO's hermes syntax and a tool result as a user turn,
# exactly as StepPO renders SmolLM2's conversations (SmolLM2's own template drops tool calls,
# which TRL refuses).
TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for tc in message.tool_calls or [] %}{%- set args = tc.function.arguments %}"
    "{{- '<tool_call>{\"name\": ' + (tc.function.name | tojson) + ', \"arguments\": ' + "
    "(args if args is string else (args | tojson)) + '}</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def child(cmd: list[str], log: Path, rss_file: Path, threads: int) -> float:
    """Run `cmd` (python args) in a fresh interpreter that writes its peak RSS (MiB) at exit."""
    wrapper = ("import atexit, resource, runpy, sys\n"
               f"atexit.register(lambda: open({str(rss_file)!r}, 'w').write("
               "str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))\n"
               f"sys.argv = {cmd!r}\n"
               "runpy.run_path(sys.argv[0], run_name='__main__') if sys.argv[0].endswith('.py') else "
               "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    t0 = time.perf_counter()
    with log.open("a") as f:
        rc = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def code_commit() -> str:
    """This checkout's commit ("+dirty" with uncommitted changes to tracked files)."""
    code = code_version()
    return (code["commit"] or "unknown") + ("+dirty" if code["dirty"] else "")


def finished(out: Path) -> None:
    """Record the commit a finished run ran at (kept when a later invocation collects it)."""
    (out / "commit.txt").write_text(code_commit() + "\n")


def recorded_commit(out: Path) -> str:
    path = out / "commit.txt"
    return path.read_text().strip() if path.exists() else "not recorded"


def steppo_tree(algo: str, seed: int, out: Path, start: Path, budget: int) -> dict:
    return {"algo": {"name": algo, "kl_coef": KL, "group_size": GROUP},  # clip: the preset's (0.2 for both)
            "model": {**MODEL, "name": str(start)}, "sft": {"enabled": False}, "critic": {"warmup_iterations": 1},
            "env": {"name": "searchqa", "max_steps": TURNS, "params": KB},
            "rollout": {"context": "cumulative", "schedule": "rounds", "num_envs": PER_UPDATE,
                        "max_new_tokens": NEW_TOKENS},
            "trainer": {"iterations": 1000, "max_env_steps": budget, "trajectories_per_iteration": PER_UPDATE,
                        "epochs": 1, "minibatch_steps": 32, "micro_batch_tokens": 1024, "policy_lr": LR,
                        "critic_lr": 5.0e-4, "lr_warmup_steps": 0, "eval_interval": 0, "eval_episodes": EVAL,
                        "eval_sampled": False, "checkpoint_interval": 5},
            "run": {"trackers": [], "seed": seed, "progress": False, "output_dir": str(out)}}


def steppo_summary(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/success" in r]
    trained = [r for r in rows if "policy/loss" in r or "critic/loss" in r]
    n = len(trained)
    wall = sum(r["time/iteration_s"] for r in trained)
    gen = sum(r["rollout/generated_tokens"] for r in trained)
    ctx = sum(r.get("rollout/context_tokens", 0) for r in trained)
    return {"updates": n, "env_steps": trained[-1]["env_steps"], "train_wall_s": round(wall, 1),
            "s_per_update": round(wall / n, 2), "s_per_env_step": round(wall / trained[-1]["env_steps"], 3),
            "prefill_tokens_per_update": round((ctx - gen) / n), "generated_tokens_per_update": round(gen / n),
            "update_tokens_per_update": round(sum(r.get("update/tokens", 0) for r in trained) / n),
            "success_before": evals[0]["eval/success"], "success_after": evals[-1]["eval/success"]}


# ----------------------------------------------------------------------------- TRL


def trl_main(spec_path: str) -> None:
    """The TRL run (in its own process): train, then merge the adapter for evaluation."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    from steppo.envs.actions import ToolCall, render_tool_call
    from steppo.envs.base import EnvSettings
    from steppo.envs.searchqa import SearchQAEnv
    from steppo.models.chat import ChatFormat
    from steppo.seeding import derived_seed  # the tasks StepPO draws for each iteration

    spec = json.loads(Path(spec_path).read_text())
    start, out, seed, budget = Path(spec["start"]), Path(spec["out"]), spec["seed"], spec["env_steps"]
    torch.manual_seed(seed)
    probe = SearchQAEnv(EnvSettings(max_steps=TURNS), **KB)
    train = probe.tasks("train")
    by_id = {t.id: t for t in train}
    tok = AutoTokenizer.from_pretrained(start)
    ours = ChatFormat(AutoTokenizer.from_pretrained(start))
    tok.chat_template = TEMPLATE
    question, _ = probe.reset(train[0])
    msgs = [{"role": "system", "content": probe.instructions()}, {"role": "user", "content": question}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    if list(ids) != ours.initial_prompt(probe.instructions(), question):
        raise SystemExit("the TRL-side template does not reproduce StepPO's prompt")
    tok.response_template = qwen3_template  # parses <tool_call>{...}</tool_call> and <|im_end|>
    steps = {"env": 0, "episodes": 0}

    class SearchQA:
        """StepPO's search-QA environment behind TRL's environment interface."""

        def __init__(self):
            self.env = SearchQAEnv(EnvSettings(max_steps=TURNS), **KB)
            self.done, self.reward = True, 0.0

        def reset(self, task_id, **row):
            self.env.reset(by_id[task_id])
            self.done, self.reward = False, 0.0
            steps["episodes"] += 1

        def _act(self, name: str, **arguments) -> str:
            if self.done:
                return "The episode is over."
            steps["env"] += 1
            r = self.env.step(render_tool_call(ToolCall(name, arguments)))
            self.done, self.reward = r.terminated or r.truncated, self.reward + r.reward
            return r.observation

        def search(self, query: str) -> str:
            """Search the passage collection; returns the best-matching passages.

            Args:
                query: keywords, e.g. an entity name
            """
            return self._act("search", query=query)

        def answer(self, text: str) -> str:
            """Give the final answer (a short span: a name, date, number, yes or no) and stop.

            Args:
                text: the answer
            """
            return self._act("answer", text=text)

        def get_reward(self) -> float:  # once per finished rollout
            if not self.done:  # its last turn called no tool (malformed or plain text): a step, as StepPO counts it
                steps["env"] += 1
            return self.reward

    rows = []  # StepPO's tasks per iteration, in order: 4 questions per update, each asked 4 times by TRL
    for it in range(1, 200):
        rng = random.Random(derived_seed(seed, "tasks", it))
        for t in rng.sample(train, PER_UPDATE // GROUP):
            q, _ = probe.reset(t)
            rows.append({"prompt": [{"role": "system", "content": probe.instructions()}, {"role": "user", "content": q}],
                         "task_id": t.id})
    prefill = {"tokens": 0}
    real = GRPOTrainer._generate_single_turn

    def counted(self, prompt_ids, *a, **k):  # every turn re-prefills its whole context
        prefill["tokens"] += sum(len(p) for p in prompt_ids)
        return real(self, prompt_ids, *a, **k)

    GRPOTrainer._generate_single_turn = counted

    class Budget(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = steps["env"] >= budget

    args = GRPOConfig(
        output_dir=str(out / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=True, seed=seed,
        num_generations=GROUP, per_device_train_batch_size=GROUP, gradient_accumulation_steps=PER_UPDATE // GROUP,
        max_completion_length=2048, generation_kwargs={"max_new_tokens": NEW_TOKENS},
        max_tool_calling_iterations=TURNS - 1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        beta=KL, epsilon=CLIP, loss_type="grpo", num_iterations=1, max_steps=1000, logging_steps=1, report_to="none",
        save_strategy="no", shuffle_dataset=False, temperature=1.0, top_p=1.0)
    trainer = GRPOTrainer(model=str(start), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          environment_factory=SearchQA, callbacks=[Budget()],
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    logs = [r for r in trainer.state.log_history if "step_time" in r]
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(out / "merged")
    AutoTokenizer.from_pretrained(start).save_pretrained(out / "merged")  # StepPO's template for evaluation
    n = len(logs)
    (out / "trl_result.json").write_text(json.dumps({
        "updates": n, "env_steps": steps["env"], "episodes": steps["episodes"], "train_wall_s": round(wall, 1),
        "s_per_update": round(wall / n, 2), "s_per_env_step": round(wall / max(steps["env"], 1), 3),
        "prefill_tokens_per_update": round(prefill["tokens"] / n),
        "generated_tokens_per_update": round(sum(r["completions/mean_length"] * PER_UPDATE for r in logs) / n),
        "update_tokens_per_update": round(logs[-1]["num_tokens"] / n),
        "model_turns_per_episode": round(sum(r["tools/call_frequency"] for r in logs) / n + 1, 2),
        "train_reward_mean": round(sum(r["reward"] for r in logs) / n, 3)}))


def trl_run(seed: int, out: Path, start: Path, budget: int, threads: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "trl_result.json").exists():
        spec = out / "spec.json"
        spec.write_text(json.dumps({"start": str(start), "out": str(out), "seed": seed, "env_steps": budget}))
        child([str(ROOT / "bench" / "peers.py"), "--trl-child", str(spec)], out / "log.txt", out / "rss.txt", threads)
        finished(out)
    result = json.loads((out / "trl_result.json").read_text())
    result["peak_rss_mib"] = round(float((out / "rss.txt").read_text()))
    if not (out / "eval.json").exists():  # the same greedy evaluation as StepPO's runs
        tree = steppo_tree("grpo", seed, out / "eval", out / "merged", budget)
        tree["model"]["lora_rank"] = 0
        (out / "eval.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        child(["steppo.cli", "eval", "--config", str(out / "eval.yaml"), "--json", str(out / "eval.json")],
              out / "log.txt", out / "eval_rss.txt", threads)
    result["success_after"] = json.loads((out / "eval.json").read_text())["success"]
    result["commit"] = recorded_commit(out)
    return result


def steppo_run(algo: str, seed: int, out: Path, start: Path, budget: int, threads: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "done.txt").exists():
        cfg = out.parent / f"{out.name}.yaml"
        cfg.write_text(yaml.safe_dump(steppo_tree(algo, seed, out, start, budget), sort_keys=False))
        resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("iter_*"))
        child(["steppo.cli", "train", "--config", str(cfg), "--resume" if resume else "--overwrite"],
              out.parent / f"{out.name}.log", out.parent / f"{out.name}.rss", threads)
        (out / "done.txt").write_text("done\n")
        finished(out)
    result = steppo_summary(out)
    result["peak_rss_mib"] = round(float((out.parent / f"{out.name}.rss").read_text()))
    result["commit"] = recorded_commit(out)
    return result


def table(result: dict) -> str:
    """The README's table: per framework, mean over seeds (each seed's held-out success listed)."""
    names = {"trl": f"TRL {result['trl']} `GRPOTrainer`", "steppo_grpo": "StepPO `algo=grpo`",
             "steppo": "StepPO `algo=steppo`"}
    lines = ["| framework | s / update | s / env step | prefill tokens / update | generated / update | "
             "update tokens / update | peak RSS | held-out success (per seed) | env steps |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, seeds in result["runs"].items():
        rs = list(seeds.values())

        def mean(key: str, rs: list = rs) -> float:
            return sum(r[key] for r in rs) / len(rs)
        after = " / ".join(f"{r['success_after']:.3f}" for r in rs)
        lines.append(f"| {names.get(name, name)} | {mean('s_per_update'):.0f} | {mean('s_per_env_step'):.2f} | "
                     f"{mean('prefill_tokens_per_update'):,.0f} | {mean('generated_tokens_per_update'):,.0f} | "
                     f"{mean('update_tokens_per_update'):,.0f} | {mean('peak_rss_mib') / 1024:.1f} GiB | "
                     f"{mean('success_after'):.3f} ({after}) | {mean('env_steps'):.0f} |")
    before = [r["success_before"] for seeds in result["runs"].values() for r in seeds.values() if "success_before" in r]
    if before:
        lines.append(f"\nThe shared warm start: {sum(before) / len(before):.3f} held-out success.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--env-steps", type=int, default=320)
    ap.add_argument("--only", nargs="*", default=["trl", "steppo_grpo", "steppo"])
    ap.add_argument("--out", default="runs/peers")
    ap.add_argument("--results", default=str(ROOT / "results" / "peers"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per run")
    ap.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_child:
        return trl_main(args.trl_child)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sft = configs(out)["sft"]
    start = out / "sft" / "sft_model"
    threads = args.threads
    if not (start / "config.json").exists():
        (out / "sft.yaml").write_text(yaml.safe_dump(sft, sort_keys=False))
        child(["steppo.cli", "sft", "--config", str(out / "sft.yaml"), "--overwrite"], out / "sft.log",
              out / "sft.rss", threads)
    import trl

    rows: dict = {}
    for seed in args.seeds:
        for name in args.only:
            run = out / name / f"seed{seed}"
            if name == "trl":
                r = trl_run(seed, run, start, args.env_steps, threads)
            else:
                r = steppo_run("grpo" if name == "steppo_grpo" else "steppo", seed, run, start, args.env_steps, threads)
            rows.setdefault(name, {})[f"seed{seed}"] = r
    result = {
        "benchmark": "peers", "commit": code_commit(),  # this collection's; each run records its own
        "trl": trl.__version__, "threads": threads,
        "settings": {"group_size": GROUP, "trajectories_per_update": PER_UPDATE, "max_model_turns": TURNS,
                     "max_new_tokens_per_turn": NEW_TOKENS, "lr": LR, "kl": KL, "clip": CLIP,
                     "env_steps_budget": args.env_steps, "eval_questions": EVAL, "model": "smollm2-135m LoRA r16",
                     "start": "LoRA SFT on 96 gold trajectories (shared)"},
        "trl_config": {"trainer": "GRPOTrainer(environment_factory)", "loss_type": "grpo", "beta": KL,
                       "num_generations": GROUP, "per_device_train_batch_size": GROUP,
                       "gradient_accumulation_steps": PER_UPDATE // GROUP, "max_tool_calling_iterations": TURNS - 1,
                       "generation_kwargs": {"max_new_tokens": NEW_TOKENS}, "max_completion_length": 2048,
                       "use_vllm": False, "bf16": False, "gradient_checkpointing": True},
        "steppo_config": steppo_tree("<algo>", 0, Path("<out>"), Path("<start>"), args.env_steps),
        "recomputes": {
            "trl": "a fresh generate per turn over the whole context (no KV reuse across turns); token ids kept "
                   "(no re-tokenisation of history); log-probs recomputed by a forward pass; turns after answer "
                   "generated and trained on",
            "steppo": "KV cache kept across an episode's turns (only each observation is prefilled); exact ids; "
                      "sampled log-probs kept; each step trained once in the prefix-shared layout"},
        "runs": rows}
    print(json.dumps(result, indent=2))
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
    (res / "table.md").write_text(table(result))


if __name__ == "__main__":
    main()
