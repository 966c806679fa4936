#!/usr/bin/env python3
"""Plots fleet-sim reports: submit -> every result journaled against the
number of agents, as an SVG drawn by hand (Python standard library only),
and prints the memory table BENCHMARKS.md shows.

    python3 tests/plot.py OUT.svg REPORT.json...

Each REPORT.json is what `fleet-sim --json-out` wrote for one N.
"""

import json
import math
import sys

W, H = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 40, 40, 60


def log_scale(lo, hi, size, start):
    """Maps [lo, hi] (positive) onto [start, start + size] on a log scale."""
    a, b = math.log10(lo), math.log10(hi)
    return lambda v: start + (math.log10(v) - a) / (b - a) * size


def decades(lo, hi):
    d = math.floor(math.log10(lo))
    while 10 ** d <= hi * 1.0001:
        yield 10 ** d
        d += 1


def label(v, unit=""):
    if v >= 1000 and unit == "ms":
        return f"{v / 1000:g} s"
    return f"{v:g}{(' ' + unit) if unit else ''}"


def plot(reports, out):
    points = sorted(
        (r["agents"], r["parallel_all_ms"]["median"]) for r in reports
    )
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x_lo, x_hi = 10 ** math.floor(math.log10(min(xs))), 10 ** math.ceil(math.log10(max(xs)))
    y_lo = 10 ** math.floor(math.log10(min(ys)))
    y_hi = 10 ** math.ceil(math.log10(max(max(ys), 10000)))
    fx = log_scale(x_lo, x_hi, W - LEFT - RIGHT, LEFT)
    fy_up = log_scale(y_lo, y_hi, H - TOP - BOTTOM, 0)
    fy = lambda v: H - BOTTOM - fy_up(v)  # noqa: E731
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">'
        "parallel no-op: submit → every result journaled (median)</text>",
    ]
    for v in decades(x_lo, x_hi):
        x = fx(v)
        svg.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" stroke="#ddd"/>')
        svg.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 18}" text-anchor="middle">{v:,}</text>')
    for v in decades(y_lo, y_hi):
        y = fy(v)
        svg.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label(v, "ms")}</text>')
    # The targets: 1,000 agents under 1 s, 10,000 under 10 s.
    for n, limit in ((1000, 1000), (10000, 10000)):
        if x_lo <= n <= x_hi:
            x, y = fx(n), fy(limit)
            svg.append(
                f'<line x1="{x - 12:.1f}" y1="{y:.1f}" x2="{x + 12:.1f}" y2="{y:.1f}" '
                'stroke="#c33" stroke-width="2"/>'
            )
            svg.append(
                f'<text x="{x - 14:.1f}" y="{y - 6:.1f}" text-anchor="end" fill="#c33">'
                f"target at {n:,}</text>"
            )
    path = " ".join(f"{'M' if i == 0 else 'L'}{fx(x):.1f},{fy(y):.1f}" for i, (x, y) in enumerate(points))
    svg.append(f'<path d="{path}" fill="none" stroke="#26c" stroke-width="2"/>')
    for x, y in points:
        svg.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="4" fill="#26c"/>')
        text = f"{y / 1000:.2f} s" if y >= 1000 else f"{y:.1f} ms"
        # Right of the point, or left of it near the right edge.
        near_edge = fx(x) > W - RIGHT - 60
        svg.append(
            f'<text x="{fx(x) + (-8 if near_edge else 8):.1f}" y="{fy(y) + 16:.1f}" '
            f'text-anchor="{"end" if near_edge else "start"}" fill="#26c">{text}</text>'
        )
    svg.append(
        f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 15}" text-anchor="middle">'
        "agents connected (all targeted), log scale</text>"
    )
    svg.append(
        f'<text transform="translate(16,{(TOP + H - BOTTOM) / 2}) rotate(-90)" '
        'text-anchor="middle">ms, log scale</text>'
    )
    svg.append("</svg>")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(svg) + "\n")


def table(reports):
    print("| N agents | controller RSS idle (MiB) | controller CPU idle | connection storm (s) | "
          "parallel no-op, median (ms) | rolling 10% (ms) | restart → all back (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(reports, key=lambda r: r["agents"]):
        restart = r.get("restart") or {}
        back = restart.get("all_reconnected_s")
        print(
            f"| {r['agents']:,} | {r['controller_idle']['rss_kib'] / 1024:.0f} | "
            f"{r['controller_idle']['cpu_percent']:.1f} % | {r['connection_storm_s']:.2f} | "
            f"{r['parallel_all_ms']['median']:.1f} | {r['rolling_10pct_ms']:.1f} | "
            f"{'%.2f' % back if back is not None else '-'} |"
        )


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    reports = []
    for path in sys.argv[2:]:
        with open(path, encoding="utf-8") as f:
            reports.append(json.load(f))
    plot(reports, sys.argv[1])
    table(reports)


if __name__ == "__main__":
    main()
