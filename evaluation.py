"""Benchmarks and the evaluation harness.

- Synthetic benchmark: generated locally and deterministically from a seed. Key information (a needle) sits at a
  chosen depth of a haystack; tasks: `passkey` (repetitive filler), `needle` (one key-value fact in natural-looking
  text), `multi_key` (the asked key among distractor keys), `multi_value` (one key with two values).
- Harness: chunked prefill through any cache, then the question, then greedy decoding, timed and with the KV bytes
  the cache really holds. `question_agnostic` mode compresses the context before the question is read;
  `question_aware` compresses context and question together.
"""
from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from utils import UserError, stop_token_ids

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


# ---------------------------------------------------------------------------------------------------------------
# Prompt construction and the harness

def encode_prompt(tokenizer, context: str, question: str, answer_prefix: str = "", use_chat: bool = True):
    """Token ids of (context part, question part). The context part ends where the question begins, so a
    question-agnostic run can compress it before the question is read."""
    if use_chat and getattr(tokenizer, "chat_template", None):
        marker = "\x00QUESTION\x00"
        full = tokenizer.apply_chat_template([{"role": "user", "content": context + marker}], tokenize=False,
                                             add_generation_prompt=True)
        before, after = full.split(marker)
        ctx_text, q_text = before, "\n\n" + question + after + answer_prefix
    else:
        ctx_text, q_text = context, "\n\n" + question + "\n" + answer_prefix
    ctx_ids = tokenizer(ctx_text, add_special_tokens=False).input_ids
    q_ids = tokenizer(q_text, add_special_tokens=False).input_ids
    return ctx_ids, q_ids


@torch.no_grad()
def forward_chunked(model, cache, ids: torch.Tensor, chunk: int, start: int = 0):
    """Feed ids (B, L) through the model in chunks of `chunk` tokens; each chunk may trigger eviction.
    Returns the logits of the last position."""
    L = ids.shape[1]
    logits = None
    for s in range(0, L, chunk):
        e = min(L, s + chunk)
        pos = torch.arange(start + s, start + e, device=ids.device)
        out = model(input_ids=ids[:, s:e], past_key_values=cache, use_cache=True, cache_position=pos,
                    position_ids=pos[None].expand(ids.shape[0], -1), logits_to_keep=1)
        logits = out.logits[:, -1]
    return logits


@torch.no_grad()
def run_generation(model, tokenizer, cache, ctx_ids: list[int], q_ids: list[int], max_new_tokens: int,
                   mode: str = "question_agnostic", chunk: int = 512, press=None, stop_when=None,
                   prefilled: bool = False, fast: bool = False, compile: bool = False):
    """Prefill (chunked), read the question, decode greedily. Returns text, timings and cache sizes.

    `fast`: decode with the static-shape path (`fast_decode.StaticDecoder`, a CUDA graph on CUDA): the prefill is the
    same, then all `max_new_tokens` steps run on the device and the stop rules are applied to the tokens afterwards
    (the same text as the plain loop, which stops early).

    With a kvpress `press`, the compressed part is prefilled in one pass under the press (kvpress compresses only
    in the first forward), as its own pipeline does."""
    import contextlib
    if press is not None:
        ctx = press(model)
        chunk_first = len(ctx_ids) + len(q_ids)
    else:
        ctx = contextlib.nullcontext()
        chunk_first = chunk
    from sparse_kv_cache import cache_nbytes
    dev = model.device
    stops = stop_token_ids(model, tokenizer)
    t0 = time.perf_counter()
    if mode == "question_agnostic":
        if not prefilled:  # a cache that already holds the (compressed) context skips its prefill
            with ctx:
                forward_chunked(model, cache, torch.tensor([ctx_ids], device=dev), chunk_first)
        bytes_after_context = cache_nbytes(cache)
        logits = forward_chunked(model, cache, torch.tensor([q_ids], device=dev), chunk, start=len(ctx_ids))
    else:
        with ctx:
            logits = forward_chunked(model, cache, torch.tensor([ctx_ids + q_ids], device=dev), chunk_first)
        bytes_after_context = cache_nbytes(cache)
    _sync(dev)
    t1 = time.perf_counter()
    peak_bytes = cache_nbytes(cache)
    generated, pos = [], len(ctx_ids) + len(q_ids)
    if fast:
        from fast_decode import StaticDecoder, method_of
        dec = StaticDecoder.from_cache(model, method_of(cache), cache, pos, max_new_tokens, compile=compile)
        cache = None  # the decoder took the entries over
        peak_bytes = bytes_after_context = dec.kv_bytes()
        for tok in dec.generate(logits[0].argmax(), max_new_tokens)[0].tolist():  # then the plain loop's stop rules
            if tok in stops:
                break
            generated.append(tok)
            if stop_when is not None and stop_when(tokenizer.decode(generated, skip_special_tokens=True)):
                break
    else:
        for _ in range(max_new_tokens):
            tok = int(logits[0].argmax())
            if tok in stops:
                break
            generated.append(tok)
            if stop_when is not None and stop_when(tokenizer.decode(generated, skip_special_tokens=True)):
                break
            p = torch.tensor([pos], device=dev)
            out = model(input_ids=torch.tensor([[tok]], device=dev), past_key_values=cache, use_cache=True,
                        cache_position=p, position_ids=p[None])
            logits = out.logits[:, -1]
            if not torch.isfinite(logits).all():
                raise FloatingPointError("NaN or inf in the logits")
            pos += 1
            peak_bytes = max(peak_bytes, cache_nbytes(cache))
    _sync(dev)
    t2 = time.perf_counter()
    from sparse_kv_cache import tier_bytes
    return {
        **(tier_bytes(cache) if cache is not None else
           {"active_kv_bytes": peak_bytes, "summary_bytes": 0, "passive_bytes": 0}),
        "prediction": tokenizer.decode(generated, skip_special_tokens=True),
        "n_generated": len(generated),
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "decode_ms_per_token": 1000 * (t2 - t1) / max(1, len(generated)),
        "kv_bytes": bytes_after_context,
        "kv_bytes_peak": peak_bytes,
        "context_tokens": len(ctx_ids),
        "question_tokens": len(q_ids),
    }


