"""Hosted models (`--use_api`): Claude through the `anthropic` SDK (Messages API), GPT / o-series through the
`openai` SDK (Chat Completions), on the same benchmarks, prompts, truncation and scoring as local models.

A hosted model's KV cache cannot be touched, but its input can: method `atskv` scores the context's tokens with the
local model's trained relevance predictor and drops the lowest-scoring sentences / lines down to the budget before
the prompt is sent (`compress_context`); `full` sends the whole prompt.

Calls are robust: a timeout per request, retries with exponential backoff on 429 / 5xx / timeouts / malformed
answers (honouring Retry-After), bounded concurrency, and a request that still fails is returned as failed (the sweep
records it and goes on; a rerun retries only the failed requests). Keys come from the environment only and are
never logged or written.
"""
from __future__ import annotations

import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from utils import UserError

API_METHODS = ("full", "atskv")
KEY_VARS = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}
RETRY_STATUS = {408, 409, 429}  # and every 5xx


def provider_for(model: str | None) -> str:
    if not model:
        raise UserError("--use_api needs --api_model, e.g. claude-sonnet-4-5 or gpt-4o-mini")
    if model.startswith("claude"):
        return "anthropic"
    if model.startswith("gpt") or re.match(r"^o\d", model) or model.startswith("chatgpt"):
        return "openai"
    raise UserError(f"unknown API model {model!r}: accepted are claude-* (Anthropic) and gpt-* / o<N>* (OpenAI)")


def api_key(provider: str) -> str:
    """The key from the environment; a missing key is one clear line (naming the variable, never a value)."""
    var = KEY_VARS[provider]
    key = os.environ.get(var, "").strip()
    if not key:
        raise UserError(f"--use_api with a {provider} model needs the environment variable {var}")
    return key


def scrub(text: str, secret: str) -> str:
    """Remove a secret from any text that may be written (error messages quote URLs and bodies, not keys; this
    makes sure)."""
    return text.replace(secret, "***") if secret else text


@dataclass
class APIConfig:
    model: str
    base_url: str | None = None
    timeout: float = 60.0
    max_retries: int = 5
    concurrency: int = 4
    backoff: float = 1.0          # seconds before the first retry; doubled each time, with jitter
    max_backoff: float = 60.0


