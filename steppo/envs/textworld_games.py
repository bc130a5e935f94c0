"""TextWorld: games generated from TextWorld's challenges (or its custom generator), played as
compiled Z-machine games in-process with the ``textworld`` package.

* Params: ``challenge`` (``tw-simple``, ``tw-cooking``, ``tw-coin_collector``,
  ``tw-treasure_hunter`` or ``custom``); ``challenge_settings`` (the challenge's settings, as
  ``tw-make`` takes them, see `CHALLENGES`; unset keys take `DEFAULT_SETTINGS`);
  ``intermediate_reward`` (reward +1 for each step that follows the winning policy, instead of
  the score change); ``num_tasks`` (per split); ``cache_dir`` (default
  ``<steppo cache>/textworld``).
* Games: one per (challenge, settings, seed), generated on first use (reset or expert) into the
  cache, so listing tasks costs nothing and a game is generated once and reused by every run and
  worker. The folder is keyed by a hash of (challenge, settings, seed, TextWorld version: another
  version may generate another game), written to a temporary folder and renamed into place, so
  concurrent workers never see half a game. Generation takes 0.5-2 s per game and ~400 KB on disk.
* Splits: disjoint seed ranges, ``train`` from 0, ``dev`` from 1,000,000, ``test`` from
  2,000,000. Where a challenge has held-out content it is used too, unless the settings name
  it: tw-cooking draws its foods from the ``train``/``valid``/``test`` food split of the task's
  split, tw-simple sets ``test`` for the test split. Other challenges differ only by seed (small
  levels give near-identical games).
* Observation: the objective and the room at reset (without TextWorld's ASCII banner), the
  game's feedback after each command (without the prompt and status line), and
  (``show_admissible``, default on) the admissible commands.
* Reward: the change of the game's score (points: tw-simple dense has 10 per game, the others
  a few or 1), or with ``intermediate_reward`` TextWorld's policy-following reward.
  ``success`` when the game is won; the episode ends (terminated) when it is won or lost
  (tw-cooking: eating an ingredient; tw-treasure_hunter: taking the wrong object).
* Invalid action: a command outside the admissible commands; it is answered without reaching the
  game, so it changes nothing.
* Anchor (GiGPO): a hash of the game's sorted facts (the full state; look, inventory and
  examine leave it unchanged).
* Expert: the walkthrough stored with the game.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

from steppo.envs.base import SPLITS, EnvError, EnvSettings, Task, TextEnv, Transition
from steppo.paths import default_cache_dir

SPLIT_SEEDS = {"train": 0, "dev": 1_000_000, "test": 2_000_000}
MAX_TASKS = 1_000_000  # per split, so the seed ranges stay disjoint

# Allowed values of each challenge setting: a range (integers), a tuple of choices, or bool. The
# custom bounds only catch typos: the generator itself rejects impossible combinations, which
# surface as an EnvError when the game is first generated.
CHALLENGES: dict[str, dict[str, Any]] = {
    "tw-simple": {"rewards": ("dense", "balanced", "sparse"), "goal": ("detailed", "brief", "none"), "test": bool},
    "tw-cooking": {
        "recipe": range(1, 6), "take": range(0, 6), "go": (1, 6, 9, 12), "open": bool, "cut": bool,
        "cook": bool, "drop": bool, "recipe_seed": range(0, 2**31), "split": ("train", "valid", "test"),
    },
    "tw-coin_collector": {"level": range(1, 301)},
    "tw-treasure_hunter": {"level": range(1, 31)},
    "custom": {"world_size": range(1, 101), "nb_objects": range(0, 201), "quest_length": range(1, 51)},
}
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "tw-simple": {"rewards": "dense", "goal": "detailed"},
    "tw-cooking": {"recipe": 1, "take": 1, "go": 1, "open": True, "cut": False, "cook": False, "drop": False,
                   "recipe_seed": 0},
    "tw-coin_collector": {"level": 1},
    "tw-treasure_hunter": {"level": 1},
    "custom": {"world_size": 3, "nb_objects": 5, "quest_length": 3},
}
COOKING_FOOD_SPLIT = {"train": "train", "dev": "valid", "test": "test"}

# TextWorld's generators share process-wide state (tw-simple reseeds TextWorld's global RNG, the
# text grammar is cached), so one game is generated at a time per process; across processes the
# atomic rename is enough.
_GENERATION_LOCK = threading.Lock()

# Jericho (TextWorld's Z-machine player) warns about every game it has no score rules for; TextWorld
# tracks the score of its own games, so the warning is noise, once per game started.
warnings.filterwarnings("ignore", message=r"Game '.*' is not fully supported", module="jericho")

BANNER_LINE = re.compile(r"^[\s_$|\\/<>]*$")  # the "TEXTWORLD" ASCII art and blank lines
RESTART_QUESTION = "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?"
NOT_ADMISSIBLE = "That command is not available here."


def check_settings(challenge: str, settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` completed with the challenge's defaults and validated."""
    spec = CHALLENGES[challenge]
    out = {**DEFAULT_SETTINGS[challenge], **settings}
    for key, value in out.items():
        if key not in spec:
            raise EnvError(f"textworld challenge {challenge!r} has no setting {key!r}; known: {sorted(spec)}")
        allowed = spec[key]
        if allowed is bool:
            ok = isinstance(value, bool)
            what = "true or false"
        else:
            ok = type(value) is type(allowed[0]) and value in allowed
            what = (f"an integer in {allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range)
                    else f"one of {list(allowed)}")
        if not ok:
            raise EnvError(f"textworld {challenge} setting {key} must be {what}, got {value!r}")
    if challenge == "tw-cooking":
        if out["take"] > out["recipe"]:
            raise EnvError("textworld tw-cooking needs take <= recipe (ingredients to find among the recipe's)")
        if out["recipe_seed"] > 0 and out["take"] == 0:
            raise EnvError("textworld tw-cooking needs take >= 1 when recipe_seed > 0 (a shuffled recipe)")
    return out