MAX_NEW_TOKENS = {"passkey": 10, "needle": 10, "multi_key": 10, "multi_value": 24, "multi_question": 10}


def make_cache(method: str, model, budget, context_length: int, params: dict | None = None, tokenizer=None):
    """(cache, press): a compressed cache of ours, or for `kvpress:<name>` a DynamicCache and the kvpress press."""
    from sparse_kv_cache import KVCacheFactory
    if method.startswith("kvpress:"):
        from transformers import DynamicCache
        return DynamicCache(), make_kvpress(method.split(":", 1)[1], budget, context_length, params)
    return KVCacheFactory.create(method, model, budget=budget, context_length=context_length, tokenizer=tokenizer,
                                 **(params or {})), None


def make_kvpress(name: str, budget, context_length: int, params: dict | None = None):
    """NVIDIA kvpress's press `name` (snake_case: snapkv, expected_attention, streaming_llm, knorm, tova, ...) with
    compression_ratio = 1 - kept / context, the same budget our methods get."""
    try:
        import kvpress
    except ImportError:
        raise UserError(f"method 'kvpress:{name}' needs NVIDIA kvpress: pip install -r requirements-peers.txt") from None
    from utils import resolve_budget
    presses = {c[:-len("Press")].lower(): c for c in dir(kvpress) if c.endswith("Press") and c != "BasePress"}
    key = name.replace("_", "").lower()
    if key not in presses:
        raise UserError(f"unknown kvpress press {name!r}; available: {', '.join(sorted(presses))}")
    kept = resolve_budget(budget, context_length) if budget is not None else context_length
    ratio = max(0.0, 1.0 - kept / context_length)
    return getattr(kvpress, presses[key])(compression_ratio=ratio, **(params or {}))


def evaluate_synthetic_cell(model, tokenizer, method: str, budget, samples: list[Sample], mode: str, chunk: int,
                            params: dict | None = None, fault: str | None = None, fast: bool = False) -> dict:
    """Run one cell (method x budget x task x size) and return its record; raises on a fault inside the cell.
    `fast`: decode with the static-shape path (`run_generation`)."""
    per_sample = []
    for s in samples:
        if s.task == "multi_question":
            r = run_multi_question(model, tokenizer, s, method, budget, params, mode, chunk)
            per_sample.append(r)
            continue
        ctx_ids, q_ids = encode_prompt(tokenizer, s.context, s.question, s.answer_prefix)
        if fault == "oom":
            raise torch.OutOfMemoryError("injected out-of-memory (ATSKV_INJECT_FAULT)")
        cache, press = make_cache(method, model, budget, len(ctx_ids), params, tokenizer)
        r = run_generation(model, tokenizer, cache, ctx_ids, q_ids, MAX_NEW_TOKENS.get(s.task, 16), mode, chunk,
                           press, stop_when=answer_complete(s), fast=fast)
        if fault == "nan":
            raise FloatingPointError("injected NaN in the logits (ATSKV_INJECT_FAULT)")
        r.update(id=s.id, depth=s.depth, answers=s.answers, score=score_synthetic(s, r["prediction"]))
        per_sample.append(r)
    return summarize_samples(per_sample)