class APIClient:
    """One SDK client; `complete()` returns {'status': 'ok', 'text', 'input_tokens', 'output_tokens'} or
    {'status': 'failed', 'error', 'attempts'}; it never raises for a failed request."""

    def __init__(self, cfg: APIConfig):
        self.cfg = cfg
        self.provider = provider_for(cfg.model)
        self._key = api_key(self.provider)
        # the SDKs' own retries are off: ours honour Retry-After and are counted per request
        if self.provider == "anthropic":
            import anthropic
            self.sdk = anthropic
            self.client = anthropic.Anthropic(api_key=self._key, base_url=cfg.base_url, timeout=cfg.timeout,
                                              max_retries=0)
        else:
            import openai
            self.sdk = openai
            self.client = openai.OpenAI(api_key=self._key, base_url=cfg.base_url, timeout=cfg.timeout, max_retries=0)

    def _request(self, prompt: str, max_tokens: int) -> tuple[str, int, int]:
        if self.provider == "anthropic":
            # (this SDK's Messages API takes no temperature: the model's default decoding is used)
            msg = self.client.messages.create(model=self.cfg.model, max_tokens=max_tokens,
                                              messages=[{"role": "user", "content": prompt}])
            text = "".join(b.text for b in msg.content if getattr(b, "type", "") == "text")
            return text, int(msg.usage.input_tokens), int(msg.usage.output_tokens)
        greedy = {} if re.match(r"^o\d", self.cfg.model) else {"temperature": 0.0}  # o-series reject it
        resp = self.client.chat.completions.create(model=self.cfg.model, max_completion_tokens=max_tokens,
                                                   messages=[{"role": "user", "content": prompt}], **greedy)
        return resp.choices[0].message.content or "", int(resp.usage.prompt_tokens), \
            int(resp.usage.completion_tokens)

    def _retry_delay(self, attempt: int, error: Exception) -> float | None:
        """Seconds to wait before the next attempt, or None when the error is not worth retrying."""
        status = getattr(error, "status_code", None)
        retryable = isinstance(error, (self.sdk.APITimeoutError, self.sdk.APIConnectionError, MalformedResponse)) \
            or (status is not None and (status in RETRY_STATUS or status >= 500))
        if not retryable:
            return None
        headers = getattr(getattr(error, "response", None), "headers", None) or {}
        after = headers.get("retry-after")
        if after is not None:
            try:
                return min(self.cfg.max_backoff, max(0.0, float(after)))
            except ValueError:
                pass  # an HTTP date: fall back to the exponential backoff
        return min(self.cfg.max_backoff, self.cfg.backoff * 2 ** attempt) * (0.5 + random.random() / 2)

    def complete(self, prompt: str, max_tokens: int) -> dict:
        attempts, last = 0, None
        while attempts <= self.cfg.max_retries:
            attempts += 1
            try:
                try:
                    text, n_in, n_out = self._request(prompt, max_tokens)
                except (AttributeError, TypeError, KeyError, IndexError, ValueError) as e:
                    raise MalformedResponse(f"malformed response ({type(e).__name__})") from None
                return {"status": "ok", "text": text, "input_tokens": n_in, "output_tokens": n_out,
                        "attempts": attempts}
            except Exception as e:  # noqa: BLE001 - every failure is recorded, none stops the sweep
                last = e
                delay = self._retry_delay(attempts - 1, e)
                if delay is None or attempts > self.cfg.max_retries:
                    break
                time.sleep(delay)
        status = getattr(last, "status_code", None)
        msg = f"{type(last).__name__}" + (f" (HTTP {status})" if status else "") + \
            f": {str(last).splitlines()[0][:200] if str(last) else ''}"
        return {"status": "failed", "error": scrub(msg, self._key), "attempts": attempts}

    def complete_many(self, jobs: list[tuple[str, int]]) -> list[dict]:
        """Bounded concurrency: at most cfg.concurrency requests in flight; results in the order of `jobs`."""
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            return list(pool.map(lambda j: self.complete(*j), jobs))


