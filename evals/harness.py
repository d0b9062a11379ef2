"""The evaluation harness: prompts, chunked prefill through any cache, then the question, then greedy decoding, timed
and with the bytes each tier of the cache really holds; one cell (method x budget x task x size) at a time.
`question_agnostic` compresses the context before the question is read; `question_aware` compresses both together."""
from __future__ import annotations

import time

import torch

from utils import UserError, stop_token_ids
from evals.synthetic import Sample, answer_complete, make_synthetic_sample, score_synthetic


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


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
        press_masks = press is not None and masked(press, cache, len(ctx_ids))
        recalled_before_question = recall_counters(cache)
        logits = forward_chunked(model, cache, torch.tensor([q_ids], device=dev), chunk, start=len(ctx_ids))
    else:
        recalled_before_question = None
        with ctx:
            logits = forward_chunked(model, cache, torch.tensor([ctx_ids + q_ids], device=dev), chunk_first)
        bytes_after_context = cache_nbytes(cache)
        press_masks = press is not None and masked(press, cache, len(ctx_ids) + len(q_ids))
    _sync(dev)
    t1 = time.perf_counter()
    peak_bytes = cache_nbytes(cache)
    recalled_before_decoding = recall_counters(cache)
    generated, pos = [], len(ctx_ids) + len(q_ids)
    if fast:
        from fast_decode import StaticDecoder, method_of
        dec = StaticDecoder.from_cache(model, method_of(cache), cache, pos, max_new_tokens, compile=compile)
        cache = None  # the decoder took the entries over
        peak_bytes = bytes_after_context = dec.kv_bytes()
        # the method's state beside the slots: summaries on the device (int8 keys, held entries), the passive tier on
        # the host, or on the device (passive_device, and off CUDA)
        extra = dec.extra_nbytes()
        fast_tiers = {"active_kv_bytes": peak_bytes, "summary_bytes": extra["device"] - extra["device_tier"],
                      "passive_bytes": extra["host"], "device_tier_bytes": extra["device_tier"]}
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
        **({"press_masks": press_masks} if press is not None else {}),
        **recall_record(recalled_before_question, recalled_before_decoding, recall_counters(cache)),
        **(tier_bytes(cache) if cache is not None else fast_tiers),
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


def masked(press, cache, prefilled: int) -> bool:
    """Whether a kvpress press kept every entry of its prefill (it masks what it drops) while asked to drop some."""
    return getattr(press, "compression_ratio", 0) > 0 and cache.get_seq_length() >= prefilled


def recall_counters(cache) -> dict | None:
    """A copy of the cache method's recall counters (bytes copied from its passive store to the device), if any."""
    counters = getattr(getattr(cache, "method", None), "recall_bytes", None)
    return dict(counters) if counters is not None else None


def recall_record(before_question, before_decoding, end) -> dict:
    """The bytes recalled while the context was read (every prompt chunk, summed), while the question was read, and
    per decode step (methods with an external memory)."""
    if before_decoding is None or end is None:
        return {}
    steps = end["decode_steps"] - before_decoding["decode_steps"]
    out = {"recall_bytes_per_step": (end["decode"] - before_decoding["decode"]) / max(1, steps)}
    if before_question is not None:
        out["recall_bytes_prefill"] = before_question["read"]
        out["recall_bytes_question"] = before_decoding["read"] - before_question["read"]
    return out


MAX_NEW_TOKENS = {"passkey": 10, "needle": 10, "multi_key": 10, "multi_value": 24, "multi_question": 10}


def make_cache(method: str, model, budget, context_length: int, params: dict | None = None, tokenizer=None,
               max_new_tokens: int | None = None):
    """(cache, press): a compressed cache of ours, or for `kvpress:<name>` a DynamicCache and the kvpress press.
    A method with a `max_new_tokens` parameter (RocketKV sizes its cache with it) gets the task's generation length
    unless its spec sets one."""
    from sparse_kv_cache import KVCacheFactory, method_params
    if method.startswith("kvpress:"):
        from transformers import DynamicCache
        return DynamicCache(), make_kvpress(method.split(":", 1)[1], budget, context_length, params)
    params = dict(params or {})
    if max_new_tokens is not None and "max_new_tokens" in method_params(method):
        params.setdefault("max_new_tokens", max_new_tokens)
    return KVCacheFactory.create(method, model, budget=budget, context_length=context_length, tokenizer=tokenizer,
                                 **params), None


def make_kvpress(name: str, budget, context_length: int, params: dict | None = None):
    """NVIDIA kvpress's press `name` (snake_case: snapkv, expected_attention, streaming_llm, knorm, tova, ...) with
    compression_ratio = 1 - kept / context, the same budget our methods get."""
    try:
        import kvpress
    except ImportError:
        raise UserError(f"method 'kvpress:{name}' needs NVIDIA kvpress 0.5.5: pip install -r requirements.txt") \
            from None
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
    return summarize_samples(run_synthetic_samples(model, tokenizer, method, budget, samples, mode, chunk, params,
                                                   fault, fast))