def generate_game(challenge: str, settings: dict[str, Any], seed: int, path: Path) -> None:
    """Generate and compile one game to `path` (``.z8``, with its ``.json`` beside it)."""
    import textworld
    import textworld.challenges
    from textworld.generator import compile_game

    options = textworld.GameOptions()
    options.seeds = seed
    options.path = str(path)
    options.file_ext = ".z8"
    options.force_recompile = True
    if challenge == "custom":
        options.nb_rooms = settings["world_size"]
        options.nb_objects = settings["nb_objects"]
        length = settings["quest_length"]
        options.chaining.min_length = options.chaining.max_length = options.chaining.max_depth = length
        textworld.make(options)
        return
    _, make, _ = textworld.challenges.CHALLENGES[challenge]
    compile_game(make(settings=dict(settings), options=options), options)


def clean_feedback(text: str, at_reset: bool = False) -> str:
    """The game's text without the ASCII banner (reset), the prompt with its status line
    ("> -= Kitchen =-0/1") and the end-of-game restart question; lines stripped of their
    padding (the game centres some), blank runs collapsed (tokens the agent would pay for)."""
    lines = text.rsplit("\n>", 1)[0].replace(RESTART_QUESTION, "").split("\n")
    start = 0
    while at_reset and start < len(lines) and BANNER_LINE.match(lines[start]):
        start += 1
    text = "\n".join(line.strip() for line in lines[start:])
    return re.sub(r"\n\n\n+", "\n\n", text).strip()


def state_key(facts) -> str:
    return hashlib.sha1("\n".join(sorted(map(str, facts))).encode()).hexdigest()[:16]


