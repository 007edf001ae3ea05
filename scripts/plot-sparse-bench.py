#!/usr/bin/env python3
"""Plots decode speed against sparsity from scripts/sparse-bench.sh results (JSON lines) as a
small self-contained SVG (no plotting library needed).

    scripts/plot-sparse-bench.py RESULTS.jsonl OUT.svg [TITLE]
"""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = sys.argv[2]
title = sys.argv[3] if len(sys.argv) > 3 else "decode tokens/s vs FFN sparsity"
series = {}
for r in rows:
    series.setdefault(r["engine"], []).append((r["sparsity"], r["result"]["tg_tok_s"]))
colors = {"powerinfer-sparse": "#d62728", "powerinfer-dense": "#1f77b4", "llama.cpp-dense": "#7f7f7f"}
W, H, L, R, T, B = 560, 340, 60, 170, 40, 50
xs = sorted({s for pts in series.values() for s, _ in pts})
x0, x1 = min(xs) - 0.05, max(xs) + 0.05
ymax = max(v for pts in series.values() for _, v in pts) * 1.15
px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
py = lambda y: H - B - y / ymax * (H - T - B)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W / 2 - R / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
       f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
       f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>']
for x in xs:
    svg.append(f'<text x="{px(x):.1f}" y="{H - B + 18}" text-anchor="middle">{x:.0%}</text>')
steps = 5
for i in range(steps + 1):
    y = ymax * i / steps
    svg.append(f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.1f}</text>')
    svg.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#ddd"/>')
svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">FFN sparsity (predicted inactive neurons)</text>')
svg.append(f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 {(T + H - B) / 2})">tokens/s</text>')
for k, (name, pts) in enumerate(sorted(series.items())):
    pts.sort()
    c = colors.get(name, "#2ca02c")
    path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
    svg.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
    for x, y in pts:
        svg.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>')
    ly = T + 10 + 20 * k
    svg.append(f'<line x1="{W - R + 10}" y1="{ly}" x2="{W - R + 30}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
    svg.append(f'<text x="{W - R + 36}" y="{ly + 4}">{name}</text>')
svg.append("</svg>")
open(out, "w").write("\n".join(svg) + "\n")