class MalformedResponse(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Prompt compression with the local relevance predictor

_UNIT = re.compile(r"[^\n]*?(?:[.!?](?=\s)|\n|$)\s*")


def text_units(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of sentences within lines: the pieces that are kept or dropped whole."""
    spans, i = [], 0
    for m in _UNIT.finditer(text):
        if m.end() > m.start():
            spans.append((m.start(), m.end()))
        i = m.end()
    if i < len(text):
        spans.append((i, len(text)))
    return spans


_RELEVANCE: dict = {}  # text -> (offsets, r): one context is scored once for all the budgets of a sweep


def token_relevance(model, tokenizer, text: str, chunk: int = 512):
    """(offsets, r): each token's character span and its relevance, the ATSKV predictor's r averaged over layers
    and KV heads, from one chunked prefill of `text` through an uncompressed ATSKV cache."""
    import hashlib
    key = (id(model), hashlib.sha256(text.encode()).hexdigest())
    if key not in _RELEVANCE:
        if len(_RELEVANCE) > 256:
            _RELEVANCE.clear()
        _RELEVANCE[key] = _token_relevance(model, tokenizer, text, chunk)
    return _RELEVANCE[key]


def _token_relevance(model, tokenizer, text: str, chunk: int):
    import torch
    import evaluation as ev
    from sparse_kv_cache import KVCacheFactory
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    cache = KVCacheFactory.create("atskv", model, budget=len(ids) + 1, context_length=len(ids),
                                  tokenizer=tokenizer)  # a budget above the length: nothing is evicted
    ev.forward_chunked(model, cache, torch.tensor([ids], device=model.device), chunk)
    r = torch.stack([layer.extras["r"][0].float().mean(0) for layer in cache.layers]).mean(0)
    return enc["offset_mapping"], r.cpu()


def compress_context(model, tokenizer, text: str, keep: float) -> tuple[str, dict]:
    """Keep the most relevant sentences / lines of `text` until `keep` of its tokens are kept (first and last unit
    always kept), in their original order. Returns the text and what was kept."""
    offsets, r = token_relevance(model, tokenizer, text)
    units = text_units(text)
    tok_unit, u = [], 0
    for s, _ in offsets:
        while u + 1 < len(units) and s >= units[u][1]:
            u += 1
        tok_unit.append(u)
    n_tok = [0] * len(units)
    score = [0.0] * len(units)
    for t, u in enumerate(tok_unit):
        n_tok[u] += 1
        score[u] = max(score[u], float(r[t]))
    budget = int(keep * len(offsets))
    chosen = {0, len(units) - 1}
    used = sum(n_tok[u] for u in chosen)
    for u in sorted(range(len(units)), key=lambda i: -score[i]):
        if u in chosen or used + n_tok[u] > budget:
            continue
        chosen.add(u)
        used += n_tok[u]
    kept = "".join(text[s:e] for i, (s, e) in enumerate(units) if i in chosen)
    return kept, {"units": len(units), "units_kept": len(chosen), "tokens": len(offsets), "tokens_kept": used}


# ---------------------------------------------------------------------------------------------------------------
# One sweep cell through an API

def prompt_parts(tokenizer, s, max_prompt_tokens: int | None) -> tuple[str, str]:
    """(context text, question text) with the same truncation as a local run (the local tokenizer counts)."""
    import evaluation as ev
    if s.meta.get("benchmark") in ("longbench", "zeroscrolls"):
        from dataclasses import replace
        plain = replace(s, meta=dict(s.meta, use_chat=False))  # the API applies its own chat format
        ctx_ids, q_ids = ev.encode_real(tokenizer, plain, max_prompt_tokens)
        return tokenizer.decode(ctx_ids), tokenizer.decode(q_ids)
    question = "\n\n" + s.question + ("\n" + s.answer_prefix if s.answer_prefix else "")
    return s.context, question


def evaluate_api_cell(client: APIClient, method: str, budget, samples: list, max_prompt_tokens: int | None,
                      scorer=None, tokenizer=None, previous: dict | None = None) -> dict:
    """Send every sample's prompt (compressed for `atskv`), score the answers with the benchmark's metric.
    Samples answered in `previous` (id -> sample record of an earlier run of this cell) are not asked again."""
    import evaluation as ev
    from utils import resolve_budget
    previous = previous or {}
    todo, out = [], {}
    for s in samples:
        if previous.get(s.id, {}).get("status") == "ok":
            out[s.id] = previous[s.id]
            continue
        ctx, question = prompt_parts(tokenizer, s, max_prompt_tokens)
        info = {}
        if method == "atskv":
            n_ctx = len(tokenizer(ctx, add_special_tokens=False).input_ids)
            keep = resolve_budget(budget, n_ctx) / max(1, n_ctx)
            ctx, info = compress_context(scorer[0], scorer[1], ctx, keep)
        todo.append((s, ctx + question, info))
    max_new = lambda s: s.meta.get("max_new_tokens") or ev.MAX_NEW_TOKENS.get(s.task, 16)  # noqa: E731
    answers = client.complete_many([(prompt, max_new(s)) for s, prompt, _ in todo])
    for (s, prompt, info), a in zip(todo, answers):
        rec = {"id": s.id, "depth": s.depth, "status": a["status"], "attempts": a["attempts"],
               "prompt_chars": len(prompt), **info}
        if a["status"] == "ok":
            score = ev.score_real(s, a["text"]) if s.meta.get("benchmark") in ("longbench", "zeroscrolls") \
                else ev.score_synthetic(s, a["text"])
            rec.update(prediction=a["text"], score=score, input_tokens=a["input_tokens"],
                       output_tokens=a["output_tokens"])
        else:
            rec["error"] = a["error"]
        out[s.id] = rec
    per = [out[s.id] for s in samples]
    ok = [r for r in per if r["status"] == "ok"]
    failed = [r for r in per if r["status"] != "ok"]
    res = {"samples": per, "n_samples": len(per), "n_failed": len(failed),
           "score": 100.0 * sum(r["score"] for r in ok) / len(ok) if ok else 0.0,
           "input_tokens": sum(r["input_tokens"] for r in ok), "output_tokens": sum(r["output_tokens"] for r in ok),
           "status": "ok" if not failed else "error"}
    if failed:
        res["error"] = f"{len(failed)} of {len(per)} requests failed (a rerun retries only these): {failed[0]['error']}"
    return res