@torch.no_grad()
def run_multi_question(model, tokenizer, s: Sample, method: str, budget, params, mode: str, chunk: int) -> dict:
    """Compress one context once, then ask its questions in turn, each from a copy of the compressed cache (as
    kvpress's pipeline answers several questions from one compressed context). Score: the fraction answered."""
    import copy
    from sparse_kv_cache import cache_nbytes, tier_bytes
    questions = s.meta["questions"]
    ctx_ids, _ = encode_prompt(tokenizer, s.context, questions[0][0], questions[0][1])
    cache, press = make_cache(method, model, budget, len(ctx_ids), params, tokenizer)
    t0 = time.perf_counter()
    if press is not None:
        with press(model):
            forward_chunked(model, cache, torch.tensor([ctx_ids], device=model.device), len(ctx_ids))
    else:
        forward_chunked(model, cache, torch.tensor([ctx_ids], device=model.device), chunk)
    prefill_s = time.perf_counter() - t0
    tiers = tier_bytes(cache)
    kv = cache_nbytes(cache)
    scores, preds, decode = [], [], []
    for q, prefix, answers in questions:
        _, q_ids = encode_prompt(tokenizer, s.context, q, prefix)
        c = copy.deepcopy(cache)
        sub = Sample(s.id, "needle", "", q, prefix, answers)
        r = run_generation(model, tokenizer, c, ctx_ids, q_ids, MAX_NEW_TOKENS["needle"], "question_agnostic",
                           chunk, None, stop_when=answer_complete(sub), prefilled=True)
        scores.append(score_synthetic(sub, r["prediction"]))
        preds.append(r["prediction"])
        decode.append(r["decode_ms_per_token"])
    return {**tiers, "prediction": " | ".join(preds), "n_generated": sum(len(p) > 0 for p in preds),
            "prefill_s": prefill_s, "decode_ms_per_token": sum(decode) / len(decode), "kv_bytes": kv,
            "kv_bytes_peak": kv, "context_tokens": len(ctx_ids), "question_tokens": 0, "id": s.id,
            "depth": s.depth, "answers": [a for _, _, a in questions], "score": sum(scores) / len(scores)}


def summarize_samples(per_sample: list[dict]) -> dict:
    n = max(1, len(per_sample))
    mean = lambda k: sum(r[k] for r in per_sample) / n  # noqa: E731
    out = {
        "score": 100.0 * mean("score"),
        "n_samples": len(per_sample),
        "n_empty": sum(1 for r in per_sample if r["n_generated"] == 0),
        "kv_bytes": mean("kv_bytes"),
        "kv_bytes_peak": max(r["kv_bytes_peak"] for r in per_sample) if per_sample else 0,
        "active_kv_bytes": mean("active_kv_bytes"),
        "summary_bytes": mean("summary_bytes"),
        "passive_bytes": mean("passive_bytes"),
        "context_tokens": mean("context_tokens"),
        "prefill_s": mean("prefill_s"),
        "decode_ms_per_token": mean("decode_ms_per_token"),
        "samples": [{k: r[k] for k in ("id", "depth", "score", "prediction", "kv_bytes", "context_tokens")
                     if k in r} for r in per_sample],
    }
    if out["n_empty"]:
        out["warning"] = f"{out['n_empty']} of {len(per_sample)} generations produced nothing"
    return out


@torch.no_grad()
def measure_prefill_overhead(model, tokenizer, n_tokens: int = 2048, budget=0.25, chunk: int = 512,
                             repeats: int = 3) -> dict:
    """ATSKV's prefill cost against the model's own: median wall time of a chunked prefill with the full cache and
    with `atskv`, and the time spent inside ATSKV's scoring (features + predictor: `observe`) alone."""
    import statistics
    from sparse_kv_cache import ATSKV, KVCacheFactory
    s = make_synthetic_sample(tokenizer, "needle", n_tokens, 0.5, 0)
    ids = torch.tensor([encode_prompt(tokenizer, s.context, s.question)[0]], device=model.device)
    sync = lambda: _sync(model.device)  # noqa: E731
    spent = []
    orig = ATSKV.observe

    def timed(self, *a, **k):
        t = time.perf_counter()
        orig(self, *a, **k)
        sync()
        spent.append(time.perf_counter() - t)
    out = {}
    for method in ("full", "atskv"):
        times, scoring = [], []
        for _ in range(repeats + 1):  # the first run warms up
            cache = KVCacheFactory.create(method, model, budget=None if method == "full" else budget,
                                          context_length=ids.shape[1], tokenizer=tokenizer)
            spent.clear()
            ATSKV.observe = timed
            try:
                sync()
                t = time.perf_counter()
                forward_chunked(model, cache, ids, chunk)
                sync()
            finally:
                ATSKV.observe = orig
            times.append(time.perf_counter() - t)
            scoring.append(sum(spent))
        out[method] = {"prefill_s": statistics.median(times[1:]), "scoring_s": statistics.median(scoring[1:])}
    full = out["full"]["prefill_s"]
    out["tokens"] = int(ids.shape[1])
    out["scoring_share_of_model_prefill"] = out["atskv"]["scoring_s"] / full
    out["total_overhead_share"] = out["atskv"]["prefill_s"] / full - 1.0
    return out


# ---------------------------------------------------------------------------------------------------------------
# Speed: the plain decode loop against the fast (static-shape, CUDA-graph) path, beside the memory floor

