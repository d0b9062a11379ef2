"""Build figures, tables and results.md from results.jsonl alone (no model needed): every number comes from there."""
from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from utils import atomic_write_text, read_jsonl, readable_by_all

MB = 1024 * 1024


def latest_records(records: list[dict]) -> list[dict]:
    """One record per cell: the last ok one, else the last one (an error)."""
    by_cell: dict[str, dict] = {}
    for r in records:
        k = r.get("cell")
        if k is None:
            continue
        if r.get("status") == "ok" or by_cell.get(k, {}).get("status") != "ok":
            by_cell[k] = r
    return list(by_cell.values())


def label(r: dict) -> str:
    off = f" (kernels off: {', '.join(r['kernels_off'])})" if r.get("kernels_off") else ""
    off += f" ({r['contexts']} contexts)" if r.get("contexts") else ""
    return (r["method"] if r.get("budget") is None else f"{r['method']} @ {fmt_budget(r['budget'])}") + off


def fmt_budget(b) -> str:
    if b is None:
        return "100%"
    return f"{b:.0%}" if isinstance(b, float) else f"{b} tok"


def budget_order(b) -> float:
    return 2.0 if b is None else (b if isinstance(b, float) else 1.5 + b / 1e9)


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_csv(path: Path, header, rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def save_fig(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    readable_by_all(tmp)
    os.replace(tmp, path)


def sample_scores(rs: list[dict]) -> list[float]:
    """Every sample's score (0..1) of these cells; a cell without per-sample scores counts its mean n times."""
    out = []
    for r in rs:
        per = [x["score"] for x in r.get("samples", []) if "score" in x]
        out += per if per else [r["score"] / 100.0] * int(r.get("n_samples", 1))
    return out


def interval95(scores: list[float]) -> tuple[float, float]:
    """95% interval of a mean score (x100): Wilson's for right/wrong scores (exact at 0 and 100, where the normal
    interval collapses), the normal one from the samples' spread otherwise."""
    n = len(scores)
    if not n:
        return float("nan"), float("nan")
    p = sum(scores) / n
    if all(x in (0.0, 1.0) for x in scores):
        z = 1.96
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)
    sd = math.sqrt(sum((x - p) ** 2 for x in scores) / max(1, n - 1))
    return 100 * max(0.0, p - 1.96 * sd / math.sqrt(n)), 100 * min(1.0, p + 1.96 * sd / math.sqrt(n))


def tiers_mb(rs: list[dict]) -> tuple[float, float, float]:
    """Mean MB in each tier a method holds: active KV and summaries on the device (with a passive tier kept on the
    device: the fast path's passive_device), the passive store on the host. Records from before the tiers were
    recorded give their KV bytes as the active tier."""
    n = max(1, len(rs))
    mb = lambda k: sum(r.get(k, 0) for r in rs) / n / MB  # noqa: E731
    active = sum(r.get("active_kv_bytes", r.get("kv_bytes", 0)) for r in rs) / n / MB
    return active, mb("summary_bytes") + mb("device_tier_bytes"), mb("passive_bytes")


def recalled_at(rs: list[dict], size: int) -> str:
    """Mean bytes a method with an external memory copied to the device while the context was read (its prompt
    chunks; '-' in records made before it was counted), while the question was read, and per decode step (all
    summed over the layers), at one context size; '-' for methods without recall."""
    sel = [r for r in rs if r["context_size"] == size and "recall_bytes_per_step" in r]
    if not sel:
        return "-"
    mean = lambda k: sum(r.get(k, 0) for r in sel) / len(sel)  # noqa: E731
    prefill = f"{mean('recall_bytes_prefill') / MB:.0f}" if all("recall_bytes_prefill" in r for r in sel) else "-"
    return f"{prefill} / {mean('recall_bytes_question') / MB:.2f} / {mean('recall_bytes_per_step') / 1024:.0f}"


def timing_marks(ok: list[dict]) -> dict[str, str]:
    """Cells whose times are not comparable with the rest: another machine (‡), or a CPU-speed probe before the
    cell more than 30% away from the run's median (†: the machine was busier or freer than for the others)."""
    from statistics import median
    marks = {}
    hws = [r.get("env", {}).get("hardware") for r in ok]
    common = max(set(hws), key=hws.count) if hws else None
    probes = [r["timing_probe"]["probe_ms"] for r in ok if r.get("timing_probe")]
    mid = median(probes) if probes else None
    for r in ok:
        m = ""
        if r.get("env", {}).get("hardware") != common:
            m += "‡"
        if mid and r.get("timing_probe") and not mid / 1.3 <= r["timing_probe"]["probe_ms"] <= mid * 1.3:
            m += "†"
        if m:
            marks[r["cell"]] = m
    return marks


TIMING_NOTE = ("Times are this run's, on its hardware: prefill seconds per sample and decode milliseconds per "
               "generated token, plain decode loop at batch 1. † a CPU-speed probe just before the cell ran more "
               "than 30% away from the run's median (the machine was busier or freer): compare with care. "
               "‡ measured on other hardware than most cells. § decoded on the fast path (`--fast_decode`): the "
               "time includes the decoder's set-up (its CUDA graph capture) and every one of max_new_tokens steps "
               "(the fast path does not stop early), so it is not the plain loop's time; `--benchmark speed` "
               "times the fast path.")


def fast_mark(rs: list[dict]) -> str:
    """'§' where any of the records was decoded on the fast path (TIMING_NOTE)."""
    return "§" if any(r.get("fast_decode") for r in rs) else ""


def synthetic_tables(ok: list[dict]):
    """Rows: method @ budget. Columns: score per context size, the mean with its 95% interval and sample count, the
    retention against the full cache, the memory of each tier at the largest context size, and the times."""
    sizes = sorted({r["context_size"] for r in ok})
    big = sizes[-1]
    groups = defaultdict(list)
    for r in ok:
        groups[(r["method"], r["budget"])].append(r)
    full_rs = [r for r in ok if r["method"] == "full"]
    full_tasks = {s: {r["task"] for r in full_rs if r["context_size"] == s} for s in sizes}

    def full_over(rs):   # the full cache's mean over the same cells (context size, task) as rs: like with like
        cells = {(r["context_size"], r["task"]) for r in rs}
        sc = sample_scores([r for r in full_rs if (r["context_size"], r["task"]) in cells])
        return 100 * sum(sc) / len(sc) if sc else None
    marks = timing_marks(ok)
    recalls = any("recall_bytes_per_step" in r for r in ok)
    header = ["method", "budget"] + [f"score @{s}" for s in sizes] + \
        ["mean score [95% interval]", "samples", "vs full", f"device MB @{big}: KV + summaries"
         + (" (+ passive tier kept there)" if any(r.get("device_tier_bytes") for r in ok) else ""),
         f"host MB @{big}"] + \
        ([f"recalled @{big}: context MB / question MB / decode KB a step"] if recalls else []) + \
        ["prefill s", "decode ms/token"]
    rows = []
    for (m, b), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], -budget_order(kv[0][1]))):
        per_size = []
        for s in sizes:
            sel = [r for r in rs if r["context_size"] == s]
            have = {r["task"] for r in sel}
            part = f" ({len(have)} of {len(full_tasks[s])} tasks)" if full_tasks[s] - have else ""
            per_size.append(f"{sum(r['score'] for r in sel) / len(sel):.1f}{part}" if sel else "-")
        sc = sample_scores(rs)
        mean = 100 * sum(sc) / len(sc)
        lo, hi = interval95(sc)
        full_score = full_over(rs)
        ret = f"{100 * mean / full_score:.0f}%" if full_score else "-"
        active, summ, host = tiers_mb([r for r in rs if r["context_size"] == big])
        dev = f"{active:.1f}" + (f" + {summ:.2f}" if summ else "")
        mark = "".join(sorted({marks.get(r["cell"], "") for r in rs}))
        pre = sum(r["prefill_s"] for r in rs) / len(rs)
        dec = sum(r["decode_ms_per_token"] for r in rs) / len(rs)
        recalled = [recalled_at(rs, big)] if recalls else []
        rows.append([m, fmt_budget(b)] + per_size + [f"{mean:.1f} [{lo:.0f}-{hi:.0f}]", len(sc), ret, dev,
                                                     f"{host:.1f}" if host else "-"] + recalled +
                    [f"{pre:.2f}{mark}", f"{dec:.1f}{mark}{fast_mark(rs)}"])
    return header, rows


