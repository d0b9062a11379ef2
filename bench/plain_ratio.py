"""Each round's plain-path decode ms per token and its ratio to the full cache's in the same round, and the median
ratio over the rounds (bench/plain_decode.sh with ROUNDS).
    python bench/plain_ratio.py DIR [DIR ...]     (each a run's --output_dir, holding results.jsonl)
"""
import json
import statistics
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    ratios: dict[str, list[float]] = {}
    for d in dirs:
        recs = [json.loads(line) for line in (Path(d) / "results.jsonl").read_text().splitlines()]
        ms = {r["method"]: r["decode_ms"] for r in recs if r.get("status") == "ok" and r.get("path") == "hf_plain"}
        if "full" not in ms:
            print(f"{d}: no full-cache record, skipped")
            continue
        print(f"{d}: " + ", ".join(f"{m} {v:.1f} ms" for m, v in ms.items()))
        for m, v in ms.items():
            if m != "full":
                ratios.setdefault(m, []).append(v / ms["full"])
    for m, rs in ratios.items():
        print(f"{m}: ratio to full per round {' '.join(f'{r:.2f}' for r in rs)}; median {statistics.median(rs):.2f} "
              f"({len(rs)} rounds)")


if __name__ == "__main__":
    main(sys.argv[1:])
