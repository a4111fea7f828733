"""Figures out of the runs: the stdout table, the ratios, the JSON file and the PNG plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["aggregate", "hub_ratios", "ratios", "table", "write_json", "write_plots"]

#: Summed over repeats; every other number is the median over repeats.
SUMMED = ("published", "expected", "received", "lost", "late", "layer_dropped")
KEYS = ("stack", "clients", "rate", "run", "repeat")

ORDER = ["ceiling", "socketio", "hub", "hub2", "hub-asyncio", "node-ws", "node-socketio",
         "channels", "channels-pubsub"]
#: Plot colours in ORDER; a stack not in ORDER gets the next colour of matplotlib's cycle.
COLORS = ["tab:gray", "tab:red", "tab:blue", "tab:green", "tab:purple", "tab:olive",
          "tab:orange", "tab:brown", "tab:pink"]


def _rate(rate: float) -> str:
    return "max" if rate == 0 else f"{rate:g}"


def _f(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _key(run: dict) -> tuple:
    stack = ORDER.index(run["stack"]) if run["stack"] in ORDER else len(ORDER)
    return run["clients"], stack, run["rate"] == 0, run["rate"]


def aggregate(runs: Sequence[dict]) -> list[dict]:
    """One row per stack x N x rate: counts summed over repeats, other figures the median."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["stack"], r["clients"], r["rate"]), []).append(r)
    rows = []
    for group in groups.values():
        row = dict(group[0])
        row["repeats"] = len(group)
        for key, value in group[0].items():
            if key in KEYS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            values = [g[key] for g in group if isinstance(g.get(key), int | float)]
            if key in SUMMED:
                row[key] = sum(values)
            elif values:
                ordered = sorted(values)
                mid = len(ordered) // 2
                row[key] = (ordered[mid] if len(ordered) % 2
                            else (ordered[mid - 1] + ordered[mid]) / 2)
        rows.append(row)
    return sorted(rows, key=_key)


def table(runs: Sequence[dict]) -> str:
    """One row per stack x N x rate (markdown, readable on a terminal too)."""
    head = ("| stack | N | rate msg/s | published | deliveries/s | p50 ms | p90 ms | p99 ms "
            "| max ms | lost | server CPU us/delivery | RSS KiB/conn idle | RSS KiB/conn loaded "
            "| loadgen cores | other cores |")
    lines = [head, _rule(head)]
    for r in sorted(runs, key=_key):
        cores = r["loadgen_cpu_s"] / r["wall_s"] if r["wall_s"] > 0 else float("nan")
        lines.append(
            f"| {r['stack']} | {r['clients']} | {_rate(r['rate'])} | {r['published']} "
            f"| {_f(r['deliveries_per_s'], ',.0f')} | {_f(r['p50_ms'], '.1f')} "
            f"| {_f(r['p90_ms'], '.1f')} | {_f(r['p99_ms'], '.1f')} | {_f(r['max_ms'], '.1f')} "
            f"| {r['lost']} | {_f(r['cpu_us_per_delivery'], '.1f')} "
            f"| {_f(r['rss_idle_kib_per_conn'], '.1f')} "
            f"| {_f(r['rss_loaded_kib_per_conn'], '.1f')} "
            f"| {_f(cores, '.2f')} | {_f(r.get('other_cores'), '.2f')} |")
    return "\n".join(lines)


def _rule(head: str) -> str:
    return "|" + "---|" * (head.count("|") - 1)


def ratios(runs: Sequence[dict]) -> str:
    """Deliveries/s and CPU per delivery of each stack against ceiling and socketio.

    ``x ceiling`` for deliveries/s is stack / ceiling (higher is better); for CPU it is
    stack / ceiling too (lower is better). Same for ``x socketio``. ``x hub`` compares hub2
    (two workers) and hub-asyncio (no uvloop) with the one-process hub row of the same N
    and rate.
    """
    by = {(r["stack"], r["clients"], r["rate"]): r for r in runs}
    head = ("| stack | N | rate msg/s | deliveries/s x ceiling | deliveries/s x socketio "
            "| CPU/delivery x ceiling | CPU/delivery x socketio | deliveries/s x hub "
            "| CPU/delivery x hub |")
    lines = [head, _rule(head)]
    for r in sorted(runs, key=_key):
        if r["stack"] in ("ceiling",):
            continue
        cells = []
        for ref in ("ceiling", "socketio"):
            other = by.get((ref, r["clients"], r["rate"]))
            cells.append(_div(r["deliveries_per_s"], other and other["deliveries_per_s"]))
        for ref in ("ceiling", "socketio"):
            other = by.get((ref, r["clients"], r["rate"]))
            cells.append(_div(r["cpu_us_per_delivery"], other and other["cpu_us_per_delivery"]))
        one = by.get(("hub", r["clients"], r["rate"]))
        versus_hub = one is not None and r["stack"] in ("hub2", "hub-asyncio")
        cells.append(_div(r["deliveries_per_s"], one["deliveries_per_s"])
                     if versus_hub else "-")
        cells.append(_div(r["cpu_us_per_delivery"], one["cpu_us_per_delivery"])
                     if versus_hub else "-")
        lines.append(f"| {r['stack']} | {r['clients']} | {_rate(r['rate'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def hub_ratios(runs: Sequence[dict]) -> str:
    """The one-process hub against every other stack of the same N and rate.

    ``deliveries/s hub / stack`` (above 1: the hub delivered more per second) and ``CPU/delivery
    stack / hub`` (above 1: the stack needs that many times the hub's server CPU per
    delivery), with both stacks' ``lost``. Returns a markdown table (a header only when there
    is no hub row)."""
    by = {(r["stack"], r["clients"], r["rate"]): r for r in runs}
    head = ("| stack | N | rate msg/s | deliveries/s hub / stack | CPU per delivery stack / hub "
            "| lost stack | lost hub |")
    lines = [head, _rule(head)]
    for r in sorted(runs, key=_key):
        hub = by.get(("hub", r["clients"], r["rate"]))
        if r["stack"] == "hub" or hub is None:
            continue
        lines.append(f"| {r['stack']} | {r['clients']} | {_rate(r['rate'])} "
                     f"| {_div(hub['deliveries_per_s'], r['deliveries_per_s'])} "
                     f"| {_div(r['cpu_us_per_delivery'], hub['cpu_us_per_delivery'])} "
                     f"| {r['lost']} | {hub['lost']} |")
    return "\n".join(lines)


def _div(a: float | None, b: float | None) -> str:
    if a is None or b is None or not a or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}x"