def task_table(ok: list[dict]):
    """Rows: method @ budget. Columns: the score of each task at each context size, then per size the mean over
    the tasks and its ratio to the full cache's mean over the same tasks (the retention the issues ask for)."""
    tasks = sorted({r["task"] for r in ok})
    sizes = sorted({r["context_size"] for r in ok})
    groups = defaultdict(lambda: defaultdict(list))
    for r in ok:
        groups[(r["method"], r["budget"])][(r["context_size"], r["task"])].append(r["score"])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    full = next((d for (m, _), d in groups.items() if m == "full"), {})
    header = ["method", "budget"]
    for s in sizes:
        header += [f"{t} @{s}" for t in tasks] + [f"mean @{s}", f"vs full @{s}"]
    rows = []
    for (m, b), d in sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], -budget_order(kv[0][1]))):
        row = [m, fmt_budget(b)]
        for s in sizes:
            row += [f"{mean(d[(s, t)]):.1f}" if (s, t) in d else "-" for t in tasks]
            have = [t for t in tasks if (s, t) in d]
            both = [t for t in have if (s, t) in full]
            m_s = mean([mean(d[(s, t)]) for t in have]) if have else None
            f_s = mean([mean(full[(s, t)]) for t in both]) if both else None
            row += [f"{m_s:.1f}" if m_s is not None else "-",
                    f"{100 * mean([mean(d[(s, t)]) for t in both]) / f_s:.0f}%" if f_s else "-"]
        rows.append(row)
    return header, rows


BENCH_NAMES = {"synthetic": "Synthetic benchmark", "longbench": "LongBench", "zeroscrolls": "ZeroSCROLLS"}


