"""Two runs' answers, sample by sample: per cell (context, budget, task) the samples both hold, how many of them have
the same prediction, and the two mean scores on them. For a cell that one run decoded on the fast path and the
other on the plain path (issue 24), or one method against another on the same samples.
    python bench/compare_runs.py RUN_A RUN_B [--method_a M] [--method_b M] [--partial_a DIR] [--partial_b DIR]
RUN_x: a folder with results.jsonl (a later record of a cell replaces an earlier one, as in report.py); --method_x:
which method's records (default: every method of that run; give it when the run holds several). --partial_x: the
`partial/` files of that run's unfinished cells (named <label>-<budget>-<task>.jsonl; bench/gpu_recall_table.sh
gathers them so), compared on the samples they hold."""
import argparse
import json
from pathlib import Path


def cells(run_dir: str, method: str | None) -> dict:
    """(context, budget, task) -> {sample id: (prediction, score)} of the run's finished records."""
    out = {}
    for line in open(Path(run_dir) / "results.jsonl"):
        r = json.loads(line)
        if r.get("status") != "ok" or (method is not None and r["method"] != method):
            continue
        out[r["context_size"], r["budget"], r["task"]] = {s["id"]: (s["prediction"], s["score"]) for s in r["samples"]}
    return out


def partial_cells(folder: str) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.jsonl")):
        budget, task = float(f.stem.split("-")[-2]), f.stem.split("-")[-1]
        rows = [json.loads(line) for line in open(f)]
        ctx = int(rows[0]["id"].split("-")[1])
        out[ctx, budget, task] = {r["id"]: (r["result"]["prediction"], r["result"]["score"]) for r in rows}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--method_a")
    ap.add_argument("--method_b")
    ap.add_argument("--partial_a")
    ap.add_argument("--partial_b")
    args = ap.parse_args()
    a, b = cells(args.run_a, args.method_a), cells(args.run_b, args.method_b)
    for run, folder in ((a, args.partial_a), (b, args.partial_b)):
        if folder:
            run.update({k: v for k, v in partial_cells(folder).items() if k not in run})
    print("| context | budget | task | samples | same prediction | A | B | A - B |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for key in sorted(set(a) & set(b), key=str):
        ids = [i for i in a[key] if i in b[key]]
        if not ids:
            continue
        same = sum(a[key][i][0] == b[key][i][0] for i in ids)
        sa, sb = (100 * sum(run[key][i][1] for i in ids) / len(ids) for run in (a, b))
        worst = max(worst, abs(sa - sb))
        print(f"| {key[0]} | {key[1]:g} | {key[2]} | {len(ids)} | {same} | {sa:.1f} | {sb:.1f} | {sa - sb:+.1f} |")
    print(f"largest difference: {worst:.1f} points")


if __name__ == "__main__":
    main()
