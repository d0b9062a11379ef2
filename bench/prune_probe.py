"""How many of a decode step's vote blocks could the recall skip, exactly, on the real model's attention? (issue 24)

The fast path's recall scans every block of a row's passive tier twice: once for each query head's softmax
statistics, once for the votes and each block's best. From the statistics alone no vote in block b exceeds
U_b = sum over heads of exp(m_b - M) / Z (m_b: the block's largest logit of a head; M, Z: the row's), and any n
distinct entries' lower bounds give a lower bound T of the row's n-th best vote: a block with U_b < T holds none
of the n entries recalled and need not be scanned again. This probe runs `bench/recall_schedule_probe.py` (its
arguments after the probe's own) with the plain path's decode-step scoring wrapped, and for every decode step,
layer and KV head measures the share of 512-entry blocks with U_b < T for three lower bounds, each over distinct
entries: `block` (one entry a block, at a head's block maximum), `sub32` (the maxima of 32-entry sub-blocks of
one head a block), `top16` (the 16 best of one head a block), and `oracle` (the row's real n-th best vote).

    python bench/prune_probe.py --n 16 --stats /tmp/prune.json -- --task multi_key --budget 0.1 --num_samples 2 \
        --out /tmp/prune_answers.jsonl step_r16=1,1,0.5,0.02,16
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BLOCK, SUB = 512, 32


def nth_largest(values, n):
    import torch
    return values.topk(n).values[-1] if values.numel() >= n else torch.tensor(float("-inf"))


def skip_shares(logits, n: int) -> dict:
    """logits (G, N) of one row (-inf where no entry) -> the share of blocks each bound lets the votes skip."""
    import torch
    G, N = logits.shape
    ok = torch.isfinite(logits)
    if int(ok.any(0).sum()) < n:
        return {}
    M = logits.max(1, keepdim=True).values
    p = torch.where(ok, torch.exp(logits - M), 0.0)
    Z = p.sum(1, keepdim=True)
    votes = (p / Z).sum(0)
    pad = (-N) % BLOCK
    lb = torch.nn.functional.pad(logits, (0, pad), value=float("-inf")).view(G, -1, BLOCK)   # (G, NB, BLOCK)
    w_all = torch.where(torch.isfinite(lb), torch.exp(lb - M[:, :, None]) / Z[:, :, None], 0.0)   # each term
    w = w_all.max(2).values                                                     # (G, NB): exp(m_b - M) / Z
    upper = w.sum(0)                                                            # (NB,)
    head = w.argmax(0)                                                          # a block's head g*
    own = w_all[head, torch.arange(w.shape[1])]                                 # (NB, BLOCK) of that head
    bounds = {"block": w.max(0).values,
              "sub32": own.view(own.shape[0], -1, SUB).max(2).values.flatten(),
              "top16": own.topk(16, dim=1).values.flatten(),
              "oracle": votes.topk(n).values[-1:]}
    out = {}
    for name, b in bounds.items():
        t = b[0] if name == "oracle" else nth_largest(b, n)
        out[name] = float((upper * 1.001 < t * 0.999).float().mean())
    return out


def main():
    argv = sys.argv[1:]
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    n = int(own[own.index("--n") + 1]) if "--n" in own else 16
    stats_path = own[own.index("--stats") + 1] if "--stats" in own else "prune_probe.json"
    import external_memory
    import recall_schedule_probe
    shares, original = [], external_memory.sparq_logits

    def recorded(q, kq, scale, valid, r):
        ub = original(q, kq, scale, valid, r)
        if q.shape[3] == 1:   # a decode step (the question's chunk has many queries)
            for b in range(ub.shape[0]):
                for h in range(ub.shape[1]):
                    s = skip_shares(ub[b, h, :, 0].float() * q.shape[-1] ** -0.5, n)   # group_votes' scale
                    if s:
                        shares.append(s)
        return ub
    external_memory.sparq_logits = recorded
    sys.argv = [sys.argv[0]] + rest
    recall_schedule_probe.main()
    summary = {name: sum(s[name] for s in shares) / max(1, len(shares)) for name in (shares[0] if shares else {})}
    result = {"n": n, "block": BLOCK, "rows": len(shares), "mean_skip_share": summary, "args": rest}
    Path(stats_path).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
