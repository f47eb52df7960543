"""Several models in one ``csc bench`` run: each model's report, then their times side by side.

Every model runs the same cases (backends, calls, batch sizes, image sizes, the same seeded inputs) one after
the other in one process, so the figures share the machine, the thread count and the library versions. The
comparison lists, for each case every model ran, the median latency of each model and its ratio to the first
model's, with the convolution FLOPs per pixel the config counts.
"""

from __future__ import annotations

from typing import Any


def compare_reports(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (backend, call, batch, size) that every report holds, in the first report's order."""
    keyed = [{(r["backend"], r["call"], r["batch"], r["size"]): r for r in report["results"]} for report in reports]
    rows = []
    for key, first in keyed[0].items():
        if not all(key in table for table in keyed[1:]):
            continue
        backend, call, batch, size = key
        rows.append({
            "backend": backend, "call": call, "batch": batch, "size": size,
            "models": [{"model": report["model"]["source"], "median_s": table[key]["median_s"],
                        "ratio_to_first": table[key]["median_s"] / first["median_s"],
                        "flops_per_pixel": table[key]["flops_per_pixel"], "psnr_db": table[key].get("psnr_db")}
                       for report, table in zip(reports, keyed)],
        })
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no case was run by every model"
    names = [m["model"] for m in rows[0]["models"]]
    lines = ["models: " + ", ".join(f"[{i}] {name}" for i, name in enumerate(names))]
    head = f"{'backend':<20} {'call':<12} {'batch':>5} {'size':>5} " + " ".join(
        f"{f'[{i}] ms':>10} {'kFLOP/px':>9} {'x [0]':>6}" for i in range(len(names)))
    lines += [head, "-" * len(head)]
    for row in rows:
        cells = " ".join(f"{1e3 * m['median_s']:>10.1f} {m['flops_per_pixel'] / 1e3:>9.1f} {m['ratio_to_first']:>6.2f}"
                         for m in row["models"])
        lines.append(f"{row['backend']:<20} {row['call']:<12} {row['batch']:>5} {row['size']:>5} {cells}")
    return "\n".join(lines)
