"""The sweep's results: a table (markdown and CSV) and a storage-vs-accuracy plot (the shape of the
SeiT++ paper's Figure 1: top-1 against bytes on the store, one line per method, the full-pixel
reference as the 100% mark). With a search space: one column per searched key, the best setting per
budget and recipe, and top-1 against each searched key (results-space.png)."""

from __future__ import annotations

import csv
import io
import os

COLUMNS = ["budget", "store_bytes", "pct_jpeg", "method", "protocol", "steps", "samples", "top1", "top1_gaussian_noise",
           "top1_gaussian_blur", "epochs"]
FULL = "pixels-full"  # the full-pixel reference's method


def result_rows(trials: list[dict], protocol: str = "") -> list[dict]:
    rows = []
    for t in trials:
        method = t.get("method") or (t["recipe"] if t["kind"] == "tokens" else f"pixels {t['size']}px q{t['quality']}")
        rows.append({"budget": t["budget"], "store_bytes": t.get("store_bytes"), "pct_jpeg": t.get("pct_jpeg"),
                     "jpeg_bytes": t.get("jpeg_bytes"), "method": method, "protocol": protocol, "steps": t.get("step"),
                     "samples": t.get("samples"), "top1": t.get("val_top1"),
                     "top1_gaussian_noise": t.get("top1_gaussian_noise"),
                     "top1_gaussian_blur": t.get("top1_gaussian_blur"), "epochs": t.get("epoch"),
                     "kind": t["kind"], "error": t.get("error"), **(t.get("space") or {})})
    return sorted(rows, key=lambda r: (-(r["store_bytes"] or 0), r["kind"], r["method"], -(r["top1"] or 0)))


def space_keys(trials: list[dict]) -> list[str]:
    """The searched keys, in the order the space names them."""
    keys = []
    for t in trials:
        keys += [k for k in t.get("space") or {} if k not in keys]
    return keys


def _fmt(v, col: str) -> str:
    if v is None:
        return "-"
    if col == "store_bytes":
        return f"{int(v):,}"
    if isinstance(v, float):  # (a searched lr keeps its digits)
        return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.3g}"
    return str(v)


def _md_table(cols: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"


def markdown(rows: list[dict], keys: list[str] = ()) -> str:
    cols = COLUMNS + list(keys)
    cells = []
    for r in rows:
        cells.append([_fmt(r.get(c), c) for c in cols])
        if r.get("error"):
            cells[-1][cols.index("top1")] = "failed"
    return _md_table(cols, cells)


def _best(rows: list[dict], budget: str, kind: str = "tokens", method: str | None = None) -> dict | None:
    """The highest top-1 row of a budget (a method's: a search has many samples of it)."""
    got = [r for r in rows if r["budget"] == budget and r["kind"] == kind and r["top1"] is not None
           and (method is None or r["method"] == method) and r["method"] != FULL]
    return max(got, key=lambda r: r["top1"], default=None)


def full_reference(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["method"] == FULL and r["top1"] is not None), None)


