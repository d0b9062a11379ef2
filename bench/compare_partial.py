"""Cells' saved samples (`partial/` files of a sweep stopped midway, renamed <label>-<budget>-<task>.jsonl) against
a finished run's scores on the same samples: `python bench/compare_partial.py PARTIAL_DIR RUN_DIR` prints, per cell,
how many samples it holds and the mean score of both on them (the finished run's method: --method, default
atskv[external_memory=true]). `bench/compare_runs.py` compares the answers too."""
import argparse

from compare_runs import cells, partial_cells   # bench/ is the script's directory, first on sys.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("partial_dir")
    ap.add_argument("run_dir")
    ap.add_argument("--method", default="atskv[external_memory=true]")
    args = ap.parse_args()
    run = cells(args.run_dir, args.method)
    total = [0, 0.0, 0.0]
    for (ctx, budget, task), got in sorted(partial_cells(args.partial_dir).items(), key=str):
        ours = [score for _, score in got.values()]
        theirs = [run[ctx, budget, task][i][1] for i in got]
        print(f"{task} at {budget:g}: {len(ours)} samples at {ctx} tokens, {100 * sum(ours) / len(ours):.1f} against "
              f"{100 * sum(theirs) / len(theirs):.1f}")
        total = [total[0] + len(ours), total[1] + sum(ours), total[2] + sum(theirs)]
    print(f"all: {total[0]} samples, {total[1]:.1f} against {total[2]:.1f} points")


if __name__ == "__main__":
    main()
