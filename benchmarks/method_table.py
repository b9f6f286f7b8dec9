"""Render the "method x data" table of docs/choosing-a-method.md from the report's raw
numbers, so the guide quotes the latest run of benchmarks/report.py and nothing by hand.

Run:  .venv/bin/python benchmarks/method_table.py   (after benchmarks/report.py)
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("fourier", "features", "intensity", "auto")


def _num(x: float) -> str:
    if x < 1e-4:
        return "<1e-4"
    return f"{x:.1e}" if x < 0.01 else f"{x:.3g}"


def render(report: dict) -> str:
    by = {(r["case"], r["method"]): r for r in report["summary"]}
    threshold = report["threshold"]
    lines = [
        f"**Method x data**: `{report['command']}` ({report['repeats']} interleaved repeats, run "
        f"{report['started']}; the [accuracy and speed report](benchmarks.md#accuracy-and-speed-report) "
        "describes every case and lists the peers). Each cell: median mean TRE (pixels in 2D, "
        "mm in 3D) and median time, with each method's defaults; *fail* = an error or a mean "
        f"TRE above {threshold:g} units (the TRE in brackets); — = the method does not offer "
        "that transform (or was not run on that case). Rendered by "
        "`.venv/bin/python benchmarks/method_table.py`.",
        "",
        "| case | " + " | ".join(f"`{m}`" for m in OURS) + " |",
        "|---|" + "---|" * len(OURS),
    ]
    for case in report["cases"]:
        cells = []
        for m in OURS:
            r = by.get((case["name"], f"ours: {m}"))
            if r is None or r.get("n", 0) == 0:
                cells.append("—")
            elif r["failures"] >= r["n"]:
                cells.append("fail" + (f" ({_num(r['tre_mean'])})" if r.get("tre_mean") is not None else ""))
            else:
                extra = f" ({r['failures']}/{r['n']} failed)" if r["failures"] else ""
                cells.append(f"{_num(r['tre_mean'])}, {r['seconds']:.3g} s{extra}")
        lines.append(f"| {case['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    report = json.loads((ROOT / "benchmarks" / "results" / "report.json").read_text())
    page = ROOT / "docs" / "choosing-a-method.md"
    text = page.read_text()
    begin, end = "<!-- BEGIN method-table -->", "<!-- END method-table -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{render(report)}\n{end}{tail}")
    print(render(report))


if __name__ == "__main__":
    main()
