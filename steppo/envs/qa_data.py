"""Multi-hop QA data for the search environment: answer scoring, dataset loaders, a synthetic
knowledge base, and a BM25 passage index.

Answer scoring is the SQuAD/HotpotQA convention: lower-case, drop punctuation and the articles
a/an/the, collapse whitespace; exact match (EM) compares the normalised strings, F1 their token
bags (HotpotQA's rule: a yes/no/noanswer on either side scores 0 unless both agree), each taken
as the best over the gold answer's aliases.

Every loader returns a `QAData`: passages, and questions already split into train/dev/test.

* ``load_hotpotqa``: the 588 HotpotQA dev questions of ``hotpotqa/questions.jsonl`` over
  ``corpus.jsonl`` (5,721 passages). Split rule on the question id:
  ``int(sha256(id).hexdigest(), 16) % 10`` -> 0-7 train, 8 dev, 9 test (459/62/67 of the 588 here).
* ``load_musique``: the 100 MuSiQue questions over their 1,890-passage corpus, all in test
  (out-of-domain evaluation only).
* ``load_2wiki_passages``: 2WikiMultihopQA paragraphs, extra distractors for a corpus.
* ``synthetic_kb``: a generated world whose questions chain ``hops`` lookups.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from steppo.envs.base import SPLITS, EnvError

# ----------------------------------------------------------------------------- scoring

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower, strip punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)  # harmonic mean of token P and R


def f1_score(prediction: str, golds: list[str]) -> float:
    """Token-level F1 against the best-matching gold answer."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Question:
    """One question; `support` lists its gold passage ids in the order a reader needs them."""

    qid: str
    question: str
    answers: tuple[str, ...]  # the answer first, then aliases
    support: tuple[str, ...]
    task_type: str


@dataclass
class QAData:
    passages: list[Passage]
    splits: dict[str, list[Question]] = field(default_factory=dict)