def by_budget(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """One row per budget: top-1 of each token recipe (its best sample), the bytes-matched pixel baseline,
    the best recipe's lead over it and its share of the full-pixel reference's top-1: the "does a byte of
    tokens beat a byte of pixels, and how close do tokens get to pixels" view of the same results."""
    recipes = sorted({r["method"] for r in rows if r["kind"] == "tokens"})
    full = full_reference(rows)
    table = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        row = {"budget": budget}
        for m in recipes:
            b = _best(rows, budget, method=m)
            row[m] = b["top1"] if b else None
        best, pix = _best(rows, budget), _best(rows, budget, kind="pixels")
        if pix is not None:
            row["pixels"] = f"{pix['top1']:.2f} ({pix['method'].replace('pixels ', '')})"
            if best is not None:
                row["best tokens - pixels"] = f"{best['top1'] - pix['top1']:+.2f}"
        if full is not None and best is not None:
            row["best tokens / full pixels"] = f"{100 * best['top1'] / full['top1']:.1f}%"
        if len(row) > 1:
            table.append(row)
    cols = ["budget", *recipes, "pixels", "best tokens - pixels"] + (["best tokens / full pixels"] if full else [])
    return cols, table


def pivot_markdown(rows: list[dict]) -> str:
    cols, table = by_budget(rows)
    return _md_table(cols, [[_fmt(row.get(c), c) for c in cols] for row in table])


def reference_line(rows: list[dict]) -> str:
    """The full-pixel reference in one line, its bytes both as the JPEG files and as the compact store."""
    full = full_reference(rows)
    if full is None:
        return ""
    files = f"{int(full['jpeg_bytes']):,} bytes as the JPEG files, " if full.get("jpeg_bytes") else ""
    return (f"Full-pixel reference ({FULL}: the {full['samples']} training images as JPEGs at their own size, the "
            f"same pixel ViT and protocol): top-1 {full['top1']:.2f}% on {files}{int(full['store_bytes']):,} bytes as the compact "
            f"pixel store.\n")


def best_settings(rows: list[dict], keys: list[str]) -> str:
    """The best sample per budget and recipe of a search: its top-1 and settings."""
    cols = ["budget", "method", "samples searched", "top1", *keys]
    cells = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        for m in sorted({r["method"] for r in rows if r["budget"] == budget and r["kind"] == "tokens"}):
            best = _best(rows, budget, method=m)
            n = sum(1 for r in rows if r["budget"] == budget and r["method"] == m)
            if best is not None:
                cells.append([budget, m, str(n), _fmt(best["top1"], "top1"), *(_fmt(best.get(k), k) for k in keys)])
    return _md_table(cols, cells)


def csv_text(rows: list[dict], keys: list[str] = ()) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS + ["jpeg_bytes", *keys, "error"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[dict], path: str, title: str = "storage vs top-1") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in rows if r["top1"] is not None and r["kind"] == "tokens"})
    for m in methods:  # a searched recipe: its best sample per budget
        best = [_best(rows, b, method=m) for b in dict.fromkeys(r["budget"] for r in rows)]
        pts = sorted((r["store_bytes"], r["top1"]) for r in best if r is not None)
        ax.plot(*zip(*pts), marker="o", label=m)
    pix = sorted((r["store_bytes"], r["top1"], r["method"]) for r in rows
                 if r["kind"] == "pixels" and r["top1"] is not None and r["method"] != FULL)
    if pix:
        ax.plot([p[0] for p in pix], [p[1] for p in pix], marker="s", linestyle="--", color="gray",
                label="pixels (JPEG, downsampled, bytes-matched)")
        for x, y, m in pix:
            ax.annotate(m.replace("pixels ", ""), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    full = full_reference(rows)
    if full is not None:
        ax.axhline(full["top1"], color="black", linewidth=0.8, linestyle=":")
        ax.plot([full["store_bytes"]], [full["top1"]], marker="*", markersize=12, color="black",
                linestyle="none", label=f"{FULL} (32px JPEG, the 100% reference)")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on the store (training set, manifest included)")
    ax.set_ylabel("top-1 on the validation split (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_space(rows: list[dict], keys: list[str], path: str, title: str = "top-1 against each searched setting") -> None:
    """One panel per searched key: every sample's top-1 against its value, one colour per budget and recipe
    (numbers on a numeric axis, other values as categories)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    searched = [r for r in rows if r["kind"] == "tokens" and r["top1"] is not None and any(k in r for k in keys)]
    groups = list(dict.fromkeys((r["budget"], r["method"]) for r in searched))
    for ax, key in zip(axes[0], keys):
        values = [r.get(key) for r in searched]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        cats = sorted({str(v) for v in values})
        for budget, method in groups:
            pts = [(r.get(key), r["top1"]) for r in searched if (r["budget"], r["method"]) == (budget, method)]
            xs = [v if numeric else cats.index(str(v)) for v, _ in pts]
            ax.scatter(xs, [y for _, y in pts], label=f"{budget} {method}", s=24)
        if not numeric:
            ax.set_xticks(range(len(cats)), cats, fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel("top-1 (%)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def write_results(trials: list[dict], out_dir: str, title: str = "storage vs top-1", protocol: str = "",
                  command: str = "") -> dict:
    """results.md, results.csv and results.png in ``out_dir`` (each written atomically); with searched
    settings also the best setting per budget (in results.md) and results-space.png. results.md starts with
    the title and the command that made it."""
    os.makedirs(out_dir, exist_ok=True)
    rows = result_rows(trials, protocol)
    keys = space_keys(trials)
    paths = {"md": os.path.join(out_dir, "results.md"), "csv": os.path.join(out_dir, "results.csv"),
             "png": os.path.join(out_dir, "results.png")}
    head = f"# {title}\n\n" + (f"Made by `{command}`.\n\n" if command else "")
    md = f"{head}{markdown(rows, keys)}\n{reference_line(rows)}\nTop-1 by budget:\n\n{pivot_markdown(rows)}"
    if keys:
        md += f"\nBest setting per budget:\n\n{best_settings(rows, keys)}"
    for key, text in (("md", md), ("csv", csv_text(rows, keys))):
        tmp = f"{paths[key]}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, paths[key])
    plot(rows, paths["png"], title)
    if keys:
        paths["space_png"] = os.path.join(out_dir, "results-space.png")
        plot_space(rows, keys, paths["space_png"])
    return {"rows": rows, **paths}