def figures(ok: list[dict], fig_dir: Path, bench: str = "synthetic") -> list[tuple[str, str]]:
    """The figures of one benchmark, files named <bench>_<figure>.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="talk", font_scale=0.7)
    made = []
    score_name = "accuracy (%)" if bench == "synthetic" else "score (official metric, x100)"
    score_short = "accuracy" if bench == "synthetic" else "score"

    def fig_file(fig, fig_dir, bench, stem, title):
        save_fig(fig, fig_dir / f"{bench}_{stem}.png")
        plt.close(fig)
        return title, f"figures/{bench}_{stem}.png"
    methods = sorted({r["method"] for r in ok})
    palette = dict(zip(methods, sns.color_palette("tab10" if len(methods) <= 10 else "tab20", len(methods))))

    # 1. accuracy vs KV budget (fractional budgets), mean over tasks and sizes with 95% intervals; the full cache is
    # the 100% point of every curve (a compressed cache at 100% evicts nothing)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    full = [r for r in ok if r["method"] == "full"]
    full_pt = None
    if full:
        sc = sample_scores(full)
        full_pt = (100.0, 100 * sum(sc) / len(sc), interval95(sc))
    compressed = [m for m in methods if m != "full"]
    for i, m in enumerate(compressed):
        pts = defaultdict(list)
        for r in ok:
            if r["method"] == m and isinstance(r["budget"], float):
                pts[r["budget"]].append(r)
        if not pts:
            continue
        xs = sorted(pts)
        ys, errs = [], [[], []]
        for x in xs:
            sc = sample_scores(pts[x])
            y = 100 * sum(sc) / len(sc)
            lo, hi = interval95(sc)
            ys.append(y)
            errs[0].append(y - lo)
            errs[1].append(hi - y)
        shift = 1.04 ** (i - (len(compressed) - 1) / 2)   # side by side, so that equal scores do not hide each other
        xs = [100 * x * shift for x in xs]
        # its own marker and dash as well as colour: two methods with equal scores draw one line, and both must show
        ax.errorbar(xs, ys, yerr=errs, marker="os^Dvpx"[i % 7], ls=["-", "--", "-.", (0, (1, 1))][i % 4],
                    capsize=3, label=m, color=palette[m], alpha=0.9, lw=1.6, ms=5)
        if full_pt:   # on to the full cache's point, dotted: no budget was measured in between
            ax.plot([xs[-1], 100.0], [ys[-1], full_pt[1]], ":", color=palette[m], lw=1.2, alpha=0.8)
    if full_pt:
        ax.plot([full_pt[0]], [full_pt[1]], "k*", ms=14, label="full cache (100%)", zorder=5)
    budgets_pct = sorted({100 * r["budget"] for r in ok if isinstance(r["budget"], float)} | {100.0})
    ax.set_xscale("log")
    ax.set_xticks(budgets_pct, [f"{b:g}%" for b in budgets_pct])
    ax.minorticks_off()
    ax.set_xlabel("KV budget (% of the context kept on the device, log scale)")
    ax.set_ylabel(score_name)
    ax.set_title(f"{BENCH_NAMES[bench]}: {score_short} vs KV budget")
    ax.set_ylim(*((-3, 105) if bench == "synthetic" else (0, None)))
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left", borderaxespad=0)
    made.append(fig_file(fig, fig_dir, bench, "accuracy_vs_budget",
                         f"{score_short.capitalize()} vs KV budget (mean over tasks and context sizes, 95% "
                         "intervals; the full cache is every curve's 100% point)"))

    # 2. memory per method @ budget at the largest context size, stacked by tier: what is held on the device (active
    # KV, summaries) and on the host (passive store)
    big = max(r["context_size"] for r in ok)
    at_big = [r for r in ok if r["context_size"] == big]
    combos = sorted({(r["method"], r["budget"]) for r in at_big},
                    key=lambda c: (c[0] != "full", c[0], -budget_order(c[1])))
    rows_of = [[r for r in at_big if (r["method"], r["budget"]) == c] for c in combos]
    labels = [label(rs[0]) for rs in rows_of]
    tiers = [tiers_mb(rs) for rs in rows_of]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(labels) + 1.6))
    left = [0.0] * len(labels)
    for k, (name, color) in enumerate((("active KV (device)", "#4C72B0"), ("summaries (device)", "#DD8452"),
                                       ("passive store (host)", "#BBBBBB"))):
        vals = [t[k] for t in tiers]
        if not any(vals):
            continue
        ax.barh(labels, vals, left=left, color=color, label=name, hatch="//" if k == 2 else None,
                edgecolor="white")
        left = [a + v for a, v in zip(left, vals)]
    for y, t in enumerate(tiers):
        ax.text(left[y], y, f" {t[0] + t[1]:.1f} MB device" + (f" + {t[2]:.1f} MB host" if t[2] else ""),
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.45 * max(left + [1e-9]))
    ax.set_xlabel(f"memory held at the end of the answer (MB), {big}-token contexts")
    ax.set_title(f"{BENCH_NAMES[bench]}: memory per method, by tier")
    ax.legend(fontsize=8, loc="lower right")
    made.append(fig_file(fig, fig_dir, bench, "memory_by_tier",
                         f"Memory per method at {big} tokens: device (active KV, summaries) and host (passive store)"))

    # 3. accuracy vs context size (only when the sweep has more than one)
    if len({r["context_size"] for r in ok}) < 2:
        return made + timing_and_heatmap(ok, fig_dir, bench, palette, fig_file, plt, sns)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (m, b) in sorted({(r["method"], r["budget"]) for r in ok}, key=lambda x: (x[0], -budget_order(x[1]))):
        if b is not None and b != 0.25 and m != "full":
            continue
        pts = defaultdict(list)
        for r in ok:
            if r["method"] == m and r["budget"] == b:
                pts[r["context_size"]].append(r["score"])
        xs = sorted(pts)
        ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], "o-", label=f"{m} ({fmt_budget(b)})", color=palette[m])
    ax.set_xlabel("context size (tokens)")
    ax.set_ylabel(score_name)
    ax.set_ylim(*((-3, 103) if bench == "synthetic" else (0, None)))
    ax.set_title(f"{BENCH_NAMES[bench]}: {score_short} vs context size (25% budget)")
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left", borderaxespad=0)
    made.append(fig_file(fig, fig_dir, bench, "accuracy_vs_context",
                         f"{score_short.capitalize()} vs context size at a 25% budget"))
    return made + timing_and_heatmap(ok, fig_dir, bench, palette, fig_file, plt, sns)


def timing_and_heatmap(ok, fig_dir, bench, palette, fig_file, plt, sns) -> list[tuple[str, str]]:
    made = []
    # 4. time per method
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len({label(r) for r in ok}) + 2))
    labels = sorted({label(r) for r in ok})
    marks = timing_marks(ok)
    shown = [lb + "".join(sorted({marks.get(r["cell"], "") for r in ok if label(r) == lb})) for lb in labels]
    for ax, key, title in ((axes[0], "prefill_s", "prefill time per sample (s)"),
                           (axes[1], "decode_ms_per_token", "decode time per token (ms)")):
        vals = [sum(r[key] for r in ok if label(r) == lb) / max(1, sum(1 for r in ok if label(r) == lb))
                for lb in labels]
        ax.barh(shown, vals, color=[palette[lb.split(" @")[0]] for lb in labels])
        ax.set_xlabel(title)
        if key == "decode_ms_per_token":  # throughput beside each bar
            for y, v in enumerate(vals):
                ax.text(v, y, f" {1000 / v:.0f} tok/s" if v else "", va="center", fontsize=8)
            ax.set_xlim(0, 1.3 * max(vals + [1e-9]))
    axes[0].set_title(f"{BENCH_NAMES[bench]}: prefill")
    axes[1].set_title("Decode")
    if marks:
        fig.text(0.01, -0.02, "† a CPU-speed probe before the cell was more than 30% off the run's median; ‡ other "
                 "hardware: not comparable with the rest", fontsize=8, ha="left", va="top")
    fig.tight_layout()
    made.append(fig_file(fig, fig_dir, bench, "timing", "Prefill and decode time per method (this run's hardware; "
                         "† and ‡ mark cells measured under other conditions)"))

    # 5. needle depth x context size heatmaps, one panel per method @ budget
    if bench != "synthetic":
        return made
    combos = sorted({(r["method"], r["budget"]) for r in ok}, key=lambda x: (x[0] != "full", x[0], -budget_order(x[1])))
    if combos:
        cols = min(4, len(combos))
        rows_n = (len(combos) + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.8 * cols, 3.6 * rows_n), squeeze=False)
        for ax, (m, b) in zip(axes.flat, combos):
            grid = defaultdict(list)
            for r in ok:
                if r["method"] == m and r["budget"] == b:
                    for s in r.get("samples", []):
                        grid[(round(s["depth"], 2), r["context_size"])].append(s["score"])
            depths = sorted({d for d, _ in grid})
            sizes = sorted({c for _, c in grid})
            mat = [[100 * sum(grid[(d, c)]) / len(grid[(d, c)]) if grid[(d, c)] else float("nan") for c in sizes]
                   for d in depths]
            sns.heatmap(mat, ax=ax, vmin=0, vmax=100, cmap="RdYlGn", annot=True, fmt=".0f", cbar=False,
                        xticklabels=sizes, yticklabels=[f"{d:.0%}" for d in depths], annot_kws={"fontsize": 9})
            ax.tick_params(axis="y", labelrotation=0, labelsize=8)
            ax.tick_params(axis="x", labelsize=8)
            ax.set_title(f"{m} ({fmt_budget(b)})", fontsize=9)
            ax.set_xlabel("context size")
            ax.set_ylabel("needle depth")
        for ax in list(axes.flat)[len(combos):]:
            ax.axis("off")
        fig.suptitle("Accuracy (%) by needle depth and context size")
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        made.append(fig_file(fig, fig_dir, bench, "depth_heatmap", "Accuracy by needle depth and context size"))
    return made


def real_table(ok: list[dict]):
    """LongBench / ZeroSCROLLS: rows method @ budget (and prompt length); columns the tasks, their average and the
    retention against the full cache on the same tasks."""
    tasks = sorted({r["task"] for r in ok})
    sizes = sorted({r["context_size"] for r in ok})
    cells = defaultdict(dict)
    for r in ok:
        cells[(r["method"], r["budget"], r["context_size"])][r["task"]] = r["score"]
    header = ["method", "budget", "prompt tokens"] + tasks + ["average", "vs full", "KV MB", "decode ms/token"]
    rows = []
    for (m, b, size), d in sorted(cells.items(), key=lambda kv: (kv[0][2], kv[0][0] != "full", kv[0][0],
                                                               -budget_order(kv[0][1]))):
        avg = sum(d.values()) / len(d)
        full = cells.get(("full", None, size), {})
        shared = [t for t in d if t in full]
        full_avg = sum(full[t] for t in shared) / len(shared) if shared else 0
        ret = f"{100 * sum(d[t] for t in shared) / len(shared) / full_avg:.0f}%" if shared and full_avg else "-"
        rs = [r for r in ok if (r["method"], r["budget"], r["context_size"]) == (m, b, size)]
        kv = sum(r["kv_bytes"] for r in rs) / len(rs) / MB
        ms = sum(r["decode_ms_per_token"] for r in rs) / len(rs)
        rows.append([m, fmt_budget(b), size] + [f"{d[t]:.1f}" if t in d else "-" for t in tasks] +
                    [f"{avg:.1f}", ret, f"{kv:.1f}", f"{ms:.1f}{fast_mark(rs)}"])
    return header, rows


def api_table(recs: list[dict]):
    """Rows: API model, method @ budget; per benchmark/task score, mean, tokens in and out, input saved vs full."""
    tasks = sorted({(r["benchmark"], r["task"]) for r in recs})
    cells = defaultdict(list)
    for r in recs:
        cells[(r["model"], r["method"], r["budget"])].append(r)
    header = ["model", "method", "budget"] + [f"{b}/{t}" for b, t in tasks] + \
        ["mean score", "input tokens", "output tokens", "input saved vs full"]
    rows = []
    for (model, m, b), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] != "full", kv[0][1],
                                                                  -budget_order(kv[0][2]))):
        by_task = {(r["benchmark"], r["task"]): r["score"] for r in rs}
        full = [r for r in recs if r["model"] == model and r["method"] == "full"]
        n_in = sum(r["input_tokens"] for r in rs)
        shared = {(r["benchmark"], r["task"], r["context_size"]) for r in rs}
        full_in = sum(r["input_tokens"] for r in full if (r["benchmark"], r["task"], r["context_size"]) in shared)
        saved = f"{100 * (1 - n_in / full_in):.0f}%" if full_in else "-"
        rows.append([model, m, fmt_budget(b)] + [f"{by_task[t]:.1f}" if t in by_task else "-" for t in tasks] +
                    [f"{sum(by_task.values()) / len(by_task):.1f}", n_in, sum(r["output_tokens"] for r in rs), saved])
    return header, rows


REAL_NOTES = {
    "longbench": "LongBench's official prompts, generation lengths and metrics (token F1 for QA, ROUGE-L for "
                 "summaries, classification / retrieval / count scores, code edit similarity; max over gold "
                 "answers, x100). Prompts longer than the prompt-token limit keep their first and last halves.",
    "zeroscrolls": "ZeroSCROLLS validation split, its prompts and generation lengths; geometric mean of "
                   "ROUGE-1/2/Lsum for summaries, F1 for QA, first-letter accuracy for quality (x100). Documents "
                   "longer than the prompt-token limit are cut at the end and marked with the record's "
                   "truncation separator.",
}


def build_report(out_dir, command: str = "") -> None:
    out_dir = Path(out_dir)
    records = latest_records(read_jsonl(out_dir / "results.jsonl"))
    ok = [r for r in records if r.get("status") == "ok"]
    errors = [r for r in records if r.get("status") == "error"]
    ran = {r["benchmark"] for r in ok}
    ran_tasks = {(r["benchmark"], r.get("task")) for r in ok}
    skipped = {}  # a whole benchmark that never ran, or tasks of one that did not run
    for r in records:
        if r.get("status") != "skipped":
            continue
        tasks = r.get("tasks")
        if tasks and any((r["benchmark"], t) not in ran_tasks for t in tasks):
            skipped[f"{BENCH_NAMES.get(r['benchmark'], r['benchmark'])} ({', '.join(tasks)})"] = r["reason"]
        elif not tasks and r["benchmark"] not in ran:
            skipped[BENCH_NAMES.get(r["benchmark"], r["benchmark"])] = r.get("reason", "")
    lines = ["# ATSKV results", ""]
    env = ok[0]["env"] if ok else next((r["env"] for r in records if "env" in r), {})
    models = sorted({r["model"] for r in records if "model" in r})
    seeds = sorted({r["seed"] for r in records if "seed" in r})
    sources = sorted({r["env"]["model_source"] for r in records if r.get("env", {}).get("model_source")})
    lines += ["## Setup", "",
              f"- model: {', '.join(models) or '-'}" + (f" ({'; '.join(sources)})" if sources else ""),
              f"- hardware: {env['cpu'] if env.get('cpu') and env.get('device') == 'cpu' else env.get('hardware', '-')}"
              f"; device {env.get('device', '-')}, {env.get('dtype', '-')}",
              f"- commit: {', '.join(sorted({str(r['env'].get('commit')) for r in records if 'env' in r})) or '-'}",
              f"- versions: torch {env.get('torch', '-')}, transformers {env.get('transformers', '-')}, "
              f"python {env.get('python', '-')}",
              f"- command: `{command}`" if command else "- command: -",
              f"- seed: {', '.join(map(str, seeds)) or '-'}; eval modes: "
              f"{', '.join(sorted({r['eval_mode'] for r in records if 'eval_mode' in r})) or '-'}",
              f"- cells: {len(ok)} finished, {len(errors)} failed", ""]
    summary = []
    # a kvpress press that masks (AdaKV, KVzip, ...) holds the full cache whatever its budget: its label says so
    ok = [{**r, "method": r["method"] + " (masks)"} if r.get("press_masks") else r for r in ok]
    api = [r for r in ok if r.get("api")]
    ok = [r for r in ok if not r.get("api")]
    syn = [r for r in ok if r["benchmark"] == "synthetic"]
    if syn:
        header, rows = synthetic_tables(syn)
        write_csv(out_dir / "tables" / "synthetic.csv", header, rows)
        t_header, t_rows = task_table(syn)
        write_csv(out_dir / "tables" / "synthetic_tasks.csv", t_header, t_rows)
        lines += ["## Synthetic benchmark", "",
                  f"Tasks: {', '.join(sorted({r['task'] for r in syn}))}; "
                  f"{syn[0]['num_samples']} samples per cell, needle depths spread evenly over 0-100%. "
                  "Score: exact match of the key (%), with its 95% interval over the row's samples (Wilson's): "
                  f"with {syn[0]['num_samples']} samples a cell, one sample moves a cell's score by "
                  f"{100 / syn[0]['num_samples']:.0f} points, so differences inside the intervals are noise. "
                  "Memory: what each method holds at the end of the answer, at the largest context size: "
                  "the active KV and any summaries on the device, and the passive store (external memory) in host "
                  "memory.", "",
                  "**The floor.** The needle at depth 100% sits at the end of the context, inside every method's "
                  "protected recent window, so any method answers it: with depths 0-100% spread evenly that is one "
                  f"sample in {min(5, syn[0]['num_samples'])}, a floor of about "
                  f"{100 / min(5, syn[0]['num_samples']):.0f} points that says nothing about a method.", "",
                  md_table(header, rows), "", TIMING_NOTE, "",
                  "Per task and context size, with the mean over the tasks and its ratio to the full cache's:", "",
                  md_table(t_header, t_rows), ""]
        for title, path in figures(syn, out_dir / "figures", "synthetic"):
            lines += [f"![{title}]({path})", ""]
        summary += summary_lines(syn, BENCH_NAMES["synthetic"])
    for bench in ("longbench", "zeroscrolls"):
        rs = [r for r in ok if r["benchmark"] == bench]
        if not rs:
            continue
        header, rows = real_table(rs)
        write_csv(out_dir / "tables" / f"{bench}.csv", header, rows)
        n = sorted({r["n_samples"] for r in rs})
        lines += [f"## {BENCH_NAMES[bench]}", "", REAL_NOTES[bench] + f" Samples per task: "
                  f"{'/'.join(map(str, n))}; data: {rs[0].get('data_dir', '-')}.", "", md_table(header, rows), ""]
        for title, path in figures(rs, out_dir / "figures", bench):
            lines += [f"![{title}]({path})", ""]
        summary += summary_lines(rs, BENCH_NAMES[bench])
    if api:
        header, rows = api_table(api)
        write_csv(out_dir / "tables" / "api.csv", header, rows)
        lines += ["## API models", "", "Hosted models on the same tasks, prompts, truncation and scoring. `full` "
                  "sends the whole prompt; `atskv` drops the context's least relevant sentences / lines (the local "
                  "model's relevance predictor) down to the budget. Tokens are the provider's own counts; the input "
                  "tokens saved are the input cost saved.", "", md_table(header, rows), ""]
        summary += summary_lines(api, "API")
    speed = [r for r in ok if r["benchmark"].startswith("speed")]
    if speed:
        lines += speed_section(speed, out_dir)
    if summary:
        lines += ["## Summary: score at a stated memory", "", "Per budget, the methods by mean score [95% "
                  "interval], each with the memory it holds for it.", ""] + summary + [""]
    if errors:
        lines += ["## Failed cells", "", md_table(["method", "budget", "benchmark", "task", "context", "error"],
                  [[r["method"], fmt_budget(r.get("budget")), r.get("benchmark"), r.get("task"),
                    r.get("context_size"), r.get("error")] for r in errors]), ""]
    if skipped:
        lines += ["## Skipped", ""]
        lines += [f"- {b}: {reason}" for b, reason in sorted(skipped.items())]
        lines += ["", "To run a skipped benchmark, pass `--data_dir` with its jsonl files in the hub's schema "
                  "(LongBench: `<task>.jsonl`; ZeroSCROLLS: `<task>.validation.jsonl`), or run where the Hugging "
                  "Face hub is reachable.", ""]
    atomic_write_text(out_dir / "results.md", "\n".join(lines))


def summary_lines(ok: list[dict], bench_name: str) -> list[str]:
    """At each budget, the methods ranked by mean score, each with the memory it holds to get there: device
    (active KV + summaries) and host (passive store), against the full cache's score and memory."""
    by = defaultdict(lambda: defaultdict(list))
    for r in ok:
        by[r["budget"]][r["method"]].append(r)

    def held(rs):
        active, summ, host = tiers_mb(rs)
        return f"{active + summ:.1f} MB on the device" + (f" + {host:.1f} MB on the host" if host else "")

    def score(rs):
        sc = sample_scores(rs)
        lo, hi = interval95(sc)
        return 100 * sum(sc) / len(sc), f"{100 * sum(sc) / len(sc):.0f} [{lo:.0f}-{hi:.0f}]"
    api = bool(ok and ok[0].get("api"))
    full = by.pop(None, {}).get("full")
    out = []
    if full:
        out.append(f"- {bench_name}, {'full prompt' if api else 'full cache'}: score {score(full)[1]}"
                   + ("" if api else f", {held(full)}"))
    for b in sorted(by, key=budget_order, reverse=True):
        ranked = sorted(by[b].items(), key=lambda kv: -score(kv[1])[0])
        out.append(f"- {bench_name} at {fmt_budget(b)}: " + "; ".join(
            f"{m} {score(rs)[1]}" + ("" if api else f" ({held(rs)})") for m, rs in ranked))
    return out


