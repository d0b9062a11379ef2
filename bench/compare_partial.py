"""Cells' saved samples (`partial/` files of a sweep stopped midway, renamed <label>-<budget>-<task>.jsonl) against
a finished run's scores on the same samples: `python bench/compare_partial.py PARTIAL_DIR RUN_DIR` prints, per file,
how many samples it holds and the mean score of both on them (the finished run's method: --method, default
atskv[external_memory=true])."""
import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("partial_dir")
    ap.add_argument("run_dir")
    ap.add_argument("--method", default="atskv[external_memory=true]")
    args = ap.parse_args()
    run = {}
    for line in open(Path(args.run_dir) / "results.jsonl"):
        r = json.loads(line)
        if r.get("method") == args.method and r.get("status") == "ok":
            for s in r["samples"]:
                run[r["context_size"], r["budget"], s["id"]] = s["score"]
    total = [0, 0.0, 0.0]
    for f in sorted(Path(args.partial_dir).glob("*.jsonl")):   # named <label>-<budget>-<task>.jsonl
        budget = float(f.stem.split("-")[-2])
        rows = [json.loads(line) for line in open(f)]
        ctx = int(rows[0]["id"].split("-")[1])
        ours = [r["result"]["score"] for r in rows]
        theirs = [run[ctx, budget, r["id"]] for r in rows]
        print(f"{f.name}: {len(rows)} samples at {ctx} tokens, {100 * sum(ours) / len(ours):.1f} against "
              f"{100 * sum(theirs) / len(theirs):.1f}")
        total = [total[0] + len(rows), total[1] + sum(ours), total[2] + sum(theirs)]
    print(f"all: {total[0]} samples, {total[1]:.1f} against {total[2]:.1f} points")


if __name__ == "__main__":
    main()
