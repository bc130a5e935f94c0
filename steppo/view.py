"""``steppo view RUN``: one static HTML page of a run, step by step.

From a run directory's ``samples.jsonl`` (see `steppo.trainer.tracking.sample_records`) and
``metrics.jsonl``: per iteration, each sampled trajectory as a table of its steps (the new
tokens of the step's context, the response, the environment's observation, reward, the
critic's value, the advantage, the step's importance ratio in the update and whether it lay
outside the clip range), charts of the value and the advantage by step index (the mean over
the sampled trajectories, per iteration or for one chosen iteration) and the held-out success
curve. The page is self-contained (inline CSS and SVG, no script, nothing fetched) and every
text from the run is escaped. Standard library only: no torch, no transformers.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from steppo.paths import read_jsonl

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _fmt(v: Any, digits: int = 3) -> str:
    x = _num(v)
    return "–" if x is None else f"{x:.{digits}f}"


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


# ----------------------------------------------------------------------------- charts (inline SVG)


def line_chart(title: str, series: list[tuple[str, str, list[tuple[float, float]]]], xlabel: str, ylabel: str,
               width: int = 640, height: int = 260, legend: bool = True,
               ylim: tuple[float, float] | None = None) -> str:
    """An inline SVG line chart; `series`: (label, colour, [(x, y), ...]) each; `ylim`: a y
    range the axis always covers (widened to fit the data)."""
    pts = [p for _, _, ps in series for p in ps]
    left, right, top, bottom = 56, 130 if legend else 16, 28, 44  # the legend sits right of the plot
    w, h = width - left - right, height - top - bottom
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" class="ct">{_esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fff" stroke="#bbb"/>']
    if not pts:
        parts.append(f'<text x="{left + w / 2}" y="{top + h / 2}" text-anchor="middle" class="ax">no data</text></svg>')
        return "".join(parts)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if ylim is not None:
        y0, y1 = min(y0, ylim[0]), max(y1, ylim[1])
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.0 if ylim is not None else 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * h

    for k in range(5):  # y grid and labels
        y = y0 + (y1 - y0) * k / 4
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" class="ax">{y:.2f}</text>')
    if y0 < 0 < y1:
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" stroke="#999" '
                     'stroke-dasharray="3,3"/>')
    xs = sorted({p[0] for p in pts})
    stride = max(1, math.ceil(len(xs) / 10))
    for x in xs[::stride]:
        parts.append(f'<text x="{sx(x):.1f}" y="{top + h + 16}" text-anchor="middle" class="ax">{x:g}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle" class="ax">{_esc(xlabel)}</text>'
                 f'<text x="12" y="{top + h / 2}" text-anchor="middle" class="ax" '
                 f'transform="rotate(-90 12 {top + h / 2})">{_esc(ylabel)}</text>')
    for label, colour, ps in series:
        ps = sorted(ps)
        if not ps:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ps)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{path}">'
                     f'<title>{_esc(label)}</title></polyline>')
        for x, y in ps:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}">'
                         f'<title>{_esc(label)}: {x:g}, {y:.3f}</title></circle>')
    if legend:
        shown = series if len(series) <= 6 else [series[0], series[-1]]
        for k, (label, colour, _) in enumerate(shown):
            y = top + 12 + 14 * k
            parts.append(f'<rect x="{left + w + 8}" y="{y - 8}" width="10" height="10" fill="{colour}"/>'
                         f'<text x="{left + w + 22}" y="{y + 1}" class="lg">{_esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _shade(k: int, n: int) -> str:
    """Early iterations light, late ones dark (one blue line per iteration)."""
    t = k / max(n - 1, 1)
    return f"rgb({int(170 - 150 * t)},{int(200 - 150 * t)},{int(240 - 90 * t)})"


def by_step_index(records: list[dict[str, Any]], key: str) -> dict[int, list[tuple[float, float]]]:
    """Per iteration, (step index, mean of `key` over the sampled trajectories having that step)."""
    acc: dict[int, dict[int, list[float]]] = {}
    for r in records:
        for k, step in enumerate(r.get("steps", [])):
            v = _num(step.get(key))
            if v is not None:
                acc.setdefault(int(r.get("iteration", 0)), {}).setdefault(k, []).append(v)
    return {it: [(float(k), sum(v) / len(v)) for k, v in sorted(steps.items())] for it, steps in sorted(acc.items())}


def _step_charts(records: list[dict[str, Any]], iteration: int | None) -> str:
    out = []
    for key, name in (("value", "value"), ("advantage", "advantage")):
        curves = by_step_index(records, key)
        if iteration is not None:
            series = [(f"iteration {iteration}", PALETTE[0], curves.get(iteration, []))]
        else:
            its = list(curves)
            series = [(f"iteration {it}", _shade(k, len(its)), curves[it]) for k, it in enumerate(its)]
        which = f"iteration {iteration}" if iteration is not None else "one line per iteration, light = early"
        out.append(line_chart(f"mean {name} by step index ({which})", series, "step index", name))
    return "".join(out)


def _success_chart(metrics: list[dict[str, Any]]) -> str:
    series = []
    for k, (key, label) in enumerate((("eval/success", "held-out, greedy"), ("eval_sampled/success", "held-out, sampled"),
                                      ("train/success", "training episodes"))):
        ps = [(float(m["iteration"]), _num(m.get(key))) for m in metrics if _num(m.get("iteration")) is not None]
        ps = [(x, y) for x, y in ps if y is not None]
        if ps:
            series.append((label, PALETTE[k], ps))
    return line_chart("success by iteration", series, "iteration", "success", ylim=(0.0, 1.0))


# ----------------------------------------------------------------------------- tables


def _context_cell(step: dict[str, Any]) -> str:
    if step.get("full_prompt", "prompt_text" in step):
        text, tag = step.get("prompt_text", step.get("new_text", "")), "full prompt"
    else:
        text, tag = step.get("new_text", ""), "new tokens"
    return f'<span class="tag">{tag}</span><pre>{_esc(text)}</pre>'


def _trajectory_table(r: dict[str, Any]) -> str:
    ok = r.get("success")
    head = (f'<h4>trajectory {_esc(r.get("trajectory"))} · task {_esc(r.get("task"))} · '
            f'<span class="{"ok" if ok else "bad"}">success {_esc(ok)}</span> · ended {_esc(r.get("end_reason"))}</h4>')
    rows = ['<tr><th>step</th><th>context in (new tokens)</th><th>response</th><th>observation</th>'
            '<th>reward</th><th>value</th><th>advantage</th><th>ratio</th><th>clipped</th></tr>']
    for k, step in enumerate(r.get("steps", [])):
        clipped = step.get("clipped")
        adv = _num(step.get("advantage"))
        adv_class = "" if adv is None else ("pos" if adv > 0 else "neg" if adv < 0 else "")
        rows.append(
            f'<tr class="{"clip" if clipped else ""}"><td class="n">{k}</td><td>{_context_cell(step)}</td>'
            f'<td><pre class="resp">{_esc(step.get("response_text"))}</pre></td>'
            f'<td><pre>{_esc(step.get("observation"))}</pre></td>'
            f'<td class="n reward">{_fmt(step.get("reward"))}</td><td class="n value">{_fmt(step.get("value"))}</td>'
            f'<td class="n advantage {adv_class}">{_fmt(step.get("advantage"))}</td>'
            f'<td class="n ratio">{_fmt(step.get("ratio"), 4)}</td>'
            f'<td class="n clipped">{"–" if clipped is None else ("yes" if clipped else "no")}</td></tr>')
    return head + '<table class="steps">' + "".join(rows) + "</table>"


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}h4{margin:16px 0 6px;font-size:14px}
.meta{color:#666}.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{background:#fff;border:1px solid #ddd}
.ct{font-size:13px;font-weight:600}.ax{font-size:11px;fill:#555}.lg{font-size:11px;fill:#333}
details{background:#fff;border:1px solid #ddd;margin:8px 0;padding:6px 12px}summary{cursor:pointer;font-weight:600}
table.steps{border-collapse:collapse;width:100%;table-layout:fixed}
.steps th,.steps td{border:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left}
.steps th{background:#f0f0f0}.steps th:nth-child(1){width:3em}.steps th:nth-child(n+5){width:5.5em}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font:12px/1.35 ui-monospace,monospace;max-height:16em;overflow:auto}
.resp{color:#0b4f8a}.n{text-align:right;font-variant-numeric:tabular-nums}.pos{color:#1a7f37}.neg{color:#b42318}
tr.clip td{background:#fff4e5}.tag{font-size:10px;color:#888;text-transform:uppercase}.ok{color:#1a7f37}.bad{color:#b42318}
"""


