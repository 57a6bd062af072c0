"""The sweep's results: a table (markdown and CSV) and a storage-vs-accuracy plot (the shape of the
SeiT++ paper's Figure 1: top-1 against bytes on the store, one line per method)."""

from __future__ import annotations

import csv
import io
import os

COLUMNS = ["budget", "store_bytes", "pct_jpeg", "method", "samples", "top1", "top1_gaussian_noise",
           "top1_gaussian_blur", "epochs"]


def result_rows(trials: list[dict]) -> list[dict]:
    rows = []
    for t in trials:
        method = t["recipe"] if t["kind"] == "tokens" else f"pixels {t['size']}px q{t['quality']}"
        rows.append({"budget": t["budget"], "store_bytes": t.get("store_bytes"), "pct_jpeg": t.get("pct_jpeg"),
                     "method": method, "samples": t.get("samples"), "top1": t.get("val_top1"),
                     "top1_gaussian_noise": t.get("top1_gaussian_noise"),
                     "top1_gaussian_blur": t.get("top1_gaussian_blur"), "epochs": t.get("epoch"),
                     "kind": t["kind"], "error": t.get("error")})
    return sorted(rows, key=lambda r: (-(r["store_bytes"] or 0), r["kind"], r["method"]))


def _fmt(v, col: str) -> str:
    if v is None:
        return "-"
    if col == "store_bytes":
        return f"{int(v):,}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _md_table(cols: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"


def markdown(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        cells.append([_fmt(r.get(c), c) for c in COLUMNS])
        if r.get("error"):
            cells[-1][COLUMNS.index("top1")] = "failed"
    return _md_table(COLUMNS, cells)


def by_budget(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """One row per budget: top-1 of each token recipe, the pixel baseline, and the best recipe's lead
    over it: the "does a byte of tokens beat a byte of pixels" view of the same results."""
    recipes = sorted({r["method"] for r in rows if r["kind"] == "tokens"})
    table = {}
    for r in rows:
        if r["top1"] is None:
            continue
        row = table.setdefault(r["budget"], {"budget": r["budget"]})
        if r["kind"] == "tokens":
            row[r["method"]] = r["top1"]
            continue
        row["pixels"] = f"{r['top1']:.2f} ({r['method'].replace('pixels ', '')})"
        best = max((x["top1"] for x in rows if x["budget"] == r["budget"] and x["kind"] == "tokens"
                    and x["top1"] is not None), default=None)
        if best is not None:
            row["best tokens - pixels"] = f"{best - r['top1']:+.2f}"
    return ["budget", *recipes, "pixels", "best tokens - pixels"], list(table.values())


def pivot_markdown(rows: list[dict]) -> str:
    cols, table = by_budget(rows)
    return _md_table(cols, [[_fmt(row.get(c), c) for c in cols] for row in table])


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS + ["error"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def plot(rows: list[dict], path: str, title: str = "storage vs top-1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in rows if r["top1"] is not None and r["kind"] == "tokens"})
    for m in methods:
        pts = sorted((r["store_bytes"], r["top1"]) for r in rows if r["method"] == m and r["top1"] is not None)
        ax.plot(*zip(*pts), marker="o", label=m)
    pix = sorted((r["store_bytes"], r["top1"], r["method"]) for r in rows if r["kind"] == "pixels" and r["top1"] is not None)
    if pix:
        ax.plot([p[0] for p in pix], [p[1] for p in pix], marker="s", linestyle="--", color="gray",
                label="pixels (JPEG, downsampled)")
        for x, y, m in pix:
            ax.annotate(m.replace("pixels ", ""), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("bytes on the store (training set, manifest included)")
    ax.set_ylabel("top-1 on the validation split (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(trials: list[dict], out_dir: str, title: str = "storage vs top-1") -> dict:
    """results.md, results.csv and results.png in ``out_dir`` (each written atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    rows = result_rows(trials)
    paths = {"md": os.path.join(out_dir, "results.md"), "csv": os.path.join(out_dir, "results.csv"),
             "png": os.path.join(out_dir, "results.png")}
    md = f"{markdown(rows)}\nTop-1 by budget:\n\n{pivot_markdown(rows)}"
    for key, text in (("md", md), ("csv", csv_text(rows))):
        tmp = f"{paths[key]}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, paths[key])
    plot(rows, paths["png"], title)
    return {"rows": rows, **paths}
