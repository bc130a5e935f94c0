"""ALFWorld, the paper's text-world benchmark, over the real game files.

Each game is a ``game.tw-pddl`` file played with TextWorld's PDDL backend and the ``alfworld``
package's ``AlfredDemangler`` / ``AlfredInfos`` wrappers (only
``alfworld.agents.environment.alfred_tw_env`` is imported: the rest of the package pulls torch
and vision code). The task list comes from ``manifest.jsonl`` (split, game file, task type,
goal), so the train sample, which has no ``traj_data.json``, loads like the others.

Splits follow the paper: train on ``train``, select checkpoints and settings on
``valid_seen`` (alias ``dev``), report ``valid_seen`` and ``valid_unseen`` (alias ``test``) as
the two columns; never tune on ``valid_unseen``.

* Observation: the room description and "Your task is to: ..." at reset, the game's feedback
  after each command, and (``show_admissible``, default on) the admissible commands.
* Reward: 1 when the task is won (binary success), else 0. ALFWorld has no losing state, so
  the step limit (default 50) ends unsolved episodes.
* Invalid action: a command outside the admissible list (the game answers "Nothing happens.").
* Anchor (GiGPO): a hash of the sorted PDDL facts, the environment's state, never the text.
* Expert: the walkthrough stored in each game file.

The engine is not thread-safe (TextWorld's grammar parser shares state): run it with
``rollout.env_workers=process``. Params: ``data_dir`` (default ``$STEPPO_DATA/alfworld``; point
it at a full ALFWorld download's folder holding ``json_2.1.1`` and a manifest), ``task_types``
(restrict to some of the six types), ``num_tasks`` (cap per split).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from steppo.envs.base import EnvError, EnvSettings, Task, TextEnv, Transition
from steppo.paths import require_data

SPLITS = {"train": "train", "valid_seen": "valid_seen", "valid_unseen": "valid_unseen",
          "dev": "valid_seen", "test": "valid_unseen"}
TASK_TYPES = (
    "pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place",
)
WELCOME = "-= Welcome to TextWorld, ALFRED! =-"


class ALFWorldEnv(TextEnv):
    name = "alfworld"
    # a game takes seconds to load and its walkthrough ~30 steps at ~16 steps/s: the tiny
    # tokenizer's text comes from 40 games (the command vocabulary is small)
    corpus_tasks = 40

    def __init__(
        self,
        settings: EnvSettings | None = None,
        data_dir: str | None = None,
        task_types: list[str] | None = None,
        num_tasks: dict[str, int] | None = None,
    ):
        super().__init__(settings)
        self.root = require_data("alfworld", data_dir, "ALFWorld")
        manifest = self.root / "manifest.jsonl"
        if not manifest.exists():
            raise EnvError(f"ALFWorld manifest not found at {manifest}: it lists split, game_file and task_type per game")
        unknown = set(task_types or []) - set(TASK_TYPES)
        if unknown:
            raise EnvError(f"unknown ALFWorld task types {sorted(unknown)}; choose from {TASK_TYPES}")
        self.task_types = set(task_types or TASK_TYPES)
        self.num_tasks = num_tasks or {}
        self._rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        self._game = None
        self._done = False
        self._admissible: list[str] = []
        self._facts_key = ""

    @classmethod
    def default_settings(cls) -> EnvSettings:
        return EnvSettings(max_steps=50, show_admissible=True, max_new_tokens=48)

    def system_prompt(self) -> str:
        return (
            "You are a household robot in a text world. Each turn, reply with exactly one command "
            "from the admissible commands listed in the observation, e.g. 'go to countertop 1', "
            "'take apple 1 from countertop 1', 'move apple 1 to fridge 1', 'heat egg 1 with microwave 1'."
        )

    # ------------------------------------------------------------------ tasks

    def tasks(self, split: str) -> list[Task]:
        if split not in SPLITS:
            raise ValueError(f"alfworld has splits {sorted(SPLITS)}, not {split!r}")
        name = SPLITS[split]
        rows = sorted((r for r in self._rows if r["split"] == name and r["task_type"] in self.task_types),
                      key=lambda r: r["game_file"])
        limit = self.num_tasks.get(split, self.num_tasks.get(name))
        rows = rows[:limit] if limit else rows
        out = []
        for i, r in enumerate(rows):
            trial = Path(r["game_file"]).parent
            out.append(Task(
                id=f"alfworld/{name}/{trial.parent.name}/{trial.name}",
                split=name,
                seed=i,
                payload={"game_file": r["game_file"], "task_type": r["task_type"], "goal": r["goal"]},
            ))
        return out

    # ------------------------------------------------------------------ playing

    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

        if self._game is not None:
            self._game.close()
        infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=True)
        path = self.root / task.payload["game_file"]
        if not path.exists():
            raise EnvError(f"ALFWorld game file missing: {path}")
        self._game = textworld.start(str(path), request_infos=infos,
                                     wrappers=[AlfredDemangler(shuffle=False), AlfredInfos])
        state = self._game.reset()
        self._done = False
        self._remember(state)
        text = state.feedback.replace(WELCOME, "").strip()
        return self._with_commands(text), {"anchor": self.anchor(), "admissible": self._admissible}

    def _remember(self, state) -> None:
        self._admissible = list(state["admissible_commands"] or [])
        facts = sorted(str(f) for f in (state.get("facts") or []))
        self._facts_key = hashlib.sha1("\n".join(facts).encode()).hexdigest()[:16]

    def _with_commands(self, text: str) -> str:
        if not self.settings.show_admissible:
            return text
        return f"{text}\nAdmissible commands: {', '.join(self._admissible)}."

    def anchor(self) -> str:
        return self._facts_key

    def _act(self, action) -> Transition:
        if self._done:
            raise EnvError("step() after the ALFWorld episode ended")
        command = action if isinstance(action, str) else ""
        invalid = command not in self._admissible
        state, _, done = self._game.step(command)
        won = bool(state["won"])
        self._done = bool(done) or won
        self._remember(state)
        info = {"success": won, "invalid_action": invalid, "anchor": self.anchor(),
                "admissible": self._admissible}
        text = state.feedback.strip()
        return Transition(self._with_commands(text), 1.0 if won else 0.0, won, False, info)

    def expert_actions(self, task: Task) -> list[str]:
        game = json.loads((self.root / task.payload["game_file"]).read_text())
        return list(game.get("walkthrough") or [])

    def close(self) -> None:
        if self._game is not None:
            self._game.close()
            self._game = None