def render(run_dir: str | Path, iteration: int | None = None) -> str:
    """The page of the run in `run_dir`; `iteration`: the step charts of that iteration only."""
    run_dir = Path(run_dir)
    samples = read_jsonl(run_dir / "samples.jsonl")
    metrics = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "iteration" in m]
    iterations = sorted({int(r.get("iteration", 0)) for r in samples})
    if iteration is not None and iteration not in iterations:
        raise ValueError(f"iteration {iteration} has no samples in {run_dir / 'samples.jsonl'} "
                         f"(it has {', '.join(map(str, iterations)) or 'none'})")
    n_steps = sum(len(r.get("steps", [])) for r in samples)
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             f"<title>steppo view: {_esc(run_dir.name)}</title><style>{CSS}</style></head><body>",
             f"<h1>steppo view · {_esc(run_dir)}</h1>",
             f'<div class="meta">{len(iterations)} iterations with samples, {len(samples)} sampled trajectories, '
             f"{n_steps} steps; {len(metrics)} metric records. Ratio: the step's importance ratio in the update's "
             "last epoch (geometric mean of its token ratios); clipped: outside [1 − clip_low, 1 + clip_high] "
             "(highlighted rows).</div>",
             '<h2>Charts</h2><div class="charts">', _success_chart(metrics), _step_charts(samples, iteration), "</div>",
             "<h2>Sampled trajectories</h2>"]
    for it in iterations:
        group = [r for r in samples if int(r.get("iteration", 0)) == it]
        m = next((x for x in metrics if x.get("iteration") == it), {})
        summary = (f"iteration {it} · {len(group)} trajectories · train success {_fmt(m.get('train/success'))}"
                   f" · reward mean {_fmt(m.get('train/reward_mean'))}")
        if _num(m.get("eval/success")) is not None:
            summary += f" · held-out success {_fmt(m.get('eval/success'))}"
        open_ = " open" if it == (iteration if iteration is not None else iterations[-1]) else ""
        parts.append(f'<details id="iteration-{it}"{open_}><summary>{_esc(summary)}</summary>'
                     + "".join(_trajectory_table(r) for r in group) + "</details>")
    if not samples:
        parts.append(f"<p>No samples in {_esc(run_dir / 'samples.jsonl')}.</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def make_server(page: str, port: int = 8000, host: str = "127.0.0.1"):
    """An `http.server` answering every GET with `page` (port 0: any free one)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = page.encode("utf-8", errors="replace")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return ThreadingHTTPServer((host, port), Handler)


def serve(page: str, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve `page` at http://host:port/ until interrupted."""
    with make_server(page, port, host) as server:
        print(f"serving on http://{host}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def main(run: str, out: str | None = None, serve_page: bool = False, iteration: int | None = None,
         port: int = 8000) -> int:
    import sys

    run_dir = Path(run)
    if not (run_dir / "samples.jsonl").exists() and not (run_dir / "metrics.jsonl").exists():
        print(f"steppo: {run_dir} has no samples.jsonl or metrics.jsonl (is it a run directory?)", file=sys.stderr)
        return 2
    try:
        page = render(run_dir, iteration)
    except ValueError as exc:
        print(f"steppo: {exc}", file=sys.stderr)
        return 2
    if serve_page and out is None:
        serve(page, port)
        return 0
    path = Path(out) if out else run_dir / "view.html"
    path.write_bytes(page.encode("utf-8", errors="replace"))
    print(f"wrote {path}")
    if serve_page:
        serve(page, port)
    return 0