def run_synthetic_samples(model, tokenizer, method: str, budget, samples: list[Sample], mode: str, chunk: int,
                          params: dict | None = None, fault: str | None = None, fast: bool = False) -> list[dict]:
    """Each sample's result (what `summarize_samples` makes a cell's record of): a cell's samples may run in parts
    (Ray workers) and be summarized together."""
    per_sample = []
    for s in samples:
        if s.task == "multi_question":
            r = run_multi_question(model, tokenizer, s, method, budget, params, mode, chunk, fast)
            per_sample.append(r)
            continue
        ctx_ids, q_ids = encode_prompt(tokenizer, s.context, s.question, s.answer_prefix)
        if fault == "oom":
            raise torch.OutOfMemoryError("injected out-of-memory (ATSKV_INJECT_FAULT)")
        cache, press = make_cache(method, model, budget, len(ctx_ids), params, tokenizer,
                                  MAX_NEW_TOKENS.get(s.task, 16))
        r = run_generation(model, tokenizer, cache, ctx_ids, q_ids, MAX_NEW_TOKENS.get(s.task, 16), mode, chunk,
                           press, stop_when=answer_complete(s), fast=fast)
        if fault == "nan":
            raise FloatingPointError("injected NaN in the logits (ATSKV_INJECT_FAULT)")
        r.update(id=s.id, depth=s.depth, answers=s.answers, score=score_synthetic(s, r["prediction"]))
        per_sample.append(r)
    return per_sample


@torch.no_grad()
def run_multi_question(model, tokenizer, s: Sample, method: str, budget, params, mode: str, chunk: int,
                       fast: bool = False) -> dict:
    """Compress one context once, then ask its questions in turn, each from a copy of the compressed cache (as
    kvpress's pipeline answers several questions from one compressed context). Score: the fraction answered.
    `fast`: each answer decoded on the static-shape path (`run_generation`)."""
    import copy
    from sparse_kv_cache import cache_nbytes, tier_bytes
    questions = s.meta["questions"]
    ctx_ids, _ = encode_prompt(tokenizer, s.context, questions[0][0], questions[0][1])
    cache, press = make_cache(method, model, budget, len(ctx_ids), params, tokenizer, MAX_NEW_TOKENS["needle"])
    t0 = time.perf_counter()
    if press is not None:
        with press(model):
            forward_chunked(model, cache, torch.tensor([ctx_ids], device=model.device), len(ctx_ids))
    else:
        forward_chunked(model, cache, torch.tensor([ctx_ids], device=model.device), chunk)
    prefill_s = time.perf_counter() - t0
    masks = {"press_masks": masked(press, cache, len(ctx_ids))} if press is not None else {}
    tiers = tier_bytes(cache)
    kv = cache_nbytes(cache)
    scores, preds, decode, recalls, fast_tiers = [], [], [], [], []
    for q, prefix, answers in questions:
        _, q_ids = encode_prompt(tokenizer, s.context, q, prefix)
        c = copy.deepcopy(cache)
        sub = Sample(s.id, "needle", "", q, prefix, answers)
        r = run_generation(model, tokenizer, c, ctx_ids, q_ids, MAX_NEW_TOKENS["needle"], "question_agnostic",
                           chunk, None, stop_when=answer_complete(sub), prefilled=True, fast=fast)
        scores.append(score_synthetic(sub, r["prediction"]))
        preds.append(r["prediction"])
        decode.append(r["decode_ms_per_token"])
        recalls.append({k: r[k] for k in ("recall_bytes_prefill", "recall_bytes_question", "recall_bytes_per_step")
                        if k in r})
        fast_tiers.append({k: r[k] for k in ("active_kv_bytes", "summary_bytes", "passive_bytes",
                                              "device_tier_bytes", "kv_bytes") if k in r})
    recalled = {k: sum(x[k] for x in recalls) / len(recalls) for k in recalls[0]}
    if fast:   # the decoder's tiers (its slots, its state beside them), as a single question's fast cell records
        tiers = {k: sum(x[k] for x in fast_tiers) / len(fast_tiers) for k in fast_tiers[0]}
        kv = tiers.pop("kv_bytes")
    return {**tiers, **recalled, **masks, "prediction": " | ".join(preds),
            "n_generated": sum(len(p) > 0 for p in preds),
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
    if any(r.get("press_masks") for r in per_sample):   # the press holds the full cache: its bytes say so
        out["press_masks"] = True
    # methods with an external memory (a passive tier kept on the device: the fast path's passive_device)
    for k in ("recall_bytes_question", "recall_bytes_per_step", "device_tier_bytes"):
        if any(k in r for r in per_sample):
            out[k] = sum(r.get(k, 0) for r in per_sample) / n
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
    if tokenizer is None:   # random weights (--model_config): random tokens, as the speed benchmark's
        ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
        ids = ids.to(model.device)
    else:
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
