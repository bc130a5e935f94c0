"""Guess a number from 1 to 16 in at most 6 guesses; the answer says higher or lower."""
import random

from steppo.envs.base import EnvSettings, Task, TextEnv, Transition

SPLITS = {"train": range(0, 2000), "dev": range(10_000, 10_200), "test": range(20_000, 20_500)}


class GuessEnv(TextEnv):
    name = "guess"

    @classmethod
    def default_settings(cls) -> EnvSettings:
        return EnvSettings(max_steps=6, show_admissible=False, max_new_tokens=6)

    def system_prompt(self) -> str:
        return "I think of a number from 1 to 16. Reply with one guess per turn, like: guess 8"

    def tasks(self, split: str) -> list[Task]:
        return [Task(f"guess/{split}/{s}", split, s, {"number": random.Random(s).randint(1, 16)})
                for s in SPLITS[split]]

    def _reset(self, task: Task):
        return "Guess my number.", {"anchor": "start"}

    def _act(self, action: str) -> Transition:
        number, words = self.task.payload["number"], action.split()
        if len(words) != 2 or words[0] != "guess" or not words[1].isdigit():
            return Transition("Say: guess N", 0.0, False, False, {"invalid_action": True})
        guess = int(words[1])
        if guess == number:
            return Transition("Correct!", 1.0, True, False, {"success": True})
        hint = "Higher." if guess < number else "Lower."
        return Transition(hint, 0.0, False, False, {"success": False})

    def expert_actions(self, task: Task) -> list[str]:  # binary search: at most 5 guesses
        low, high, actions = 1, 16, []
        while True:
            mid = (low + high) // 2
            actions.append(f"guess {mid}")
            if mid == task.payload["number"]:
                return actions
            low, high = (mid + 1, high) if mid < task.payload["number"] else (low, mid - 1)