def write_json(path: str, meta: dict, runs: Sequence[dict]) -> None:
    def clean(v: object) -> object:
        return None if isinstance(v, float) and math.isnan(v) else v

    body = {"meta": meta, "runs": [{k: clean(v) for k, v in r.items()} for r in runs]}
    with open(path, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)


def write_plots(outdir: str, runs: Sequence[dict]) -> list[str]:
    """latency.png (p50/p99 vs offered rate, one panel per N) and throughput.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["clients"] for r in runs})
    stacks = sorted({r["stack"] for r in runs},
                    key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), s))
    colors = dict(zip(ORDER, COLORS, strict=True))
    spare = iter(f"C{i}" for i in range(100))
    for stack in stacks:
        colors.setdefault(stack, next(spare))
    paths = []

    timed = [r for r in runs if r.get("p99_ms") is not None and not math.isnan(r["p99_ms"])]
    if timed:  # burst runs (--burst) measure no latency: no latency plot for them
        paths.append(_latency_plot(plt, outdir, timed, stacks, colors))
    paths.append(_throughput_plot(plt, outdir, runs, ns, stacks, colors))
    return paths


def _latency_plot(plt: Any, outdir: str, runs: Sequence[dict], stacks: list[str],
                  colors: dict[str, str]) -> str:
    ns = sorted({r["clients"] for r in runs})
    fig, axes = plt.subplots(1, len(ns), figsize=(6 * len(ns), 4.5), squeeze=False)
    for ax, n in zip(axes[0], ns, strict=True):
        fixed = sorted({r["rate"] for r in runs if r["clients"] == n and r["rate"] > 0})
        xs_of = {rate: i for i, rate in enumerate(fixed)}
        has_max = any(r["clients"] == n and r["rate"] == 0 for r in runs)
        if has_max:
            xs_of[0] = len(fixed)
        for stack in stacks:
            rows = sorted((r for r in runs if r["stack"] == stack and r["clients"] == n),
                          key=lambda r: xs_of[r["rate"]])
            if not rows:
                continue
            xs = [xs_of[r["rate"]] for r in rows]
            ax.plot(xs, [r["p50_ms"] for r in rows], "o--", color=colors[stack],
                    label=f"{stack} p50")
            ax.plot(xs, [r["p99_ms"] for r in rows], "s-", color=colors[stack],
                    label=f"{stack} p99")
        ax.set_xticks(range(len(xs_of)), [_rate(r) for r in sorted(xs_of, key=xs_of.get)])
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (msg/s to one channel)")
        ax.set_ylabel("publish-to-receive latency (ms)")
        ax.set_title(f"N = {n} clients")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = os.path.join(outdir, "latency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throughput_plot(plt: Any, outdir: str, runs: Sequence[dict], ns: list[int],
                     stacks: list[str], colors: dict[str, str]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    width = 0.8 / max(1, len(stacks))
    for ax, field, label in ((axes[0][0], "deliveries_per_s", "deliveries/s at rate max"),
                             (axes[0][1], "cpu_us_per_delivery",
                              "server CPU us per delivery at rate max")):
        for k, stack in enumerate(stacks):
            vals = []
            for n in ns:
                row = next((r for r in runs if r["stack"] == stack and r["clients"] == n
                            and r["rate"] == 0), None)
                vals.append(row[field] if row else 0.0)
            bars = ax.bar([i + k * width for i in range(len(ns))], vals, width,
                          color=colors[stack], label=stack)
            ax.bar_label(bars, fmt="%.0f" if field == "deliveries_per_s" else "%.1f",
                         fontsize=7)
        ax.set_xticks([i + width * (len(stacks) - 1) / 2 for i in range(len(ns))],
                      [f"N={n}" for n in ns])
        ax.set_title(label)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(outdir, "throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
