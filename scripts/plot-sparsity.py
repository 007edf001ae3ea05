#!/usr/bin/env python3
"""Plots perplexity change against FFN sparsity from scripts/sparsity-experiment.sh results
(JSON lines, one file per model) as a small self-contained SVG (no plotting library needed).

    scripts/plot-sparsity.py OUT.svg NAME=RESULTS.jsonl [NAME=RESULTS.jsonl ...]

One line per model and mode: `threshold` (no predictor; the down projection skips neurons under
the activity threshold) and `predicted` (trained predictors, recall 0.99, then the threshold).
"""
import json
import sys

out = sys.argv[1]
series = {}
for arg in sys.argv[2:]:
    name, path = arg.split("=", 1)
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        for mode, key in (("threshold", "thr_ppl"), ("predicted", "pred_ppl")):
            change = 100.0 * (r[key] / r["dense_ppl"] - 1.0)
            series.setdefault(f"{name} {mode}", []).append((r["sparsity"], change))

palette = ["#d62728", "#ff9896", "#1f77b4", "#aec7e8", "#2ca02c", "#98df8a"]
W, H, L, R, T, B = 600, 360, 60, 200, 40, 50
xs = sorted({s for pts in series.values() for s, _ in pts})
x0, x1 = min(xs) - 0.05, max(xs) + 0.05
ymax = max(max(v for pts in series.values() for _, v in pts) * 1.1, 4.0)
ymin = min(0.0, min(v for pts in series.values() for _, v in pts))
px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
py = lambda y: H - B - (y - ymin) / (ymax - ymin) * (H - T - B)
svg = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
    f'<rect width="{W}" height="{H}" fill="white"/>',
    f'<text x="{(L + W - R) / 2}" y="20" text-anchor="middle" font-size="14">perplexity change vs FFN sparsity (austen-pp-100k)</text>',
    f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
    f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
    # the 3% target
    f'<line x1="{L}" y1="{py(3.0):.1f}" x2="{W - R}" y2="{py(3.0):.1f}" stroke="#888" stroke-dasharray="4 3"/>',
    f'<text x="{W - R - 4}" y="{py(3.0) - 4:.1f}" text-anchor="end" fill="#666">+3%</text>',
]
for x in xs:
    svg.append(f'<text x="{px(x):.1f}" y="{H - B + 18}" text-anchor="middle">{x:.0%}</text>')
steps = 5
for i in range(steps + 1):
    y = ymin + (ymax - ymin) * i / steps
    svg.append(f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:+.0f}%</text>')
    svg.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#eee"/>')
svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">target FFN sparsity</text>')
for k, (name, pts) in enumerate(sorted(series.items())):
    pts.sort()
    c = palette[k % len(palette)]
    path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
    svg.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
    for x, y in pts:
        svg.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>')
    ly = T + 10 + 20 * k
    svg.append(f'<line x1="{W - R + 15}" y1="{ly}" x2="{W - R + 35}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
    svg.append(f'<text x="{W - R + 40}" y="{ly + 4}">{name}</text>')
svg.append("</svg>")
open(out, "w").write("\n".join(svg) + "\n")