def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_bandwidth_gbs(device) -> float:
    """Measured copy bandwidth of the device (bytes read + written per second, GB/s): the floor's denominator."""
    device = torch.device(device)
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB of float32 on a GPU, 64 MiB on a CPU
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * src.nbytes * reps / (time.perf_counter() - t) / 1e9


def _peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev) -> int:
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0


def _dtype_name(model) -> str:
    return str(model.dtype).replace("torch.", "")


def _prefill_random(model, tokenizer, method: str, budget, context: int, batch: int, params: dict | None,
                    chunk: int, seed: int):
    """A batch of random-token contexts (speed only: the values do not matter) prefilled with the method (chunked,
    the plain path), device peak memory counted from the prefill on. Returns the cache, the last logits and the
    prefill's seconds."""
    dev = model.device
    ids = torch.randint(0, model.config.vocab_size, (batch, context),
                        generator=torch.Generator().manual_seed(seed)).to(dev)
    cache, _ = make_cache(method, model, budget, context, params, tokenizer)
    _peak_reset(dev)
    _sync(dev)
    t = time.perf_counter()
    logits = forward_chunked(model, cache, ids, chunk)
    _sync(dev)
    return cache, logits, time.perf_counter() - t


def timing_probe(dev) -> dict:
    """How fast the machine runs a fixed piece of work right now (ms of 8 fp32 256x256 matmuls, median of 5), and
    the load average: the report marks cells whose times were taken on a busier or freer machine."""
    import os
    import statistics
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)).to(dev)  # the global RNG is left alone
    times = []
    for _ in range(5):
        _sync(dev)
        t = time.perf_counter()
        for _ in range(8):
            a = torch.tanh(a @ a)
        _sync(dev)
        times.append(1000 * (time.perf_counter() - t))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"probe_ms": statistics.median(times), "load1": load}


def _time_run(dev, fn, n: int) -> float:
    """Mean milliseconds of `fn` over n consecutive calls (one pair of CUDA events around all of them)."""
    _sync(dev)
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / n
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return 1000 * (time.perf_counter() - t) / n


