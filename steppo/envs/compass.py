"""Compass: the built-in environment, pure Python, with a sparse reward at the end of several
steps.

The agent walks a grid of rooms to a buried treasure and must ``dig`` there, once: digging
anywhere else ends the episode with nothing, and so does running out of moves. The reward is 1
for the treasure, 0 otherwise, at the last step. Each task has a move budget (shortest walk +
``slack``); walls (``wall_prob``) block some moves and cost a step when bumped into.

With ``hint="every_step"`` (default) each observation restates the bearing and the moves left,
so the right move is readable from the last observation and the difficulty is acting well over
many steps (walls are only revealed by bumping into them, with the open ways listed then); with
``hint="start"`` the bearing is given once and the agent must count its own
moves from the history (a memory task).

Expert demonstrations are noisy on purpose: with probability ``expert_noise`` per step the
expert wanders off the shortest walk (while its budget still allows a success), like human
demonstrations that reach the goal inefficiently. Behaviour cloning copies the wandering;
reinforcement learning has to learn that the early detours are what later costs the treasure.

Params: ``min_distance``, ``max_distance`` (Manhattan distance of the treasure), ``slack``,
``wall_prob``, ``hint``, ``expert_noise``, ``num_tasks`` (per split), ``action_format``
(``text``: "go north"; ``tool_call``: ``<tool_call>{"name": "move", "arguments":
{"direction": "north"}}</tool_call>`` and ``dig``). Tasks are generated from their seed; train,
dev and test draw from disjoint seed ranges.
"""

from __future__ import annotations

import random
from typing import Any

from steppo.envs.actions import ToolCall
from steppo.envs.base import EnvSettings, Task, TextEnv, Transition

MOVES = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
COMMANDS = [f"go {d}" for d in MOVES] + ["dig"]
LANDMARKS = [
    "old mill", "stone well", "broken gate", "red barn", "tall oak", "chapel", "watchtower",
    "fountain", "bridge", "market", "lighthouse", "orchard", "quarry", "windmill", "camp",
]
SPLIT_OFFSET = {"train": 0, "dev": 1_000_000, "test": 2_000_000}
TOOLS = {
    "move": {
        "description": "Walk to the next room in a direction.",
        "parameters": {
            "type": "object",
            "properties": {"direction": {"type": "string", "enum": list(MOVES)}},
            "required": ["direction"],
        },
    },
    "dig": {"description": "Dig for the treasure here.", "parameters": {"type": "object", "properties": {}}},
}


def _rooms(n: int) -> str:
    return f"{n} room" if n == 1 else f"{n} rooms"


def bearing(dx: int, dy: int, short: bool = False) -> str:
    """'2 rooms north and 1 room west' (short: '2 north, 1 west'), or 'right here'."""
    parts = []
    if dy:
        parts.append((str(abs(dy)) if short else _rooms(abs(dy))) + (" north" if dy > 0 else " south"))
    if dx:
        parts.append((str(abs(dx)) if short else _rooms(abs(dx))) + (" east" if dx > 0 else " west"))
    return (", " if short else " and ").join(parts) if parts else "right here"


