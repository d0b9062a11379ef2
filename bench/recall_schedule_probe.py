"""Decode-time recall settings compared on one prefill (issue 24): each sample's context is prefilled once with
`atskv[external_memory=true;evict_every=64]` (the fast path's eviction schedule), then its question is read and
answered from a copy of that cache once per VARIANT, each setting the method's recall fields (recall_every,
recall_span, recall_tokens, recall_step_tokens, recall_dims, recall_layers). These fields act only from the
question on (read-time recall chooses per query, without the span; recall_tokens sets how many entries the
question's queries choose too), so every variant answers from the same compressed context, and a prefill, the slow
part at 8K on a CPU, is paid once per sample instead of once per setting.

    python bench/recall_schedule_probe.py --task multi_key --context 8192 --budget 0.25 --num_samples 4 \
        --out /tmp/probe.jsonl every=1,1,0.5 sched=64,32,0.5 step=1,1,0.5,0.02

VARIANT: name=recall_every,recall_span,recall_tokens[,recall_step_tokens[,recall_dims[,recall_layers]]] (an
empty field: unset, e.g. every_r16=1,1,0.5,,16). One line a sample and variant goes to --out (the run resumes
from it); the end prints each variant's mean score and its answers. needle, multi_key and
multi_value only; --num_samples counts from the first sample, --first skips some of them.
    python bench/recall_schedule_probe.py --table FILE.jsonl [...]     # the answers, a column per variant"""
import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition("=")
    try:
        every, span, tokens, *rest = spec.split(",")
        fields = {"recall_every": int(every), "recall_span": int(span), "recall_tokens": float(tokens)}
        if len(rest) > 3:
            raise ValueError
        for field, kind, text in zip(("recall_step_tokens", "recall_dims", "recall_layers"), (float, int, int), rest):
            if text:
                fields[field] = kind(text)
        return name, fields
    except ValueError:
        raise SystemExit(f"variant {text!r}: accepted is name=recall_every,recall_span,recall_tokens"
                         "[,recall_step_tokens[,recall_dims[,recall_layers]]] (e.g. sched=64,32,0.5)") from None


def table(paths: list[str]) -> None:
    """A markdown table of the --out files' answers: a row per sample, a column per variant (in order of first
    appearance), each answer marked right or wrong."""
    rows = [json.loads(line) for p in paths for line in open(p)]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    print("| sample | answer | " + " | ".join(variants) + " |")
    print("|---" * (len(variants) + 2) + "|")
    for sid in dict.fromkeys(r["id"] for r in rows):
        got = {r["variant"]: r for r in rows if r["id"] == sid}
        answer = next(iter(got.values()))["answers"][0]
        cells = [f"{got[v]['prediction'].strip()!r} {'right' if got[v]['score'] == 1 else 'wrong'}" if v in got
                 else "" for v in variants]
        print(f"| {sid} | {answer} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="VARIANTs; with --table: --out files to tabulate")
    ap.add_argument("--table", action="store_true", help="print a table of the --out files given, run nothing")
    ap.add_argument("--task", default="multi_key", choices=["needle", "multi_key", "multi_value"])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--num_samples", type=int, default=4)
    ap.add_argument("--first", type=int, default=0, help="skip the samples before this index")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--model_name", default="smollm2-135m")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.table:
        return table(args.variants)
    if not args.out:
        raise SystemExit("--out FILE.jsonl is needed (the answers go there)")
    variants = [parse_variant(v) for v in args.variants]

    import torch
    import utils
    from evals.harness import (MAX_NEW_TOKENS, encode_prompt, forward_chunked, make_cache, run_generation)
    from evals.synthetic import answer_complete, score_synthetic, synthetic_samples
    from atskv import decode_recall_layers
    done = set()
    out = Path(args.out)
    if out.exists():
        done = {(r["id"], r["variant"]) for r in map(json.loads, out.open())}
    model, tok = utils.load_model_and_tokenizer(args.model_name)
    utils.set_seed(args.seed)
    samples = synthetic_samples(tok, args.task, args.context, args.num_samples, args.seed)[args.first:]
    for s in samples:
        if all((s.id, name) in done for name, _ in variants):
            continue
        ctx_ids, q_ids = encode_prompt(tok, s.context, s.question, s.answer_prefix)
        n_new = MAX_NEW_TOKENS[s.task]
        cache, _ = make_cache("atskv", model, args.budget, len(ctx_ids), {"external_memory": True, "evict_every": 64},
                              tok, n_new)
        with torch.no_grad():
            forward_chunked(model, cache, torch.tensor([ctx_ids], device=model.device), 512)
        for name, fields in variants:
            if (s.id, name) in done:
                continue
            c = copy.deepcopy(cache)
            for field, value in fields.items():
                setattr(c.method, field, value)
            c.method.decode_recall = decode_recall_layers(model, c.method.recall_layers)
            r = run_generation(model, tok, c, ctx_ids, q_ids, n_new, "question_agnostic", 512,
                               stop_when=answer_complete(s), prefilled=True)
            line = {"id": s.id, "variant": name, **fields, "prediction": r["prediction"],
                    "score": score_synthetic(s, r["prediction"]), "answers": s.answers}
            with out.open("a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"{s.id} {name}: {r['prediction']!r} {line['score']}", flush=True)
    rows = [json.loads(x) for x in out.open()]
    for name, _ in variants:
        got = [r for r in rows if r["variant"] == name]
        mean = 100 * sum(r["score"] for r in got) / max(1, len(got))
        print(f"{name}: {mean:.1f} on {len(got)} samples: " + " ".join(repr(r["prediction"]) for r in got))


if __name__ == "__main__":
    main()
