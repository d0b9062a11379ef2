"""Do the fast path and the plain path decode the same tokens at small budgets? (fp32, CPU, the default model)

A needle prompt of 320 tokens (seed 3), batch 2, 8 greedy steps, per method and budget; prints `same` or both
token lists. The tests hold the two paths together at budgets of 64 and 96 and at 40 for atskv
(tests/test_fast_decode.py); this looks below that.

    python bench/fast_vs_plain_budgets.py --budgets 16,33,40,48 --methods "atskv,atskv[evict_every=4]"
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--budgets", default="16,33,40,48")
    p.add_argument("--methods", default="atskv,atskv[evict_every=4],atskv[external_memory=true],"
                   "atskv[external_memory=true;recall_step_tokens=0.02]")
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args(argv)
    import torch
    import evaluation as ev
    from fast_decode import StaticDecoder
    from sparse_kv_cache import KVCacheFactory
    from tests.conftest import greedy_plain_decode
    from utils import load_model_and_tokenizer
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("smollm2-135m", device="cpu")
    s = ev.synthetic_samples(tok, "needle", 320, 1, seed=3)[0]
    c, q = ev.encode_prompt(tok, s.context, s.question, s.answer_prefix)
    ids = torch.tensor([c + q]).expand(2, -1)
    methods = [m for m in a.methods.split(",") if m]   # specs with ';' inside brackets hold no ','
    for spec in methods:
        m, params = KVCacheFactory.parse_spec(spec)
        for budget in map(int, a.budgets.split(",")):
            with torch.no_grad():
                plain = KVCacheFactory.create(m, model, budget=budget, tokenizer=tok, **params)
                want = greedy_plain_decode(model, plain, ids, a.steps)
                cache = KVCacheFactory.create(m, model, budget=budget, tokenizer=tok, **params)
                logits = ev.forward_chunked(model, cache, ids, chunk=128)
                dec = StaticDecoder.from_cache(model, m, cache, ids.shape[1], a.steps)
                got = dec.generate(logits.argmax(-1), a.steps + 1)
            same = torch.equal(got, want)
            print(f"{spec} @ {budget}: " + ("same" if same else f"fast {got[0].tolist()} plain {want[0].tolist()}"),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