def glance(result_dirs, root=".") -> str:
    """The README's "Results at a glance": per committed results folder, its command, commit, hardware, seed and
    sample count, then the score at a stated memory per budget (summary_lines). `python report.py --glance DIR...`
    prints it; a test checks that the README holds exactly this."""
    out = []
    for d in result_dirs:
        ok = [r for r in latest_records(read_jsonl(Path(root) / d / "results.jsonl"))
              if r.get("status") == "ok" and r.get("benchmark") in BENCH_NAMES and not r.get("api")]
        if not ok:
            continue
        env = ok[0]["env"]
        hw = env["cpu"] if env.get("device") == "cpu" and env.get("cpu") else env.get("hardware")
        commits = ", ".join(sorted({str(r["env"].get("commit")) for r in ok}))
        cmds = sorted({r.get("command", "-") for r in ok})
        samples = sorted({r["num_samples"] for r in ok})
        out += [f"[`{d}`]({d}/results.md): `{'`, `'.join(cmds)}` at commit {commits}; {hw}, {env.get('dtype')}; "
                f"seed {', '.join(sorted({str(r['seed']) for r in ok}))}; {'/'.join(map(str, samples))} samples a "
                f"cell; {len(ok)} cells. Score [95% interval] and the memory held:", ""]
        for bench in sorted({r["benchmark"] for r in ok}):
            out += summary_lines([r for r in ok if r["benchmark"] == bench], BENCH_NAMES[bench])
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def run_summary(out_dir) -> list[str]:
    """Three lines for the console at the end of a sweep: the full cache's score and memory, the best compressed
    method at the smallest budget with its memory, and the others there; the first benchmark that ran."""
    ok = [r for r in latest_records(read_jsonl(Path(out_dir) / "results.jsonl"))
          if r.get("status") == "ok" and not r.get("api") and r.get("benchmark") in BENCH_NAMES]
    if not ok:
        return ["no finished cell"]
    bench = ok[0]["benchmark"]
    ok = [r for r in ok if r["benchmark"] == bench]
    lines = summary_lines(ok, BENCH_NAMES[bench])
    full = [ln for ln in lines if "full cache" in ln]
    budgets = [ln for ln in lines if ln not in full]
    if not budgets:
        return full[:3]
    smallest = budgets[-1]
    head, _, rest = smallest.partition(": ")
    entries = rest.split("; ")
    out = full[:1] + [f"{head}, best: {entries[0]}"]
    if len(entries) > 1:
        out.append("then: " + "; ".join(entries[1:]))
    return [ln.lstrip("- ") for ln in out][:3]


