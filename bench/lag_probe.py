"""Would a decode step's recall chosen with the previous step's query bring back the same entries? (issue 24)

At batch 1 the fast path's recall costs 0.57 ms a step on the H100, more than compression saves there
(results/recall-step-kernels-h100-random/fifth). A layer's recall chosen from the previous step's query could run
on a side stream a step ahead, off the critical path. This probe asks first whether the choice would be the same:
it runs `bench/recall_schedule_probe.py` (its arguments after the probe's own) with the plain path's
`PassiveStore.recall` wrapped, and at every decode step, layer and KV head compares the n entries chosen with the
step's query against the n chosen from the same store with that layer's query of the step before: the share of
them in common, the share of rows where the two choices are the same set, and the share of the step's own choice's
vote mass (the step's votes summed over the n entries) that the lagged choice holds. The answers are the plain
path's (the recall itself is not changed).

    python bench/lag_probe.py --stats /tmp/lag.json -- --task multi_key --budget 0.1 --num_samples 2 \
        --out /tmp/lag_answers.jsonl step_r16=1,1,0.5,0.02,16
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def votes_of(store, query, dims: int):
    """The votes (B, H_kv, N) of a shared-choice recall over store's int8 keys for query (B, H_q, 1, D)."""
    from external_memory import group_votes, int8_logits, sparq_logits
    B, Hq, q, D = query.shape
    Hkv = store.kq.shape[1]
    qg = query.view(B, Hkv, Hq // Hkv, q, D)
    ub = sparq_logits(qg, store.kq, store.kscale[..., 0], store.kvalid, dims) if 0 < dims < D else \
        int8_logits(qg, store.kq, store.kscale[..., 0], store.kvalid)
    return group_votes(ub, D)


def main():
    argv = sys.argv[1:]
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    stats_path = own[own.index("--stats") + 1] if "--stats" in own else "lag_probe.json"
    import external_memory
    import recall_schedule_probe
    rows, previous, original = [], {}, external_memory.PassiveStore.recall

    def recorded(self, query, n_pages, span=1, per_query=False, dims=0):
        out = original(self, query, n_pages, span, per_query, dims)
        decode = query.shape[2] == 1 and self.kq is not None and not per_query and span == 1 and \
            self.page_size == 1
        if decode:
            before = previous.get(id(self))
            if before is not None and before.shape == query.shape:
                votes = votes_of(self, query, dims)
                n = min(n_pages, votes.shape[-1])
                top = votes.topk(n, dim=-1)
                lag = votes_of(self, before, dims).topk(n, dim=-1).indices
                mass = votes.clamp(min=0).gather(-1, lag).sum(-1) / top.values.clamp(min=0).sum(-1).clamp(min=1e-30)
                for b in range(votes.shape[0]):
                    for h in range(votes.shape[1]):
                        a, c = set(top.indices[b, h].tolist()), set(lag[b, h].tolist())
                        rows.append((len(a & c) / max(1, len(a)), a == c, float(mass[b, h])))
            previous[id(self)] = query.detach().clone()
        else:                            # the question's chunk, a new sample: no previous decode query
            previous.pop(id(self), None)
        return out
    external_memory.PassiveStore.recall = recorded
    sys.argv = [sys.argv[0]] + rest
    recall_schedule_probe.main()
    result = {"rows": len(rows), "mean_shared": sum(r[0] for r in rows) / max(1, len(rows)),
              "same_set": sum(r[1] for r in rows) / max(1, len(rows)),
              "mean_vote_mass": sum(r[2] for r in rows) / max(1, len(rows)), "args": rest}
    Path(stats_path).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
