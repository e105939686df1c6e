"""Render recfleet's Grafana dashboards as PNG plots, straight from a Prometheus.

For a quick look without Grafana (or in a report): every panel of every dashboard in
grafana/dashboards becomes one subplot; each of its queries is run as a range query and
each returned series drawn as a line. Grafana's macros get fixed values
($__rate_interval from --rate-interval, $__range the whole range, $__interval the step).

    pip install -e '.[plots]'
    python grafana/render.py --prometheus http://127.0.0.1:9090 --range 30m --out plots/
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import dates

DASHBOARDS = Path(__file__).resolve().parent / "dashboards"
_UNITS = {"s": "seconds", "reqps": "requests/s", "ops": "per second", "percentunit": "share"}


def seconds(duration: str) -> int:
    """'90s', '30m', '2h' -> seconds. Raises ValueError on anything else."""
    match = re.fullmatch(r"(\d+)([smhd])", duration)
    if not match:
        raise ValueError(f"not a duration: {duration!r}")
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def fill_macros(expr: str, rate_interval: str, range_s: int, step_s: int) -> str:
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__range", f"{range_s}s")
        .replace("$__interval", f"{step_s}s")
    )


def legend(template: str, labels: dict[str, str]) -> str:
    if template and template != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), template)
    return ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"


def query_range(url: str, expr: str, start: float, end: float, step: int) -> list[dict[str, Any]]:
    """Raises RuntimeError when Prometheus refuses the query."""
    resp = httpx.get(
        f"{url}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": step},
        timeout=60,
    )
    body = resp.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error', resp.text)}")
    return list(body["data"]["result"])


def draw_panel(ax: Any, panel: dict[str, Any], url: str, args: argparse.Namespace) -> int:
    """Plot every series of one panel; returns how many series had data."""
    end = time.time()
    range_s, step = seconds(args.range), args.step
    drawn = 0
    for target in panel["targets"]:
        expr = fill_macros(target["expr"], args.rate_interval, range_s, step)
        for series in query_range(url, expr, end - range_s, end, step):
            points = [(float(t), float(v)) for t, v in series["values"]]
            points = [(t, v) for t, v in points if math.isfinite(v)]
            if not points:
                continue
            xs = [datetime.fromtimestamp(t) for t, _ in points]
            label = legend(target.get("legendFormat", ""), series["metric"])
            ax.plot(xs, [v for _, v in points], label=label[:40], linewidth=1.2)
            drawn += 1
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    ax.set_title(panel["title"], fontsize=9)
    ax.set_ylabel(_UNITS.get(unit, unit), fontsize=7)
    ax.tick_params(labelsize=6)
    ax.xaxis.set_major_formatter(dates.DateFormatter("%H:%M:%S"))
    if drawn:
        ax.legend(fontsize=6, loc="best")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return drawn


def render(path: Path, url: str, out: Path, args: argparse.Namespace) -> Path:
    dash = json.loads(path.read_text())
    panels = dash["panels"]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        draw_panel(ax, panel, url, args)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{dash['title']} (last {args.range})", fontsize=12)
    fig.tight_layout()
    target = out / f"{dash['uid']}.png"
    fig.savefig(target, dpi=args.dpi)
    plt.close(fig)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--dashboards", type=Path, default=DASHBOARDS)
    parser.add_argument("--out", type=Path, default=Path("plots"))
    parser.add_argument("--range", default="30m", help="time range, e.g. 15m, 2h")
    parser.add_argument("--step", type=int, default=5, help="seconds between points")
    parser.add_argument("--rate-interval", default="1m", help="value of $__rate_interval")
    parser.add_argument("--dpi", type=int, default=110)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.dashboards.glob("*.json")):
        try:
            print(render(path, args.prometheus, args.out, args))
        except (httpx.HTTPError, RuntimeError) as exc:
            print(f"{path.name}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