SPEED_PATHS = {"hf_plain": "HF plain loop", "fast": "fast path", "fast_bare": "fast path, no scoring"}


def speed_section(recs: list[dict], out_dir: Path) -> list[str]:
    """Decode speed per method, context, batch and path beside the memory floor; the method's share of the step;
    the largest batch that fits; the answers of the fast path against the plain loop."""
    lines = ["## Decode speed", ""]
    plain = [r for r in recs if r["benchmark"] == "speed_plain"]
    if plain:
        full = {(r["context"], r["batch"]): r["decode_ms"] for r in plain if r["method"] == "full"}
        lines += ["### Plain path (`model.generate(past_key_values=cache)`)", "",
                  f"Device: {plain[0]['env'].get('hardware', '-')}, {plain[0]['dtype']}. HF's decode loop, one "
                  "forward per token through the method's cache, random-token contexts; the mean step over "
                  f"{plain[0]['steps']} or more consecutive steps, in whole eviction cycles (evict_every), after 2 "
                  "warm-up steps.", "",
                  md_table(["method", "context", "batch", "prefill s", "decode ms/token", "tok/s", "vs full"],
                           [[label(r), r["context"], r["batch"], f"{r['prefill_s']:.2f}", f"{r['decode_ms']:.2f}",
                             f"{r['tok_s']:.1f}", f"{r['decode_ms'] / full[r['context'], r['batch']]:.2f}x"
                             if (r["context"], r["batch"]) in full else "-"]
                            for r in sorted(plain, key=lambda r: (r["context"], r["batch"], r["method"] != "full",
                                                                   r["method"], budget_order(r["budget"])))]), ""]
    cells = [r for r in recs if r["benchmark"] == "speed"]
    if cells:
        r0 = cells[0]
        lines += [f"Device: {r0['env'].get('hardware', '-')}, {r0['dtype']}; bandwidth "
                  f"{r0['bandwidth_gbs']:.0f} GB/s (the floor: weights + the KV read once per step at that rate); "
                  f"torch.compile: {'on' if r0['compile'] else 'off'}. Contexts are random tokens (speed only). "
                  "HF plain loop: one forward per step through the method's cache (mean of consecutive steps, whole "
                  "cycles of atskv's evict_every). Fast "
                  "path: static slots, one CUDA graph per step variant (mean of consecutive steps, whole cycles of "
                  "atskv's evict_every). KV read: what the step's attention reads (the fast path reads every slot), "
                  "with the summaries of a passive tier; host read: what a step reads from host memory (ATSKV's "
                  "recalled entries from its pinned host tier), counted in the floor at the measured host-to-device "
                  "bandwidth" + (f" ({r0['host_bandwidth_gbs']:.0f} GB/s)." if r0.get("host_bandwidth_gbs") else ".")
                  + (" Prefill (1 row): the fast path timed alone, one context prefilled and its decoder's state "
                     "repeated to the batch." if any(r.get("prefill_rows", r["batch"]) < r["batch"] for r in cells)
                     else ""),
                  ""]
        def full_tok_s(path):   # the full cache's tokens/s per (context, batch) on one path
            return {(r["context"], r["batch"]): r["tok_s"] for r in cells if r["method"] == "full"
                    and r["path"] == path and not r.get("kernels_off")}
        ref, fast_full = full_tok_s("hf_plain"), full_tok_s("fast")
        header = ["method", "context", "batch", "path", "prefill s", "decode ms/step", "tok/s", "floor ms",
                  "x floor", "vs HF plain full", "vs fast full", "KV read MB", "host read MB", "peak GB"]
        rows = []
        order = {"hf_plain": 0, "fast": 1, "fast_bare": 2}
        for r in sorted(cells, key=lambda r: (r["context"], r["batch"], r["method"] != "full", r["method"],
                                               budget_order(r["budget"]), order[r["path"]])):
            k = (r["context"], r["batch"])
            one_row = r.get("prefill_rows", r["batch"]) < r["batch"]   # one context, its state repeated
            rows.append([label(r), r["context"], r["batch"], SPEED_PATHS[r["path"]],
                         f"{r['prefill_s']:.2f}" + (" (1 row)" if one_row else ""),
                         f"{r['decode_ms']:.2f}", f"{r['tok_s']:.0f}",
                         f"{r['floor_ms']:.2f}" if r.get("floor_ms") else "-",
                         f"{r['x_floor']:.1f}" if r.get("x_floor") else "-",
                         f"{r['tok_s'] / ref[k]:.1f}x" if k in ref else "-",
                         f"{r['tok_s'] / fast_full[k]:.2f}x" if k in fast_full else "-",
                         f"{r['kv_bytes_read'] / MB:.1f}",
                         f"{r['host_bytes_read'] / MB:.2f}" if r.get("host_bytes_read") else "-",
                         f"{r['decode_peak_bytes'] / 1e9:.2f}" if r.get("decode_peak_bytes") else "-"])
        write_csv(out_dir / "tables" / "speed.csv", header, rows)
        lines += [md_table(header, rows), ""]
        share = []
        by = {(label(r), r["context"], r["batch"], r["path"]): r for r in cells}   # the label holds the budget
        for (m, c, n, p), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[1]["method"])):
            bare = by.get((m, c, n, "fast_bare"))
            if p == "fast" and bare:
                vm = {**(r.get("variant_ms") or {}), **(bare.get("variant_ms") or {})}
                # with recall_every > 1 the steps between recalls are "keep/hold" (they attend the held entries)
                pairs = [f"{vm[m_v]:.2f} / {vm['bare_' + v]:.2f}" if m_v in vm and "bare_" + v in vm else "-"
                         for v in ("keep", "evict") for m_v in [v if v in vm else v + "/hold"]]
                share.append([label(r), c, n, f"{r['decode_ms']:.2f}", f"{bare['decode_ms']:.2f}",
                              f"{100 * (1 - bare['decode_ms'] / r['decode_ms']):.0f}%", *pairs])
        if share:
            lines += ["The method's per-step work (scoring, eviction) as a share of the fast step: the same slots "
                      "and step without it (the oldest entries are freed instead, on the method's schedule); for "
                      "atskv with evict_every, its steps that do not evict and those that do, each alone, with / "
                      "without scoring.", "",
                      md_table(["method", "context", "batch", "fast ms", "without scoring ms", "share",
                                "step without eviction ms", "evicting step ms"], share), ""]
        lines += [f"![decode speed]({speed_figure(cells, out_dir / 'figures')})", ""]
        by_context = speed_context_figure(cells, out_dir / "figures")
        if by_context:
            lines += [f"![decode speed against context]({by_context})", ""]
    mb = [r for r in recs if r["benchmark"] == "speed_max_batch"]
    if mb:
        lines += ["Largest decode batch that fits in the device's memory (the decode state and two steps; prefill "
                  "in micro-batches is not counted; a host tier may take 60% of the machine's memory: host-bound "
                  "marks a batch that it limits):", "",
                  md_table(["method", "context", "largest batch", "KV per sequence MB", "other device MB per sequence",
                            "host MB per sequence", "device GB"],
                           [[label(r), r["context"], f"{r['max_batch']}{'+' if r['limit_reached'] else ''}"
                             + (" (host-bound)" if r.get("host_bound") else ""),
                             f"{r['kv_bytes_per_sequence'] / MB:.1f}",
                             f"{r.get('extra_device_bytes_per_sequence', 0) / MB:.1f}",
                             f"{r.get('host_bytes_per_sequence', 0) / MB:.1f}",
                             f"{r['device_memory_bytes'] / 1e9:.0f}" if r.get("device_memory_bytes") else "-"]
                            for r in sorted(mb, key=lambda r: (r["method"] != "full", label(r)))]), ""]
    prof = [r for r in recs if r["benchmark"] == "speed_profile"]
    if prof:
        rows = [[label(r), r["context"], r["batch"], r["variant"], f"{r['per_step']:.0f}", f"{r['ms_per_step']:.2f}",
                 "; ".join(f"{t['name'][:48]} {t['ms_per_step']:.3f} ms x{t['per_step']:.0f}" for t in r["top"][:3])]
                for r in sorted(prof, key=lambda r: (r["context"], r["batch"], label(r), r["variant"]))]
        lines += [f"Profile of one fast step ({prof[0]['unit']}; run eagerly: a replayed graph hides its kernels):",
                  "", md_table(["method", "context", "batch", "step", "per step", "ms per step", "largest three"],
                               rows), ""]
    ans = [r for r in recs if r["benchmark"] == "speed_answers"]
    if ans:
        lines += ["Answers of the fast path against the plain loop on the synthetic benchmark (same prompts and "
                  "prefill; greedy):", "",
                  md_table(["method", "task", "context", "dtype", "compiled", "samples", "identical answers",
                            "score plain", "score fast"],
                           [[label(r), r["task"], r["context"], r["dtype"], {True: "yes", False: "no"}.get(
                               r.get("compile"), "-"), r["n"], r["same"],
                             f"{r['score_plain']:.0f}", f"{r['score_fast']:.0f}"] for r in ans]), ""]
    return lines