class CompassEnv(TextEnv):
    name = "compass"

    def __init__(
        self,
        settings: EnvSettings | None = None,
        min_distance: int = 2,
        max_distance: int = 4,
        slack: int = 3,
        wall_prob: float = 0.15,
        hint: str = "every_step",
        expert_noise: float = 0.25,
        num_tasks: dict[str, int] | None = None,
        action_format: str = "text",
    ):
        super().__init__(settings)
        if not 1 <= min_distance <= max_distance:
            raise ValueError("compass needs 1 <= min_distance <= max_distance")
        if hint not in ("every_step", "start"):
            raise ValueError("compass hint must be 'every_step' or 'start'")
        if action_format not in ("text", "tool_call"):
            raise ValueError("compass action_format must be 'text' or 'tool_call'")
        self.min_distance, self.max_distance = min_distance, max_distance
        self.slack, self.wall_prob, self.hint, self.expert_noise = slack, wall_prob, hint, expert_noise
        self.num_tasks = {"train": 2000, "dev": 200, "test": 500, **(num_tasks or {})}
        self.action_format = action_format
        self.tools = TOOLS if action_format == "tool_call" else None
        self.pos = (0, 0)

    @classmethod
    def default_settings(cls) -> EnvSettings:
        return EnvSettings(max_steps=12, show_admissible=False, max_new_tokens=8)

    def system_prompt(self) -> str:
        intro = "You are exploring a grid of rooms to find a buried treasure. Dig only where it is buried. "
        if self.action_format == "tool_call":
            example = self.call_example()
            how = f"Call exactly one tool per turn, as {example}. " if example else "Call exactly one tool per turn."
            return (intro + how + self.tool_list()).rstrip()
        return intro + "Reply with exactly one command: go north, go south, go east, go west, or dig."

    # ------------------------------------------------------------------ tasks

    def tasks(self, split: str) -> list[Task]:
        if split not in SPLIT_OFFSET:
            raise ValueError(f"compass has splits {list(SPLIT_OFFSET)}, not {split!r}")
        return [self._task(split, SPLIT_OFFSET[split] + i) for i in range(self.num_tasks[split])]

    def _task(self, split: str, seed: int) -> Task:
        rng = random.Random(seed)
        while True:
            dx = rng.randint(-self.max_distance, self.max_distance)
            dy = rng.randint(-self.max_distance, self.max_distance)
            if self.min_distance <= abs(dx) + abs(dy) <= self.max_distance:
                break
        span = range(-self.max_distance - 2, self.max_distance + 3)
        while True:  # walls that leave the treasure reachable
            walls = sorted((x, y, d) for x in span for y in span for d in MOVES if rng.random() < self.wall_prob)
            path = _shortest_path((0, 0), (dx, dy), set(walls), self.max_distance + 2)
            if path is not None:
                break
        return Task(
            id=f"compass/{split}/{seed}",
            split=split,
            seed=seed,
            payload={
                "target": (dx, dy),
                "landmark": rng.choice(LANDMARKS),
                "walls": walls,
                "budget": len(path) + 1 + self.slack,  # moves + dig + slack
            },
        )

    # ------------------------------------------------------------------ playing

    def _status(self) -> str:
        tx, ty = self.task.payload["target"]
        left = self.task.payload["budget"] - self.steps_taken
        moves = f"{left} move{'s' if left != 1 else ''} left."
        if self.hint == "start":
            return moves
        return f"Treasure: {bearing(tx - self.pos[0], ty - self.pos[1], short=True)}. {moves}"

    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        self.pos = (0, 0)
        self._walls = {tuple(w) for w in task.payload["walls"]}
        tx, ty = task.payload["target"]
        text = (
            f"You stand by the {task.payload['landmark']}. A treasure is buried {bearing(tx, ty)} of here. "
            f"You have {task.payload['budget']} moves. Walk there and dig."
        )
        return text, {"anchor": self.anchor(), "admissible": COMMANDS}

    def anchor(self) -> str:
        # The state is the position and the moves used (the target is fixed by the task).
        return f"pos={self.pos[0]},{self.pos[1]};t={self.steps_taken}"

    def _act(self, action: str | ToolCall) -> Transition:
        if isinstance(action, ToolCall):
            command = "dig" if action.name == "dig" else f"go {action.arguments.get('direction', '')}"
        else:
            command = action
        info: dict[str, Any] = {"admissible": COMMANDS, "success": False}
        if command == "dig":
            found = self.pos == tuple(self.task.payload["target"])
            info.update(success=found, anchor=self.anchor())
            obs = "You dig and find the treasure!" if found else "You dig and find nothing."
            return Transition(obs, 1.0 if found else 0.0, True, False, info)
        direction = command[3:] if command.startswith("go ") else None
        if direction not in MOVES:
            obs = "Unknown command. Commands: " + ", ".join(COMMANDS) + "."
            info["invalid_action"] = True
        elif (self.pos[0], self.pos[1], direction) in self._walls:
            exits = [d for d in MOVES if (self.pos[0], self.pos[1], d) not in self._walls]
            obs = f"You cannot go {direction}: a wall. Open ways: {', '.join(exits)}."
            info["invalid_action"] = True
        else:
            self.pos = (self.pos[0] + MOVES[direction][0], self.pos[1] + MOVES[direction][1])
            obs = f"You go {direction}."
        info["anchor"] = self.anchor()
        if self.steps_taken >= self.task.payload["budget"]:
            return Transition(obs + " You are out of moves.", 0.0, False, True, info)
        return Transition(f"{obs} {self._status()}", 0.0, False, False, info)

    # ------------------------------------------------------------------ the expert

    def expert_actions(self, task: Task) -> list[str]:
        """Shortest walks with seeded detours (probability `expert_noise` per move, only while
        the budget still allows a success), then dig."""
        rng = random.Random(task.seed + 7)
        walls = {tuple(w) for w in task.payload["walls"]}
        target, budget, limit = tuple(task.payload["target"]), task.payload["budget"], self.max_distance + 2
        pos, moves = (0, 0), []
        while pos != target:
            path = _shortest_path(pos, target, walls, limit, rng)
            left = budget - len(moves) - 1  # keep one move for dig
            detours = [d for d in MOVES if d != path[0] and (pos[0], pos[1], d) not in walls]
            if detours and rng.random() < self.expert_noise:
                d = rng.choice(detours)
                q = (pos[0] + MOVES[d][0], pos[1] + MOVES[d][1])
                back = _shortest_path(q, target, walls, limit)
                if back is not None and 1 + len(back) <= left:
                    moves.append(d)
                    pos = q
                    continue
            moves.append(path[0])
            pos = (pos[0] + MOVES[path[0]][0], pos[1] + MOVES[path[0]][1])
        commands = [f"go {d}" for d in moves] + ["dig"]
        if self.action_format == "tool_call":
            call = self.tool_call_text
            return [call("dig") if c == "dig" else call("move", direction=c[3:]) for c in commands]
        return commands


def _shortest_path(start, target, walls, limit: int, rng: random.Random | None = None) -> list[str] | None:
    """Breadth-first directions from start to target inside |x|,|y| <= limit (ties broken by
    `rng` when given)."""
    frontier, parent = [start], {start: None}
    while frontier and target not in parent:
        nxt = []
        for pos in frontier:
            dirs = list(MOVES)
            if rng is not None:
                rng.shuffle(dirs)
            for d in dirs:
                q = (pos[0] + MOVES[d][0], pos[1] + MOVES[d][1])
                if (pos[0], pos[1], d) in walls or q in parent or max(abs(q[0]), abs(q[1])) > limit:
                    continue
                parent[q] = (pos, d)
                nxt.append(q)
        frontier = nxt
    if target not in parent:
        return None
    path, pos = [], target
    while parent[pos] is not None:
        pos, d = parent[pos]
        path.append(d)
    return path[::-1]