def hash_split(qid: str) -> str:
    """Deterministic split of a question id: sha256 mod 10 -> 0-7 train, 8 dev, 9 test."""
    bucket = int(hashlib.sha256(qid.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("dev" if bucket == 8 else "test")


def _by_split(questions: list[Question], rule) -> dict[str, list[Question]]:
    out: dict[str, list[Question]] = {s: [] for s in SPLITS}
    for q in sorted(questions, key=lambda q: q.qid):
        out[rule(q.qid)].append(q)
    return out


def _words(text: str) -> set[str]:
    return set(normalize_answer(text).split())


# ----------------------------------------------------------------------------- loaders


def load_hotpotqa(folder: Path) -> QAData:
    """`questions.jsonl` + `corpus.jsonl` (see the folder's README), split by `hash_split`.

    Support order: the supporting paragraph whose title shares more words with the question
    comes first (in a bridge question that is the entity the question names)."""
    passages = [Passage(r["id"], r["title"], r["text"]) for r in _jsonl(folder / "corpus.jsonl")]
    title_of = {p.id: p.title for p in passages}
    questions = []
    for r in _jsonl(folder / "questions.jsonl"):
        gold, seen = [], set()
        for pid in r["paragraph_ids"]:
            if title_of[pid] in r["supporting_titles"] and title_of[pid] not in seen:
                gold.append(pid)
                seen.add(title_of[pid])
        asked = _words(r["question"])
        gold.sort(key=lambda pid: -len(_words(title_of[pid]) & asked) / max(len(_words(title_of[pid])), 1))
        kind = r.get("type") or "unlabelled"
        questions.append(Question(r["id"], r["question"].strip(), tuple(r["answers"]), tuple(gold), kind))
    return QAData(passages, _by_split(questions, hash_split))


def load_musique(folder: Path) -> QAData:
    """`musique_train100_hipporag.json` over its corpus; every question in test. Support
    order follows the question decomposition (hop 1 first)."""
    corpus = json.loads((folder / "musique_train100_hipporag_corpus.json").read_text())
    passages = [Passage(f"musique-p{i:05d}", p["title"], p["text"]) for i, p in enumerate(corpus)]
    pid_of = {(p.title, " ".join(p.text.split())): p.id for p in passages}
    questions = []
    for r in json.loads((folder / "musique_train100_hipporag.json").read_text()):
        paragraphs = {p["idx"]: p for p in r["paragraphs"]}
        gold = []
        for hop in r["question_decomposition"]:
            p = paragraphs[hop["paragraph_support_idx"]]
            pid = pid_of.get((p["title"], " ".join(p["paragraph_text"].split())))
            if pid is not None and pid not in gold:
                gold.append(pid)
        answers = (r["answer"], *r.get("answer_aliases", []))
        questions.append(Question(r["id"], r["question"], answers, tuple(gold), r["id"].split("__")[0]))
    return QAData(passages, _by_split(questions, lambda qid: "test"))


def load_2wiki_passages(folder: Path) -> list[Passage]:
    corpus = json.loads((folder / "2wikimultihopqa_corpus_hipporag.json").read_text())
    return [Passage(f"2wiki-p{i:05d}", p["title"], p["text"]) for i, p in enumerate(corpus)]


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- synthetic world

# (relation, subject type, object type, fact, noun phrase, question)
RELATIONS = [
    ("maker", "product", "company", "{s} is made by {o}.", "the company that makes {s}", "Which company makes {s}?"),
    ("founder", "company", "person", "{s} was founded by {o}.", "the founder of {s}", "Who founded {s}?"),
    ("headquarters", "company", "city", "{s} is headquartered in {o}.", "the city where {s} is headquartered",
     "In which city is {s} headquartered?"),
    ("birthplace", "person", "city", "{s} was born in {o}.", "the birthplace of {s}", "In which city was {s} born?"),
    ("employer", "person", "company", "{s} works for {o}.", "the employer of {s}", "Which company does {s} work for?"),
    ("country", "city", "country", "{s} is a city in {o}.", "the country of {s}", "In which country is {s}?"),
    ("mayor", "city", "person", "The mayor of {s} is {o}.", "the mayor of {s}", "Who is the mayor of {s}?"),
    ("leader", "country", "person", "The leader of {s} is {o}.", "the leader of {s}", "Who leads {s}?"),
]
ENTITY_TYPES = ("product", "company", "person", "city", "country")
_ONSETS = "b br d dr f g k kr l m n p r s st t tr v z sh".split()
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "k", "th"]
_SUFFIX = {
    "product": ["Lamp", "Phone", "Kettle", "Drone", "Watch", "Bicycle", "Camera", "Radio"],
    "company": ["Labs", "Works", "Industries", "Systems", "Group", "Motors"],
    "city": ["", "", "ville", "burg", "port", "ford"],
    "country": ["ia", "land", "stan", "a", ""],
}


def _syllable_name(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return word.capitalize()


def _entity_name(rng: random.Random, kind: str) -> str:
    if kind == "person":
        return f"{_syllable_name(rng, rng.randint(1, 2))} {_syllable_name(rng, rng.randint(2, 3))}"
    if kind in ("product", "company"):
        return f"{_syllable_name(rng, rng.randint(2, 3))} {rng.choice(_SUFFIX[kind])}"
    return _syllable_name(rng, rng.randint(2, 3)) + rng.choice(_SUFFIX[kind])


def synthetic_kb(seed: int, hops: int, num_questions: dict[str, int], world_entities: int | None = None) -> QAData:
    """A random world of named products, companies, people, cities and countries, one passage
    per entity listing its facts, and questions that chain `hops` facts ("Who founded the
    company that makes Zorvik Lamp?"). By default each split has its own entities (no fact a
    training question touches answers an evaluation question). With `world_entities` every
    split asks about one world of that many entities per type: evaluation questions are still
    never asked in training (no split repeats a (start entity, relation path) of another), but
    their entities and facts appear in training passages. Deterministic in its arguments."""
    if hops < 1:
        raise ValueError("synthetic hops must be >= 1")
    rng = random.Random(f"searchqa-synthetic/{seed}/{hops}")
    used: set[str] = set()
    passages: list[Passage] = []
    splits: dict[str, list[Question]] = {}
    seen: set[tuple] = set()  # (start, path) of every question made so far, across splits

    def make_world(per_type: int) -> tuple[dict, dict, dict]:
        names: dict[str, list[str]] = {}
        for kind in ENTITY_TYPES:
            names[kind] = []
            while len(names[kind]) < per_type:
                name = _entity_name(rng, kind)
                if name not in used:
                    used.add(name)
                    names[kind].append(name)
        facts: dict[tuple[str, str], str] = {}  # (entity, relation) -> object entity
        pid_of: dict[str, str] = {}
        for kind in ENTITY_TYPES:
            for name in names[kind]:
                sentences = [f"{name} is a {kind}."]
                for rel, subj, obj, fact, _, _ in RELATIONS:
                    if subj == kind:
                        facts[(name, rel)] = target = rng.choice(names[obj])
                        sentences.append(fact.format(s=name, o=target))
                pid_of[name] = f"synthetic-p{len(passages):05d}"
                passages.append(Passage(pid_of[name], name, " ".join(sentences)))
        return names, facts, pid_of

    if world_entities is not None:
        if world_entities < 2:
            raise ValueError("synthetic world_entities must be >= 2")
        world = make_world(world_entities)
    for split in SPLITS:
        n = num_questions.get(split, 0)
        if world_entities is None:
            world = make_world(max(8, (n + 1) // 2))
        splits[split] = _chain_questions(rng, split, n, hops, *world, seen)
    return QAData(passages, splits)


def _chain_questions(rng, split, n, hops, names, facts, pid_of, seen: set[tuple]) -> list[Question]:
    out: list[Question] = []
    by_subject = {kind: [r for r in RELATIONS if r[1] == kind] for kind in ENTITY_TYPES}
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * max(n, 1):
            raise ValueError(f"synthetic: could not make {n} distinct {hops}-hop {split} questions")
        kind = rng.choice([k for k in ENTITY_TYPES if by_subject[k]])
        start = rng.choice(names[kind])
        chain, path = [start], []
        while len(path) < hops and by_subject[kind]:
            rel = rng.choice(by_subject[kind])
            path.append(rel)
            chain.append(facts[(chain[-1], rel[0])])
            kind = rel[2]
        if len(path) < hops or len(set(chain)) < len(chain) or (start, tuple(r[0] for r in path)) in seen:
            continue
        seen.add((start, tuple(r[0] for r in path)))
        phrase = start
        for rel in path[:-1]:
            phrase = rel[4].format(s=phrase)
        text = path[-1][5].format(s=phrase)
        support = tuple(pid_of[e] for e in chain[:-1])
        out.append(Question(f"{split}-{len(out):05d}", text, (chain[-1],), support, f"{hops}hop"))
    return out


# ----------------------------------------------------------------------------- retrieval


class PassageIndex:
    """BM25 (bm25s, Lucene variant, English stopwords) over "title. text" of each passage."""

    def __init__(self, passages: list[Passage]):
        try:
            import bm25s
        except ImportError as exc:
            raise EnvError("the searchqa environment needs bm25s: pip install 'steppo[envs]'") from exc
        self._bm25s = bm25s
        self.passages = passages
        texts = [f"{p.title}. {p.text}" for p in passages]
        tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
        self.vocab = set(tokens.vocab)
        self.retriever = bm25s.BM25()
        self.retriever.index(tokens, show_progress=False)

    def search(self, query: str, k: int) -> list[int]:
        """Indices of the top-`k` passages with a positive score, best first."""
        words = self._bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        words = [w for w in words if w in self.vocab]
        if not words:
            return []
        k = min(k, len(self.passages))
        ids, scores = self.retriever.retrieve([words], k=k, show_progress=False, n_threads=1)
        return [int(i) for i, s in zip(ids[0], scores[0]) if s > 0]
