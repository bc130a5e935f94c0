"""TextWorldExpress: fast procedurally generated text games (coin, cookingworld, twc, mapreader)
from the ``textworld-express`` package, whose simulator runs in a JVM.

* Games: ``coin`` (find and take the coin), ``cookingworld`` (gather ingredients, follow a
  recipe, eat the meal), ``twc`` (put objects away where they belong), ``mapreader`` (read a
  map, fetch a coin, bring it back).
* Params: ``game``; ``game_params`` (the game's generation settings, e.g. ``{numLocations: 3,
  includeDoors: 0}``; integers, booleans as 0/1; unset keys keep the package's defaults; keys
  and ranges are checked here because the jar silently ignores non-integer values);
  ``num_tasks`` (per split, at most 1000); ``observation``: ``full`` (the game's text) or
  ``compact`` (room descriptions cut to the room, its exits and takeable things: a fraction of
  the tokens, for CPU-scale experiments).
* Splits: the package's own folds, each with its seed range: ``train`` = fold train, seeds
  0..999; ``dev`` = fold dev, 10000..10999; ``test`` = fold test, 20000..20999. The fold also
  picks a disjoint pool of objects, so the splits differ in content, not just in seed.
* Observation: the task description and the room at reset, the game's answer after each
  command, and (``show_admissible``, default on) the valid actions.
* Reward: the change of the game's normalised score (intermediate rewards: a recipe step, an
  object taken or put away); ``success`` when the game reports the task done. The episode ends
  (terminated) when the game is won or failed (cookingworld: eating or cooking an ingredient
  wrongly); the step limit is ``max_steps`` (per game by default, see `GAME_MAX_STEPS`).
* Invalid action: a command outside the valid actions; it is answered without reaching the
  game, so it changes nothing.
* Anchor (GiGPO): cookingworld exposes its full state (``getObjectTree``), hashed. The other
  games expose none, so their anchor hashes what the player can observe, the current room and
  the inventory: an approximation that merges states differing only out of sight (an object
  moved or a door opened in another room).
* Expert: the package's gold path for the task, cached per task (the jar may return a different
  gold path on a later reset of the same game) and cleaned of the commands it contains that
  are not valid at their step (cookingworld's redundant "open" of an open container).

Each instance owns one JVM (started at the first reset, about 0.2 s). Its heap is capped by
setting ``JAVA_TOOL_OPTIONS`` to `JVM_OPTIONS` when the variable is unset (the package offers no
other way; left alone when set, e.g. to raise the cap): otherwise each JVM takes a quarter of the
machine's memory as heap and grows to ~200 MB, one per environment worker. Different instances
step safely from different threads (py4j releases the GIL).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Any

from steppo.envs.base import SPLITS, EnvError, EnvSettings, Task, TextEnv, Transition

# The jar's folds and the seed range of each (the package's getValidSeeds{Train,Dev,Test}).
FOLDS = {"train": ("train", 0), "dev": ("dev", 10_000), "test": ("test", 20_000)}
SEEDS_PER_FOLD = 1000

FLAG = range(0, 2)
# Accepted values per game and param, measured against the jar (its own messages are partial).
GAME_PARAMS: dict[str, dict[str, range]] = {
    "coin": {"numLocations": range(1, 12), "numDistractorItems": range(0, 11),
             "includeDoors": FLAG, "limitInventorySize": FLAG},
    "cookingworld": {"numLocations": range(1, 12), "numIngredients": range(1, 6),
                     "numDistractorItems": range(0, 11), "includeDoors": FLAG, "limitInventorySize": FLAG},
    "twc": {"numLocations": range(1, 4), "numItemsToPutAway": range(1, 5),
            "includeDoors": FLAG, "limitInventorySize": FLAG},
    "mapreader": {"numLocations": range(2, 51), "maxDistanceApart": range(1, 9),
                  "maxDistractorItemsPerLocation": range(0, 4), "includeDoors": FLAG, "limitInventorySize": FLAG},
}
# Default step limits, from the gold path lengths at the package's default params
# (coin 2-34, twc 13-32, mapreader 7-13, cookingworld 15-105 with mean 42), plus slack.
GAME_MAX_STEPS = {"coin": 40, "cookingworld": 60, "twc": 40, "mapreader": 30}

JVM_OPTIONS = "-Xmx256m -XX:+UseSerialGC"
# The jar ends a game after this many moves; the engine's max_steps is the real limit.
JAR_STEP_LIMIT = 1_000_000_000
UNKNOWN_ACTION = "Unknown action: I'm not sure what you mean."


def game_params_string(params: dict[str, int]) -> str:
    """The jar's ``key=value,...`` form (sorted, so equal params give equal strings)."""
    return ",".join(f"{k}={v}" for k, v in sorted(params.items()))