def speed_figure(cells: list[dict], fig_dir: Path) -> str:
    """Decode ms per step against batch, one panel per context: solid = fast path, dotted = HF plain loop, thin
    dashed = the memory floor of the fast path."""
    return speed_panels(cells, "context", "batch", fig_dir / "speed_decode.png")


def speed_context_figure(cells: list[dict], fig_dir: Path) -> str | None:
    """Fast-path decode ms per step against context, one panel per batch timed at two contexts or more (thin
    dashed: the memory floor). None when no batch has two contexts."""
    fast = [r for r in cells if r["path"] == "fast"]
    several = {n for n in {r["batch"] for r in fast} if len({r["context"] for r in fast if r["batch"] == n}) > 1}
    if not several:
        return None
    return speed_panels([r for r in fast if r["batch"] in several], "batch", "context",
                        fig_dir / "speed_decode_context.png")


def speed_panels(cells: list[dict], panel: str, x: str, path: Path) -> str:
    """Decode ms per step against `x` (batch or context, log 2), one panel per value of `panel`, a line per method
    and path (solid fast path, dotted HF plain loop) and the fast path's memory floor thin dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({r[panel] for r in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    labels = sorted({label(r) for r in cells})
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    style = {"hf_plain": ":", "fast": "-", "fast_bare": "-."}
    for ax, p in zip(axes[0], panels):
        for lab in labels:
            for way in ("hf_plain", "fast", "fast_bare"):
                rs = sorted((r for r in cells if r[panel] == p and label(r) == lab and r["path"] == way),
                            key=lambda r: r[x])
                if not rs:
                    continue
                ax.plot([r[x] for r in rs], [r["decode_ms"] for r in rs], style[way], marker="o",
                        color=colors[lab], label=f"{lab}, {SPEED_PATHS[way]}")
                if way == "fast" and all(r.get("floor_ms") for r in rs):
                    ax.plot([r[x] for r in rs], [r["floor_ms"] for r in rs], "--", lw=0.8,
                            color=colors[lab], alpha=0.6, label=f"{lab}, memory floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel({"batch": "batch size", "context": "context (tokens)"}[x])
        ax.set_ylabel("decode ms per step")
        ax.set_title(f"{panel} {p}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    save_fig(fig, path)
    plt.close(fig)
    return f"figures/{path.name}"


if __name__ == "__main__":
    import argparse
    import sys
    ap = argparse.ArgumentParser(description="Rebuild results.md from results.jsonl, or print the README's "
                                 "results at a glance")
    ap.add_argument("dirs", nargs="+", help="results folders (each with a results.jsonl)")
    ap.add_argument("--glance", action="store_true", help="print the README's block for these folders")
    a = ap.parse_args()
    if a.glance:
        sys.stdout.write(glance(a.dirs))
    else:
        for d in a.dirs:
            build_report(d, command=f"python report.py {d}")
