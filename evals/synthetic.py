"""The synthetic benchmark, generated locally and deterministically from a seed: key information (a needle) at a
chosen depth of a haystack. Tasks: `passkey` (repetitive filler), `needle` (one key-value fact in natural-looking
text), `multi_key` (the asked key among distractor keys), `multi_value` (one key with two values), `multi_question`
(four facts, four questions about one compressed context). Samples, answers and scoring."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from utils import UserError


SYNTHETIC_TASKS = ("passkey", "needle", "multi_key", "multi_value", "multi_question")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
EVAL_MODES = ("question_agnostic", "question_aware")

# ---------------------------------------------------------------------------------------------------------------
# Haystacks

REPETITIVE_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

_NAMES = ["Arden", "Belmora", "Corvath", "Dunmere", "Elstow", "Farrow", "Galden", "Hollin", "Istra", "Jorvale",
          "Kestrel", "Lunhaven", "Marrow", "Nethby", "Orsk", "Pellam", "Quarry", "Rushton", "Selwick", "Tamber",
          "Ulvern", "Varrow", "Westmere", "Yarrow", "Zennor"]
_PEOPLE = ["the miller", "an old weaver", "the harbour master", "a travelling scholar", "the blacksmith's daughter",
           "a retired captain", "the village teacher", "two young shepherds", "the town clerk", "a quiet potter"]
_THINGS = ["barley", "wool", "salt", "copper pots", "linen", "apples", "slate", "honey", "rope", "dried fish",
           "candles", "timber", "cheese", "glass beads", "leather boots"]
_PLACES = ["market square", "river ford", "stone bridge", "old mill", "harbour wall", "chapel yard", "hill road",
           "orchard", "north gate", "library steps"]
_SEASONS = ["spring", "summer", "autumn", "winter"]
_ADJ = ["quiet", "busy", "narrow", "windy", "crowded", "sunlit", "muddy", "peaceful", "ancient", "famous"]
_TEMPLATES = [
    "In {season}, {person} from {town} usually carried {thing} to the {place}.",
    "The {adj} {place} of {town} was rebuilt after the great flood, and {person} still remembers it.",
    "Traders from {town2} often exchanged {thing} for {thing2} near the {place}.",
    "{person_cap} once wrote that {town} smelled of {thing} every {season}.",
    "Most evenings the {place} in {town} grew {adj}, as {person} lit the lamps one by one.",
    "A road of {adj} cobbles linked {town} with {town2}, and carts of {thing} passed along it daily.",
    "Nobody in {town} could recall when the {place} had last been this {adj}.",
    "Every {season}, the council of {town} debated the price of {thing} for hours.",
    "{person_cap} kept a small notebook about the weather over the {place}.",
    "Children in {town2} learned to count by sorting {thing} into baskets.",
    "The journey from {town} to {town2} took three days when the {place} was closed.",
    "Visitors praised the {thing2} of {town}, although the locals preferred {thing}.",
]


def natural_sentences(rng: random.Random):
    """An endless stream of varied, natural-looking sentences (project-made: no downloads)."""
    while True:
        person = rng.choice(_PEOPLE)
        yield rng.choice(_TEMPLATES).format(
            season=rng.choice(_SEASONS), person=person, person_cap=person[0].upper() + person[1:],
            town=rng.choice(_NAMES), town2=rng.choice(_NAMES), thing=rng.choice(_THINGS),
            thing2=rng.choice(_THINGS), place=rng.choice(_PLACES), adj=rng.choice(_ADJ)) + " "


def file_sentences(rng: random.Random, haystack_dir: str):
    files = sorted(Path(haystack_dir).glob("*.txt"))
    if not files:
        raise UserError(f"--haystack_dir {haystack_dir!r} holds no .txt files")
    text = " ".join(f.read_text(errors="ignore") for f in files)
    sents = [s.strip() + " " for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    i = rng.randrange(len(sents))
    while True:
        yield sents[i % len(sents)]
        i += 1


def build_haystack(tokenizer, n_tokens: int, kind: str, rng: random.Random, haystack_dir: str | None = None):
    """A list of sentences whose token count sums to about n_tokens."""
    if kind == "repetitive":
        gen = iter(lambda: REPETITIVE_FILLER, None)
    elif haystack_dir:
        gen = file_sentences(rng, haystack_dir)
    else:
        gen = natural_sentences(rng)
    sents, total = [], 0
    for s in gen:
        n = len(tokenizer(s, add_special_tokens=False).input_ids)
        if total + n > n_tokens:
            break
        sents.append(s)
        total += n
    return sents


# ---------------------------------------------------------------------------------------------------------------
# Synthetic samples

@dataclass
class Sample:
    id: str
    task: str
    context: str          # the part that is compressed in question-agnostic mode
    question: str         # read after the context
    answer_prefix: str    # the start of the assistant's reply (primes the format of the answer)
    answers: list         # every string here must appear in the prediction
    depth: float = -1.0
    context_size: int = 0
    meta: dict = field(default_factory=dict)


def _code(rng, digits=5) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _insert(sents: list[str], needles: list[tuple[float, str]]) -> str:
    out = list(sents)
    for depth, needle in sorted(needles, key=lambda x: -x[0]):  # back to front keeps earlier indices valid
        out.insert(int(round(depth * len(sents))), needle + " ")
    return "".join(out)


def make_synthetic_sample(tokenizer, task: str, context_size: int, depth: float, seed: int,
                          haystack_dir: str | None = None) -> Sample:
    """One deterministic sample: the same (task, size, depth, seed) always gives the same text."""
    rng = random.Random(f"{task}|{context_size}|{depth}|{seed}")
    kind = "repetitive" if task == "passkey" else "natural"
    budget = context_size - 40  # leave room for the needle(s) and the instruction
    sents = build_haystack(tokenizer, budget, kind, rng, haystack_dir)
    sid = f"{task}-{context_size}-d{depth:.2f}-s{seed}"
    intro = "Read the following text carefully. It contains important information.\n\n"
    if task == "passkey":
        key = _code(rng)
        # Worded like the needle: with "The pass key is ..." the default model answered 0/10 at 1K even with the
        # full cache (it paraphrases); this wording answers 10/10, so the task measures the cache, not the model.
        ctx = _insert(sents, [(depth, f"The special magic number is {key}.")])
        return Sample(sid, task, intro + ctx, "What is the special magic number?", "The special magic number is",
                      [key], depth, context_size)
    if task == "needle":
        town, key = rng.choice(_NAMES), _code(rng)
        ctx = _insert(sents, [(depth, f"The special magic number for {town} is {key}.")])
        return Sample(sid, task, intro + ctx, f"What is the special magic number for {town}?",
                      f"The special magic number for {town} is", [key], depth, context_size)
    if task == "multi_key":
        towns = rng.sample(_NAMES, 4)
        keys = [_code(rng) for _ in towns]
        others = [d for d in (0.1, 0.35, 0.6, 0.85) if abs(d - depth) > 0.1][:3]
        needles = [(depth, f"The special magic number for {towns[0]} is {keys[0]}.")]
        needles += [(d, f"The special magic number for {t} is {k}.") for d, t, k in zip(others, towns[1:], keys[1:])]
        ctx = _insert(sents, needles)
        return Sample(sid, task, intro + ctx, f"What is the special magic number for {towns[0]}?",
                      f"The special magic number for {towns[0]} is", [keys[0]], depth, context_size,
                      meta={"distractors": keys[1:]})
    if task == "multi_value":
        town = rng.choice(_NAMES)
        keys = [_code(rng), _code(rng)]
        ctx = _insert(sents, [(depth, f"The special magic numbers for {town} are {keys[0]} and {keys[1]}.")])
        return Sample(sid, task, intro + ctx, f"What are the special magic numbers for {town}?",
                      f"The special magic numbers for {town} are", keys, depth, context_size)
    if task == "multi_question":
        # one context, four facts at spread depths (the first at `depth`), asked one after another
        towns = rng.sample(_NAMES, 4)
        keys = [_code(rng) for _ in towns]
        depths = [depth] + [d for d in (0.1, 0.37, 0.63, 0.9) if abs(d - depth) > 0.1][:3]
        ctx = _insert(sents, [(d, f"The special magic number for {t} is {k}.") for d, t, k in zip(depths, towns, keys)])
        qs = [(f"What is the special magic number for {t}?", f"The special magic number for {t} is", [k])
              for t, k in zip(towns, keys)]
        return Sample(sid, task, intro + ctx, qs[0][0], qs[0][1], qs[0][2], depth, context_size,
                      meta={"questions": qs, "depths": depths})
    raise UserError(f"unknown synthetic task {task!r}; accepted: {', '.join(SYNTHETIC_TASKS)}")


def synthetic_samples(tokenizer, task, context_size, num_samples, seed, depths=DEFAULT_DEPTHS, haystack_dir=None):
    """num_samples samples spread evenly over the depths (num_samples=10 with 5 depths: 2 per depth)."""
    return [make_synthetic_sample(tokenizer, task, context_size, depths[i % len(depths)], seed * 1000 + i,
                                  haystack_dir) for i in range(num_samples)]


def answer_complete(sample: Sample):
    """Stop decoding once the first line holds as many whole numbers as the task asks for (what is scored); the
    text generated after that cannot change the score."""
    need = len(sample.answers)

    def done(text: str) -> bool:
        first = text.lstrip().split("\n")[0]
        return "\n" in text.lstrip() or len(re.findall(r"\d+(?=\D)", first)) >= need
    return done


def score_synthetic(sample: Sample, prediction: str) -> float:
    """Exact match: each gold key must appear as a whole number among the prediction's numbers (first line)."""
    first = prediction.strip().split("\n")[0]
    numbers = set(re.findall(r"\d+", first))
    return float(all(a in numbers for a in sample.answers))