def plain_decode_ms(model, cache, tok, pos: int, steps: int, warm_up: int = 2):
    """HF's plain decode loop through `cache` (one forward per token, greedy): the mean milliseconds of a step over
    `steps` consecutive steps, rounded up to whole cycles of a method that evicts every few steps (evict_every), so
    that its evicting steps count as often as they come. Returns (ms, the next token, the next position)."""
    dev, batch = model.device, tok.shape[0]

    def step():
        nonlocal tok, pos
        p = torch.tensor([pos], device=dev)
        out = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True, cache_position=p,
                    position_ids=p[None].expand(batch, -1))
        tok = out.logits[:, -1].argmax(-1)
        pos += 1
    for _ in range(warm_up):
        step()
    every = getattr(getattr(cache, "method", None), "evict_every", 1)
    return _time_run(dev, step, -(-steps // every) * every), tok, pos


@torch.no_grad()
def measure_plain_decode(model, tokenizer, method: str, budget, context: int, batch: int, steps: int = 32,
                         params: dict | None = None, chunk: int = 512, seed: int = 0) -> list[dict]:
    """The plain path alone (what `model.generate(past_key_values=cache)` runs): a batch of random-token contexts
    prefilled with the method, then the mean decode step over whole eviction cycles (`plain_decode_ms`)."""
    from sparse_kv_cache import cache_nbytes
    cache, logits, prefill_s = _prefill_random(model, tokenizer, method, budget, context, batch, params, chunk, seed)
    ms, _, _ = plain_decode_ms(model, cache, logits.argmax(-1), context, steps)
    return [{"benchmark": "speed_plain", "method": method, "budget": budget, "context": context, "batch": batch,
             "dtype": _dtype_name(model), "path": "hf_plain", "steps": steps, "decode_ms": ms,
             "tok_s": 1000.0 * batch / ms, "prefill_s": prefill_s, "kv_bytes": cache_nbytes(cache)}]


@torch.no_grad()
def measure_decode_speed(model, tokenizer, method: str, budget, context: int, batch: int, steps: int = 32,
                         plain_steps: int = 10, compile: bool = False, bandwidth_gbs: float = 0.0,
                         params: dict | None = None, chunk: int = 512, seed: int = 0) -> list[dict]:
    """One speed cell: a batch of random-token contexts (speed only: the values do not matter) is prefilled with the
    method (chunked, the plain path), then decoded by HF's plain loop (`hf_plain`: one forward per step through the
    method's cache) and by the fast path (`fast`: static slots, one CUDA graph per step), and for compressed methods
    by the fast path without the method's scoring and eviction (`fast_bare`: the same slots, the oldest entries freed
    on the method's schedule; the method's share of the step is 1 - bare / fast), and for atskv with evict_every > 1
    each step variant alone (`variant_ms`: the steps that evict and those that do not, with and without scoring).
    Per path: decode ms per step (plain: the mean of `plain_steps` consecutive steps; fast: the mean of `steps`
    consecutive replays; both rounded up to whole cycles of atskv's evict_every), tokens/s, peak device memory while
    decoding, the KV bytes read per step and the memory floor (weights + KV read once at the measured bandwidth)."""
    from fast_decode import StaticDecoder, memory_floor_ms
    from sparse_kv_cache import cache_nbytes
    dev = model.device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cache, logits, prefill_s = _prefill_random(model, tokenizer, method, budget, context, batch, params, chunk, seed)
    prefill_peak = _peak(dev)
    _peak_reset(dev)
    plain_ms, tok, pos = plain_decode_ms(model, cache, logits.argmax(-1), context, plain_steps)
    base = {"benchmark": "speed", "method": method, "budget": budget, "context": context, "batch": batch,
            "compile": compile, "dtype": _dtype_name(model), "weights_bytes": weights,
            "bandwidth_gbs": bandwidth_gbs, "prefill_s": prefill_s, "prefill_peak_bytes": prefill_peak}

    def rec(path, ms, kv_read, peak):
        floor = memory_floor_ms(weights, kv_read, bandwidth_gbs) if bandwidth_gbs else None
        return {**base, "path": path, "decode_ms": ms, "tok_s": 1000.0 * batch / ms, "kv_bytes_read": kv_read,
                "decode_peak_bytes": peak, "floor_ms": floor, "x_floor": ms / floor if floor else None}
    out = [rec("hf_plain", plain_ms, cache_nbytes(cache), _peak(dev))]
    every = getattr(getattr(cache, "method", None), "evict_every", 1)
    n = -(-steps // every) * every   # whole eviction cycles: a mean over them counts the evicting steps fairly
    dec = StaticDecoder.from_cache(model, method, cache, pos, 2 * n + 4 * every + 16, compile=compile)
    cache = None
    base["attn_kernel"] = dec.attn_kernel   # the Triton decode attention (else SDPA)
    dec.tok.copy_(tok)
    dec.t.zero_()
    _peak_reset(dev)
    dec.warm_up()  # warm-up steps (and compilation), then each variant of the step captured
    _sync(dev)
    out.append(rec("fast", _time_run(dev, dec.step, n), dec.kv_bytes(), _peak(dev)))
    def variant_ms():   # atskv with evict_every: each variant's step alone (the evicting one last, so that the
        # state is the one after an eviction again)
        vs = sorted(dec.variants(), key=lambda v: v.endswith("evict"))
        return {v: _time_run(dev, lambda: dec.run_variant(v), n) for v in vs} if len(vs) > 1 else None
    out[-1]["variant_ms"] = variant_ms()
    if dec.method != "full":
        dec.set_scoring(False)
        dec.warm_up()
        out.append(rec("fast_bare", _time_run(dev, dec.step, n), dec.kv_bytes(), _peak(dev)))
        out[-1]["variant_ms"] = variant_ms()
    return out


@torch.no_grad()
def profile_decode_step(model, tokenizer, method: str, budget, context: int, batch: int, params: dict | None = None,
                        compile: bool = False, steps: int = 2, top: int = 12, chunk: int = 512,
                        seed: int = 0) -> list[dict]:
    """Where a fast decode step's time goes: per variant of the step (atskv with evict_every: the step that evicts
    and the one that does not; compressed methods: also the step without scoring), run eagerly (a replayed CUDA
    graph hides its kernels from the profiler) after two warm-up steps, `steps` steps under torch.profiler. On a GPU
    it counts CUDA kernels and their device time, elsewhere CPU operators and their self time."""
    from torch.profiler import ProfilerActivity, profile
    from fast_decode import StaticDecoder
    dev = model.device
    cuda = dev.type == "cuda"
    cache, logits, _ = _prefill_random(model, tokenizer, method, budget, context, batch, params, chunk, seed)
    dec = StaticDecoder.from_cache(model, method, cache, context, 8 * (steps + 2), compile=compile, use_graph=False)
    dec.tok.copy_(logits.argmax(-1))
    spent = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
    out = []
    plan = dec.variants()
    if method != "full":
        dec.set_scoring(False)
        plan += dec.variants()
    for variant in plan:
        dec.set_scoring(not variant.startswith("bare"))
        for _ in range(2):
            dec._step(variant)
        _sync(dev)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                dec._step(variant)
            _sync(dev)
        events = [e for e in prof.key_averages() if spent(e) > 0]
        events.sort(key=lambda e: -spent(e))
        out.append({"benchmark": "speed_profile", "method": method, "budget": budget, "context": context,
                    "batch": batch, "variant": variant, "unit": "CUDA kernels" if cuda else "CPU operators",
                    "dtype": _dtype_name(model), "compile": compile,
                    "per_step": sum(e.count for e in events) / steps,
                    "ms_per_step": sum(spent(e) for e in events) / steps / 1000,
                    "top": [{"name": e.key[:120], "ms_per_step": spent(e) / steps / 1000, "per_step": e.count / steps}
                            for e in events[:top]]})
    return out


@torch.no_grad()
def largest_decode_batch(model, tokenizer, method: str, budget, context: int, params: dict | None = None,
                         start: int = 64, limit: int = 1 << 16, chunk: int = 512) -> dict:
    """The largest batch whose decode state fits in the device's memory beside the weights: one random-token
    context is prefilled (the plain path), its slot cache is repeated to batch B and two decode steps run; B doubles
    from `start` until memory runs out, then a bisection narrows it to within 3%. Prefill is not part of it (a
    serving system prefills in micro-batches)."""
    import gc
    from fast_decode import StaticDecoder
    dev = model.device
    cache, logits, _ = _prefill_random(model, tokenizer, method, budget, context, 1, params, chunk, seed=0)
    one = StaticDecoder.from_cache(model, method, cache, context, 8, use_graph=False)
    one.tok.copy_(logits.argmax(-1))
    per_seq = one.kv_bytes()
    del cache

    def fits(b: int) -> bool:
        dec = None
        try:
            dec = one.repeated(b)
            dec.step()
            dec.step()
            _sync(dev)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del dec
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    lo, hi = 0, None
    b = start
    while b <= limit:
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    while hi is not None and hi - lo > max(1, lo // 33):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    return {"benchmark": "speed_max_batch", "method": method, "budget": budget, "context": context,
            "max_batch": lo, "limit_reached": hi is None, "kv_bytes_per_sequence": per_seq,
            "device_memory_bytes": total, "dtype": _dtype_name(model)}


@torch.no_grad()
def check_fast_answers(model, tokenizer, method: str, budget, samples: list[Sample], chunk: int = 512,
                       compile: bool = False, params: dict | None = None) -> dict:
    """The synthetic benchmark through the plain loop and through the fast path: the same prompts, prefill and
    stop rules. Returns how many predictions are identical and both scores."""
    same, sp, sf = 0, 0.0, 0.0
    diffs = []
    for s in samples:
        ctx_ids, q_ids = encode_prompt(tokenizer, s.context, s.question, s.answer_prefix)
        preds = []
        for fast in (False, True):
            cache, _ = make_cache(method, model, budget, len(ctx_ids), params, tokenizer)
            r = run_generation(model, tokenizer, cache, ctx_ids, q_ids, MAX_NEW_TOKENS.get(s.task, 16),
                               chunk=chunk, stop_when=answer_complete(s), fast=fast, compile=compile)
            preds.append(r["prediction"])
        same += preds[0] == preds[1]
        sp += score_synthetic(s, preds[0])
        sf += score_synthetic(s, preds[1])
        if preds[0] != preds[1]:
            diffs.append({"id": s.id, "plain": preds[0], "fast": preds[1]})
    n = len(samples)
    return {"benchmark": "speed_answers", "method": method, "budget": budget, "task": samples[0].task if n else "",
            "context": samples[0].context_size if n else 0, "n": n, "same": same,
            "score_plain": 100 * sp / max(1, n), "score_fast": 100 * sf / max(1, n), "differences": diffs[:5],
            "dtype": _dtype_name(model)}


# ---------------------------------------------------------------------------------------------------------------
# Real benchmarks: LongBench and ZeroSCROLLS
#
# LongBench's prompt templates and generation lengths are its official config (THUDM/LongBench, config/
# dataset2prompt.json and dataset2maxlen.json, MIT licence), transcribed for the 16 English tasks.
LONGBENCH_PROMPTS = {
    'narrativeqa': 'You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    'qasper': 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    'multifieldqa_en': 'Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:',
    'hotpotqa': 'Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:',
    '2wikimqa': 'Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:',
    'musique': 'Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:',
    'gov_report': 'You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:',
    'qmsum': 'You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:',
    'multi_news': 'You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:',
    'trec': 'Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}',
    'triviaqa': 'Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}',
    'samsum': 'Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}',
    'passage_count': 'There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ',
    'passage_retrieval_en': 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    'lcc': 'Please complete the code given below. \n{context}Next line of code:\n',
    'repobench-p': 'Please complete the code given below. \n{context}{input}Next line of code:\n',
}
LONGBENCH_MAX_NEW_TOKENS = {'narrativeqa': 128, 'qasper': 128, 'multifieldqa_en': 64, 'hotpotqa': 32, '2wikimqa': 32, 'musique': 32, 'gov_report': 512, 'qmsum': 512, 'multi_news': 512, 'trec': 64, 'triviaqa': 32, 'samsum': 128, 'passage_count': 32, 'passage_retrieval_en': 32, 'lcc': 64, 'repobench-p': 64}
LONGBENCH_TASKS = tuple(LONGBENCH_PROMPTS)
LONGBENCH_NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")  # few-shot / completion tasks
LONGBENCH_HUB_ZIP = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"

# ZeroSCROLLS: generation lengths of its baseline scripts; validation split (the test labels are private).
ZEROSCROLLS_MAX_NEW_TOKENS = {"gov_report": 1024, "summ_screen_fd": 512, "qmsum": 512, "qasper": 128,
                              "narrative_qa": 64, "quality": 10, "musique": 32, "squality": 512,
                              "space_digest": 36, "book_sum_sort": 256}
ZEROSCROLLS_TASKS = tuple(ZEROSCROLLS_MAX_NEW_TOKENS)
ZEROSCROLLS_HUB_ZIP = "https://huggingface.co/datasets/tau/zero_scrolls/resolve/main/{task}.zip"
REAL_TASKS = {"longbench": LONGBENCH_TASKS, "zeroscrolls": ZEROSCROLLS_TASKS}


REAL_SUBDIRS = {"longbench": ("", "longbench", "LongBench"), "zeroscrolls": ("", "zero_scrolls", "zeroscrolls")}


def _local_file(benchmark: str, task: str, data_dir: str) -> Path | None:
    """LongBench: <task>.jsonl; ZeroSCROLLS: <task>.validation.jsonl or <task>/validation.jsonl; either directly in
    data_dir or in its subfolder named after the benchmark (so one --data_dir can hold both)."""
    names = [f"{task}.jsonl"] if benchmark == "longbench" else [f"{task}.validation.jsonl", f"{task}/validation.jsonl"]
    for sub in REAL_SUBDIRS[benchmark]:
        for n in names:
            if (Path(data_dir) / sub / n).is_file():
                return Path(data_dir) / sub / n
    return None


def available_real_tasks(benchmark: str, data_dir: str | None) -> list[str]:
    """The benchmark's tasks that --data_dir holds (all of them when the hub is the source)."""
    if data_dir is None:
        return list(REAL_TASKS[benchmark])
    return [t for t in REAL_TASKS[benchmark] if _local_file(benchmark, t, data_dir) is not None]


def _load_records(benchmark: str, task: str, data_dir: str | None) -> list[dict]:
    import json
    if data_dir is not None:
        path = _local_file(benchmark, task, data_dir)
        if path is None:
            raise UserError(f"--data_dir {data_dir!r} has no {benchmark} file for task {task!r} (expected "
                            f"{task}.jsonl for LongBench, {task}.validation.jsonl for ZeroSCROLLS)")
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    # The hub's per-task files, read through `datasets` (its json builder; the repos' loading scripts are no longer
    # supported by `datasets`).
    url = f"zip://data/{task}.jsonl::{LONGBENCH_HUB_ZIP}" if benchmark == "longbench" else \
        f"zip://{task}/validation.jsonl::{ZEROSCROLLS_HUB_ZIP.format(task=task)}"
    try:
        import datasets
        return [dict(r) for r in datasets.load_dataset("json", data_files=url, split="train")]
    except Exception as e:
        raise UserError(f"cannot load {benchmark} task {task!r} from the Hugging Face hub ({type(e).__name__}); "
                        f"offline, pass --data_dir with its jsonl files in the hub's schema") from None


def _check_fields(rec: dict, needed: tuple, where: str) -> None:
    missing = [k for k in needed if k not in rec]
    if missing:
        raise UserError(f"{where}: record {rec.get('_id', rec.get('id', '?'))!r} lacks field(s) {missing}")


def longbench_samples(task: str, data_dir: str | None = None, limit: int | None = None) -> list[Sample]:
    """LongBench records as Samples: the template up to and with {context} is the compressed part; the rest,
    with {input}, is the question."""
    if task not in LONGBENCH_PROMPTS:
        raise UserError(f"unknown LongBench task {task!r}; accepted: {', '.join(LONGBENCH_TASKS)}")
    head, tail = LONGBENCH_PROMPTS[task].split("{context}")
    out = []
    for rec in _load_records("longbench", task, data_dir)[:limit]:
        _check_fields(rec, ("input", "context", "answers"), f"LongBench {task}")
        out.append(Sample(str(rec.get("_id", len(out))), task, head + rec["context"],
                          tail.replace("{input}", rec["input"] or ""), "", list(rec["answers"]),
                          meta={"benchmark": "longbench", "all_classes": rec.get("all_classes"),
                                "max_new_tokens": LONGBENCH_MAX_NEW_TOKENS[task],
                                "use_chat": task not in LONGBENCH_NO_CHAT}))
    return out


def zeroscrolls_samples(task: str, data_dir: str | None = None, limit: int | None = None) -> list[Sample]:
    """ZeroSCROLLS records as Samples: input[:document_end_index] (instructions + document) is the compressed part,
    the rest (query and answer cue) the question. Records sharing an id are one sample with several gold answers."""
    if task not in ZEROSCROLLS_MAX_NEW_TOKENS:
        raise UserError(f"unknown ZeroSCROLLS task {task!r}; accepted: {', '.join(ZEROSCROLLS_TASKS)}")
    by_id: dict[str, Sample] = {}
    for rec in _load_records("zeroscrolls", task, data_dir):
        _check_fields(rec, ("id", "input", "output", "document_start_index", "document_end_index",
                            "truncation_seperator"), f"ZeroSCROLLS {task}")
        if rec["id"] in by_id:
            by_id[rec["id"]].answers.append(rec["output"])
            continue
        inp, start, end = rec["input"], rec["document_start_index"], rec["document_end_index"]
        if not 0 <= start <= end <= len(inp):
            raise UserError(f"ZeroSCROLLS {task}: record {rec['id']!r} has document indices {start}..{end} outside "
                            f"its input of {len(inp)} characters")
        by_id[rec["id"]] = Sample(str(rec["id"]), task, inp[:end], inp[end:], "", [rec["output"]],
                                  meta={"benchmark": "zeroscrolls", "document_start": start,
                                        "separator": rec["truncation_seperator"],
                                        "max_new_tokens": ZEROSCROLLS_MAX_NEW_TOKENS[task], "use_chat": True})
    return list(by_id.values())[:limit]


def real_samples(benchmark: str, task: str, data_dir: str | None, limit: int | None) -> list[Sample]:
    return (longbench_samples if benchmark == "longbench" else zeroscrolls_samples)(task, data_dir, limit)


def _chat_wrapper(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids the chat template puts before and after a user message (generation prompt included)."""
    marker = "\x00BODY\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    enc = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    return enc(before), enc(after)


def encode_real(tokenizer, s: Sample, max_prompt_tokens: int) -> tuple[list[int], list[int]]:
    """(context ids, question ids) under the benchmark's truncation, within max_prompt_tokens for the raw prompt.

    LongBench keeps the first and the last half of the prompt's tokens; ZeroSCROLLS cuts the document's end and
    puts the record's truncation separator in its place. Chat-formatted tasks are then wrapped in the template."""
    enc = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    if s.meta["benchmark"] == "longbench":
        c, q = enc(s.context), enc(s.question)
        if len(c) + len(q) > max_prompt_tokens:
            full, n = c + q, len(c) + len(q)
            first = max_prompt_tokens // 2
            kept = list(range(first)) + list(range(n - (max_prompt_tokens - first), n))
            c, q = [full[i] for i in kept if i < len(c)], [full[i] for i in kept if i >= len(c)]
    else:
        start = s.meta["document_start"]
        head, doc, q = enc(s.context[:start]), enc(s.context[start:]), enc(s.question)
        if len(head) + len(doc) + len(q) > max_prompt_tokens:
            sep = enc(s.meta["separator"])
            room = max(0, max_prompt_tokens - len(head) - len(q) - len(sep))
            doc = doc[:room] + sep
        c = head + doc
    if s.meta["use_chat"] and getattr(tokenizer, "chat_template", None):
        before, after = _chat_wrapper(tokenizer)
        c, q = before + c, q + after
    return c, q


def score_real(s: Sample, prediction: str) -> float:
    import metrics
    if s.meta["benchmark"] == "longbench":
        return metrics.longbench_score(s.task, prediction, s.answers, s.meta.get("all_classes"))
    return metrics.zeroscrolls_score(s.task, prediction, s.answers)


def first_line_done(text: str) -> bool:
    """For tasks scored on their first line only: once a line is complete, the rest cannot change the score."""
    return "\n" in text.lstrip("\n")


def evaluate_real_cell(model, tokenizer, method: str, budget, samples: list[Sample], mode: str, chunk: int,
                       max_prompt_tokens: int, params: dict | None = None, fault: str | None = None,
                       fast: bool = False) -> dict:
    """One LongBench / ZeroSCROLLS cell: the official prompt and truncation, greedy decoding to the task's
    generation length, the official metric (score x100, mean over samples)."""
    import metrics
    per_sample = []
    for s in samples:
        ctx_ids, q_ids = encode_real(tokenizer, s, max_prompt_tokens)
        if fault == "oom":
            raise torch.OutOfMemoryError("injected out-of-memory (ATSKV_INJECT_FAULT)")
        cache, press = make_cache(method, model, budget, len(ctx_ids), params, tokenizer)
        stop = first_line_done if (s.meta["benchmark"] == "longbench" and s.task in metrics.FIRST_LINE_ONLY) \
            else None
        r = run_generation(model, tokenizer, cache, ctx_ids, q_ids, s.meta["max_new_tokens"], mode, chunk, press,
                           stop_when=stop, fast=fast)
        r.update(id=s.id, depth=-1.0, answers=s.answers, score=score_real(s, r["prediction"]))
        per_sample.append(r)
    return summarize_samples(per_sample)


REAL_FILE_HINT = {"longbench": "LongBench files are named <task>.jsonl, e.g. hotpotqa.jsonl",
                  "zeroscrolls": "ZeroSCROLLS files are named <task>.validation.jsonl, e.g. qasper.validation.jsonl"}