class TextWorldEnv(TextEnv):
    name = "textworld"
    corpus_tasks = 50  # each task is a generated game (~1-2 s): keep the tokenizer corpus small

    def __init__(
        self,
        settings: EnvSettings | None = None,
        challenge: str = "tw-simple",
        challenge_settings: dict[str, Any] | None = None,
        intermediate_reward: bool = False,
        num_tasks: dict[str, int] | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__(settings)
        if importlib.util.find_spec("textworld") is None:
            raise EnvError("the textworld environment needs the textworld package (pip install textworld)")
        if challenge not in CHALLENGES:
            raise EnvError(f"unknown textworld challenge {challenge!r}; available: {sorted(CHALLENGES)}")
        self.challenge = challenge
        self.challenge_settings = dict(challenge_settings or {})
        self._split_settings = {split: check_settings(challenge, self._with_split(split)) for split in SPLITS}
        self.intermediate_reward = bool(intermediate_reward)
        self.num_tasks = {"train": 1000, "dev": 100, "test": 200, **(num_tasks or {})}
        for split, n in self.num_tasks.items():
            if split not in SPLITS or not isinstance(n, int) or not 0 <= n <= MAX_TASKS:
                raise EnvError(f"textworld num_tasks must map {list(SPLITS)} to 0..{MAX_TASKS}, got {split}={n!r}")
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "textworld"
        self._game = None
        self._game_file: Path | None = None
        self._admissible: list[str] = []
        self._score = 0
        self._done = False
        self._anchor: str | None = None
        self._walkthroughs: dict[str, list[str]] = {}

    @classmethod
    def default_settings(cls) -> EnvSettings:
        return EnvSettings(max_steps=50, show_admissible=True, max_new_tokens=48)

    def system_prompt(self) -> str:
        text = (
            "You are playing a text adventure game. Each turn, reply with exactly one command in plain "
            "text, e.g. 'go east', 'open chest drawer', 'take old key from chest drawer', "
            "'unlock wooden door with old key', 'put lettuce on stove', 'inventory'."
        )
        if self.settings.show_admissible:
            text += " Each observation ends with the admissible commands; reply with one of them exactly."
        return text

    def _with_split(self, split: str) -> dict[str, Any]:
        """The configured settings plus the split's held-out content where the challenge has it."""
        settings = dict(self.challenge_settings)
        if self.challenge == "tw-cooking":
            settings.setdefault("split", COOKING_FOOD_SPLIT[split])
        elif self.challenge == "tw-simple":
            settings.setdefault("test", split == "test")
        return settings

    # ------------------------------------------------------------------ tasks and game files

    def tasks(self, split: str) -> list[Task]:
        if split not in SPLIT_SEEDS:
            raise ValueError(f"textworld has splits {list(SPLIT_SEEDS)}, not {split!r}")
        first = SPLIT_SEEDS[split]
        payload = {"task_type": self.challenge, "challenge": self.challenge, "settings": self._split_settings[split]}
        return [
            Task(id=f"textworld/{self.challenge}/{split}/{seed}", split=split, seed=seed, payload=payload)
            for seed in range(first, first + self.num_tasks[split])
        ]

    def game_dir(self, task: Task) -> Path:
        """The cache folder of `task`'s game (it may not exist yet)."""
        import textworld

        spec = {"challenge": task.payload["challenge"], "settings": task.payload["settings"], "seed": task.seed,
                "textworld": textworld.__version__}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"{task.payload['challenge']}-{task.seed}-{digest}"

    def _ensure_game(self, task: Task) -> Path:
        """`task`'s game folder, generated first if missing."""
        folder = self.game_dir(task)
        if (folder / "game.z8").exists():
            return folder
        with _GENERATION_LOCK:
            if (folder / "game.z8").exists():  # generated by another thread meanwhile
                return folder
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=self.cache_dir))
            try:
                try:
                    generate_game(task.payload["challenge"], task.payload["settings"], task.seed, tmp / "game.z8")
                except Exception as exc:  # noqa: BLE001 - the generator's errors are of many kinds
                    raise EnvError(f"TextWorld could not generate {task.id} with settings "
                                   f"{task.payload['settings']}: {exc}") from exc
                try:
                    os.replace(tmp, folder)
                except OSError:
                    if not (folder / "game.z8").exists():
                        raise
                    # another process renamed its copy of the same game into place first
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    # ------------------------------------------------------------------ playing

    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        import textworld

        game_file = self._ensure_game(task) / "game.z8"
        if game_file != self._game_file:
            self.close()
            infos = textworld.EnvInfos(admissible_commands=True, won=True, lost=True, score=True, facts=True,
                                       intermediate_reward=self.intermediate_reward)
            self._game = textworld.start(str(game_file), request_infos=infos)
            self._game_file = game_file
        state = self._game.reset()
        self._score = state["score"]
        self._done = False
        self._remember(state)
        text = clean_feedback(state.feedback, at_reset=True)
        return self._with_commands(text), self._info()

    def _remember(self, state) -> None:
        self._admissible = list(state["admissible_commands"] or [])
        self._anchor = state_key(state["facts"] or [])

    def _info(self) -> dict[str, Any]:
        return {"anchor": self._anchor, "admissible": self._admissible, "score": self._score}

    def _with_commands(self, text: str) -> str:
        if not self.settings.show_admissible:
            return text
        return f"{text}\nAdmissible commands: {', '.join(self._admissible)}."

    def anchor(self) -> str | None:
        return self._anchor

    def _act(self, action) -> Transition:
        # Tracked here: after the end the game answers "Please give one of the answers above"
        # with done=False.
        if self._done:
            raise EnvError("step() after the TextWorld episode ended")
        admissible = {c.lower(): c for c in self._admissible}
        command = admissible.get(action.lower()) if isinstance(action, str) else None
        if command is None:
            info = {**self._info(), "invalid_action": True, "success": False}
            return Transition(self._with_commands(NOT_ADMISSIBLE), 0.0, False, False, info)
        state, score, done = self._game.step(command)
        reward = float(state["intermediate_reward"]) if self.intermediate_reward else float(score - self._score)
        self._score = score
        won = bool(state["won"])
        self._done = bool(done or won or state["lost"])
        self._remember(state)
        text = clean_feedback(state.feedback)
        info = {**self._info(), "success": won}
        return Transition(text if self._done else self._with_commands(text), reward, self._done, False, info)

    # ------------------------------------------------------------------ the expert

    def expert_actions(self, task: Task) -> list[str]:
        if task.id not in self._walkthroughs:
            game = json.loads((self._ensure_game(task) / "game.json").read_text())
            self._walkthroughs[task.id] = list(game["metadata"].get("walkthrough") or [])
        return list(self._walkthroughs[task.id])

    def close(self) -> None:
        if self._game is not None:
            game, self._game, self._game_file = self._game, None, None
            game.close()
