"""SearchQA: multi-hop question answering with a search tool (Search-R1 style, tool calls).

Each turn the agent calls one tool, Qwen/Hermes style::

    <tool_call>{"name": "search", "arguments": {"query": "VIVA Media"}}</tool_call>
    <tool_call>{"name": "answer", "arguments": {"text": "Gesellschaft mit beschränkter Haftung"}}</tool_call>

``search`` returns the ``top_k`` BM25 passages as numbered "title: text" lines (each cut to
``passage_chars``); ``answer`` ends the episode with reward = exact match (SQuAD/HotpotQA
normalisation), ``info["success"]`` = EM and ``info["f1"]`` = token F1. Running out of steps
ends it with reward 0 (``info["f1"] = 0``). Malformed calls, unknown tools and missing
arguments are the base class's (``format_penalty``); an empty query is an invalid action.

Params:
    source: ``hotpotqa`` | ``musique`` | ``synthetic`` | ``auto`` (default: hotpotqa when its
        data is found, else synthetic, with a warning).
    data_dir: the source's data folder (default ``<data dir>/hotpotqa`` or ``/musique``).
    extra_distractors: hotpotqa only: add the 6,119 2WikiMultihopQA paragraphs to the corpus
        (default: when ``2wikimultihopqa/`` is found beside ``data_dir`` or in the data dir).
    top_k: passages per search (3). passage_chars: characters kept per passage (400).
    hops, seed, num_tasks: synthetic only: lookups per question (2), the world's seed (0),
        questions per split ({"train": 1000, "dev": 100, "test": 200}), world_entities: one world
        of that many entities per type for every split (default: each split its own; see
        `steppo.envs.qa_data.synthetic_kb`).

Splits: hotpotqa by a hash of the question id (`steppo.envs.qa_data.hash_split`: 459 train,
62 dev, 67 test of 588); musique all 100 in test (out-of-domain evaluation; no train, no dev);
synthetic generates each split from its own entities (or, with world_entities, asks each split
different questions about one world).

The anchor (GiGPO state key) is a hash of the question id and the set of passages retrieved so
far. The expert searches each supporting passage's title, in reading order, then answers.
Each process loads a source and builds its BM25 index once (about a second for 12k passages);
environments in the same process share them.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from pathlib import Path
from typing import Any

from steppo.envs.actions import ToolCall
from steppo.envs.base import SPLITS, EnvSettings, Task, TextEnv, Transition
from steppo.envs.qa_data import (
    PassageIndex,
    QAData,
    exact_match,
    f1_score,
    load_2wiki_passages,
    load_hotpotqa,
    load_musique,
    synthetic_kb,
)
from steppo.paths import default_data_dir, require_data

SOURCES = ("auto", "hotpotqa", "musique", "synthetic")
TOOLS = {
    "search": {
        "description": "Search the passage collection; returns the best-matching passages.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "keywords, e.g. an entity name"}},
            "required": ["query"],
        },
    },
    "answer": {
        "description": "Give the final answer (a short span: a name, date, number, yes or no) and stop.",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    },
}

_WORLDS: dict[tuple, tuple[QAData, PassageIndex]] = {}  # per process: corpus key -> data, index
_WORLDS_LOCK = threading.Lock()


def _world(key: tuple, load) -> tuple[QAData, PassageIndex]:
    with _WORLDS_LOCK:
        if key not in _WORLDS:
            data = load()
            _WORLDS[key] = (data, PassageIndex(data.passages))
        return _WORLDS[key]


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut + "..."


class SearchQAEnv(TextEnv):
    name = "searchqa"
    action_format = "tool_call"
    tools = TOOLS

    def __init__(
        self,
        settings: EnvSettings | None = None,
        source: str = "auto",
        data_dir: str | None = None,
        extra_distractors: bool | None = None,
        top_k: int = 3,
        passage_chars: int = 400,
        hops: int = 2,
        seed: int = 0,
        num_tasks: dict[str, int] | None = None,
        world_entities: int | None = None,
    ):
        super().__init__(settings)
        if source not in SOURCES:
            raise ValueError(f"searchqa source must be one of {SOURCES}, got {source!r}")
        if top_k < 1 or passage_chars < 20:
            raise ValueError("searchqa needs top_k >= 1 and passage_chars >= 20")
        self.top_k, self.passage_chars = top_k, passage_chars
        if source == "auto":
            source = "hotpotqa" if data_dir or _found("hotpotqa") else "synthetic"
            if source == "synthetic":
                warnings.warn("searchqa: no hotpotqa data found; using the synthetic source", stacklevel=2)
        self.source = source
        if source == "hotpotqa":
            folder = require_data("hotpotqa", data_dir, "HotpotQA").resolve()
            extra = _distractor_dir(folder, extra_distractors)
            key = ("hotpotqa", str(folder), str(extra))
            self.data, self.index = _world(key, lambda: _with_distractors(load_hotpotqa(folder), extra))
        elif source == "musique":
            folder = require_data("musique", data_dir, "MuSiQue").resolve()
            self.data, self.index = _world(("musique", str(folder)), lambda: load_musique(folder))
        else:
            sizes = {"train": 1000, "dev": 100, "test": 200, **(num_tasks or {})}
            key = ("synthetic", seed, hops, tuple(sorted(sizes.items())), world_entities)
            self.data, self.index = _world(key, lambda: synthetic_kb(seed, hops, sizes, world_entities))
        self._questions = {q.qid: q for qs in self.data.splits.values() for q in qs}
        self._row = {p.id: i for i, p in enumerate(self.data.passages)}
        self.retrieved: set[str] = set()

    @classmethod
    def default_settings(cls) -> EnvSettings:
        return EnvSettings(max_steps=6, show_admissible=False, max_new_tokens=128)

    def system_prompt(self) -> str:
        example = self.call_example()
        return (
            "Answer the question with the help of a search engine over a collection of passages. "
            "Questions may need several searches: look up one entity at a time and follow the facts. "
            "Each turn, think briefly, then call exactly one tool" + (f" as {example}. " if example else ". ") +
            "Answer with a short span (a name, date, number, yes or no). " + self.tool_list()
        ).rstrip()

    # ------------------------------------------------------------------ tasks

    def tasks(self, split: str) -> list[Task]:
        if split not in SPLITS:
            raise ValueError(f"searchqa has splits {list(SPLITS)}, not {split!r}")
        out = []
        for q in self.data.splits.get(split, []):
            payload = {"question": q.question, "answer": q.answers[0], "qid": q.qid, "task_type": q.task_type}
            if len(q.answers) > 1:
                payload["aliases"] = list(q.answers[1:])
            seed = int(hashlib.sha256(q.qid.encode()).hexdigest()[:8], 16)
            out.append(Task(f"searchqa/{self.source}/{split}/{q.qid}", split, seed, payload))
        return out

    # ------------------------------------------------------------------ playing

    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        self.retrieved = set()
        return f"Question: {task.payload['question']}", {"anchor": self.anchor()}

    def anchor(self) -> str:
        # The state is what the agent has found so far (the question is fixed by the task).
        key = json.dumps([self.task.payload["qid"], sorted(self.retrieved)])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def _act(self, action: str | ToolCall) -> Transition:
        args = action.arguments
        if action.name == "answer":
            text = args["text"]
            if isinstance(text, (int, float)) and not isinstance(text, bool):
                text = str(text)
            if not isinstance(text, str):
                return self._invalid('"text" must be a string')
            golds = [self.task.payload["answer"], *self.task.payload.get("aliases", [])]
            em, f1 = exact_match(text, golds), f1_score(text, golds)
            info = {"success": bool(em), "em": em, "f1": f1, "anchor": self.anchor()}
            return Transition(f"Answer submitted: {text}", em, True, False, info)
        query = args["query"]
        if not isinstance(query, str) or not query.strip():
            return self._invalid('"query" must be a non-empty string')
        rows = self.index.search(query, self.top_k)
        self.retrieved.update(self.data.passages[r].id for r in rows)
        lines = [
            f"[{n}] {self.data.passages[r].title}: {_clip(self.data.passages[r].text, self.passage_chars)}"
            for n, r in enumerate(rows, 1)
        ]
        return self._observe("\n".join(lines) if lines else "No passage matches that query.", {})

    def _invalid(self, reason: str) -> Transition:
        return self._observe(f"Invalid action: {reason}.", {"invalid_action": True})

    def _observe(self, text: str, info: dict[str, Any]) -> Transition:
        info = {"success": False, **info, "anchor": self.anchor()}
        left = self.settings.max_steps - self.steps_taken
        if left <= 0:
            return Transition(text + "\nOut of steps.", 0.0, False, True, {**info, "f1": 0.0, "em": 0.0})
        if left == 1:
            text += "\nOne step left: answer now."
        return Transition(text, 0.0, False, False, info)

    # ------------------------------------------------------------------ the expert

    def expert_actions(self, task: Task) -> list[str]:
        """Search each supporting passage's title (in reading order), then give the gold answer."""
        q = self._questions[task.payload["qid"]]
        titles = list(dict.fromkeys(self.data.passages[self._row[pid]].title for pid in q.support))
        searches = [self.tool_call_text("search", query=t) for t in titles]
        return searches + [self.tool_call_text("answer", text=q.answers[0])]


def _found(subdir: str) -> bool:
    root = default_data_dir()
    return root is not None and (root / subdir).is_dir()


def _distractor_dir(hotpot_dir: Path, wanted: bool | None) -> Path | None:
    """The 2WikiMultihopQA folder beside `hotpot_dir` or in the data dir (None when off)."""
    if wanted is False:
        return None
    root = default_data_dir()
    for candidate in (hotpot_dir.parent / "2wikimultihopqa", root / "2wikimultihopqa" if root else None):
        if candidate is not None and candidate.is_dir():
            return candidate.resolve()
    if wanted:
        require_data("2wikimultihopqa", None, "2WikiMultihopQA (extra_distractors)")
    return None


def _with_distractors(data: QAData, extra: Path | None) -> QAData:
    if extra is not None:
        data.passages = data.passages + load_2wiki_passages(extra)
    return data