def check_game_params(game: str, params: dict[str, Any]) -> dict[str, int]:
    """`params` validated for `game`, booleans turned into the jar's 0/1."""
    allowed = GAME_PARAMS[game]
    out = {}
    for key, value in params.items():
        if key not in allowed:
            raise EnvError(f"twx game {game!r} has no param {key!r}; known: {sorted(allowed)}")
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int) or value not in allowed[key]:
            span = allowed[key]
            raise EnvError(f"twx {game} param {key} must be an integer in {span.start}..{span.stop - 1}, got {value!r}")
        out[key] = value
    return out


@functools.cache
def _game_class():
    """The package's environment class with an idempotent close: its ``__del__`` closes again,
    and a second close writes to the dead JVM's stdin (a BrokenPipeError at garbage collection)."""
    try:
        from textworld_express import TextWorldExpressEnv as PackageEnv
    except ImportError as exc:
        raise EnvError("the twx environment needs the textworld-express package "
                       "(pip install textworld-express)") from exc

    class Game(PackageEnv):
        _closed = False

        def close(self) -> None:
            if not self._closed:
                self._closed = True
                super().close()

        def __del__(self) -> None:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - a half-started or already dead JVM
                pass

    return Game


class TextWorldExpressEnv(TextEnv):
    name = "twx"

    def __init__(
        self,
        settings: EnvSettings | None = None,
        game: str = "coin",
        game_params: dict[str, int] | None = None,
        num_tasks: dict[str, int] | None = None,
        observation: str = "full",
    ):
        if observation not in ("full", "compact"):
            raise EnvError("twx observation must be 'full' or 'compact'")
        self.observation = observation
        if game not in GAME_PARAMS:
            raise EnvError(f"unknown twx game {game!r}; available: {sorted(GAME_PARAMS)}")
        super().__init__(settings)
        if self.settings.max_steps is None:
            self.settings = dataclasses.replace(self.settings, max_steps=GAME_MAX_STEPS[game])
        self.game = game
        self.game_params = check_game_params(game, game_params or {})
        self.num_tasks = {"train": 1000, "dev": 100, "test": 200, **(num_tasks or {})}
        for split, n in self.num_tasks.items():
            if split not in SPLITS or not isinstance(n, int) or not 0 <= n <= SEEDS_PER_FOLD:
                raise EnvError(f"twx num_tasks must map {list(SPLITS)} to 0..{SEEDS_PER_FOLD}, got {split}={n!r}")
        self._jvm = None
        self._loaded: tuple[str, str] | None = None  # (game, params string) the jar holds
        self._infos: dict[str, Any] = {}  # the jar's infos for the current state
        self._history: list[str] = []  # commands sent since reset, to restore the episode
        self._done = False
        self._anchor: str | None = None
        self._gold: dict[str, list[str]] = {}

    @classmethod
    def default_settings(cls) -> EnvSettings:
        # max_steps None: the game's own default (GAME_MAX_STEPS), filled in by __init__, since
        # the default depends on the game param this classmethod does not see.
        return EnvSettings(max_steps=None, show_admissible=True, max_new_tokens=48)

    def system_prompt(self) -> str:
        text = (
            "You are playing a text adventure game. Each turn, reply with exactly one command in plain "
            "text, e.g. 'look around', 'move north', 'open door to east', 'take coin', 'put coin in box', "
            "'inventory'."
        )
        if self.settings.show_admissible:
            text += " Each observation ends with the admissible commands; reply with one of them exactly."
        return text

    # ------------------------------------------------------------------ tasks

    def tasks(self, split: str) -> list[Task]:
        if split not in FOLDS:
            raise ValueError(f"twx has splits {list(FOLDS)}, not {split!r}")
        fold, first = FOLDS[split]
        payload = {"task_type": self.game, "game": self.game, "params": self.game_params, "fold": fold}
        return [
            Task(id=f"twx/{self.game}/{split}/{seed}", split=split, seed=seed, payload=payload)
            for seed in range(first, first + self.num_tasks[split])
        ]

    # ------------------------------------------------------------------ the game

    def _start(self, task: Task, gold: bool = False) -> tuple[str, dict[str, Any]]:
        """Reset the jar to `task` (starting the JVM and loading the game when needed)."""
        if self._jvm is None:
            game_class = _game_class()
            os.environ.setdefault("JAVA_TOOL_OPTIONS", JVM_OPTIONS)
            try:
                self._jvm = game_class(envStepLimit=JAR_STEP_LIMIT)
            except Exception as exc:  # noqa: BLE001 - py4j's launch errors are of many kinds
                raise EnvError(f"could not start the TextWorldExpress JVM (is Java installed?): {exc}") from exc
        wanted = (task.payload["game"], game_params_string(task.payload["params"]))
        if self._loaded != wanted:
            try:
                self._jvm.load(*wanted)
            except ValueError as exc:
                raise EnvError(f"twx rejected game {wanted[0]} with params {wanted[1]!r}: {exc}") from exc
            self._loaded = wanted
        try:
            return self._jvm.reset(seed=task.seed, gameFold=task.payload["fold"], generateGoldPath=gold)
        except Exception as exc:  # noqa: BLE001 - py4j wraps the jar's exception
            java = getattr(exc, "java_exception", None)
            reason = java.getMessage() if java is not None else exc
            raise EnvError(f"twx could not generate {wanted[0]} ({wanted[1] or 'default params'}) "
                           f"for task {task.id}: {reason}") from exc

    def _observe(self, infos: dict[str, Any]) -> None:
        self._infos = infos
        if self._loaded[0] == "cookingworld":
            state = json.dumps(self._jvm.getObjectTree(), sort_keys=True)
        else:
            state = infos["look"] + "\0" + infos["inventory"]
        self._anchor = hashlib.sha1(state.encode()).hexdigest()[:16]

    def _admissible(self) -> list[str]:
        return sorted(self._infos["validActions"])

    def _info(self) -> dict[str, Any]:
        return {"anchor": self._anchor, "admissible": self._admissible(), "score": self._infos["score"]}

    def _compact(self, text: str) -> str:
        """A room description cut to where the player is, the exits, and the sentences that
        name something the player can take (the rest is furniture)."""
        if "You are in the" not in text:
            return text
        takeable = [a[5:] for a in self._infos.get("validActions", []) if a.startswith("take ")]
        sentences = re.split(r"(?<=[.!?])\s+", text.strip())
        kept = [x for x in sentences if x.startswith(("You are in", "To the")) or any(o in x for o in takeable)]
        return " ".join(kept)

    def _with_commands(self, text: str) -> str:
        if self.observation == "compact":
            text = self._compact(text)
        if not self.settings.show_admissible:
            return text
        return f"{text}\nAdmissible commands: {', '.join(self._admissible())}."

    def anchor(self) -> str | None:
        return self._anchor

    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        obs, infos = self._start(task)
        self._history = []
        self._done = False
        self._observe(infos)
        text = self._with_commands(obs.strip())
        return f"{infos['taskDescription'].strip()}\n{text}", self._info()

    def _act(self, action) -> Transition:
        if self._done:
            raise EnvError("step() after the twx episode ended")
        # Responses arrive lower-cased (`parse_command`); the jar wants the exact string
        # ("take dirty green T-shirt").
        valid = {a.lower(): a for a in self._infos["validActions"]}
        command = valid.get(action.lower()) if isinstance(action, str) else None
        if command is None:
            # Answered here with the jar's own message: sent, it would change nothing but the
            # jar's move count.
            info = {**self._info(), "invalid_action": True, "success": False}
            return Transition(self._with_commands(UNKNOWN_ACTION), 0.0, False, False, info)
        obs, reward, done, infos = self._jvm.step(command)
        self._history.append(command)
        self._observe(infos)
        self._done = bool(done)
        info = {**self._info(), "success": bool(infos["tasksuccess"])}
        text = obs.strip()
        return Transition(text if done else self._with_commands(text), float(reward), self._done, False, info)

    # ------------------------------------------------------------------ the expert

    def expert_actions(self, task: Task) -> list[str]:
        if task.id not in self._gold:
            self._gold[task.id] = self._gold_path(task)
        return list(self._gold[task.id])

    def _gold_path(self, task: Task) -> list[str]:
        """The jar's gold path, replayed to drop the commands that are not valid at their step.
        The episode in progress, if any, is restored afterwards by replaying its commands."""
        _, infos = self._start(task, gold=True)
        gold = list(self._jvm.getGoldActionSequence())
        kept = []
        for command in gold:
            if command not in infos["validActions"]:
                continue
            _, _, done, infos = self._jvm.step(command)
            kept.append(command)
            if done:
                break
        if self.task is not None:
            _, infos = self._start(self.task)
            for command in self._history:
                _, _, _, infos = self._jvm.step(command)
            self._infos = infos
        return kept

    def close(self) -> None:
        if self._jvm is not None:
            jvm, self._jvm = self._jvm, None
            self._loaded = None
            try:
                jvm.close()
            except Exception:  # noqa: BLE001 - the JVM may already be gone
                pass
