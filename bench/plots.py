"""PNG plots of the bench modes' JSON output, at the end of a run or from saved runs.

``python -m bench.plots RUN_DIR [RUN_DIR ...]`` finds in each directory the JSON file a mode
writes and (re)writes that mode's PNGs next to it:

======================  ====================================================================
``scale.json``          ``scale-broadcast.png`` (CDF of the time one message takes to reach
(``bench.scale``)       each of the N connections, per broadcast), ``scale-connect.png``
                        (connections accepted and attempts refused per second, during the
                        first connect and the restart storm)
``history.json``        ``history-cpu.png`` (Redis CPU us/msg plain vs history per layout
(``bench.history``)     and rate, with the 2x goal; hub CPU us/delivery),
                        ``history-throughput.png`` (deliveries/s and p99 latency)
``storm.json``          ``storm-recovery.png`` (clients reconnected and recovered over time
(``bench.storm``)       after the restart, connect attempts/s), ``storm-cdf.png`` (CDF of
                        per-client recovery times)
``fanout.json``         ``fanout-burst.png`` (write syscalls and CPU per delivery of
(``bench.fanout``)      broadcast / fan_out / burst)
``results.json``        ``latency.png`` and ``throughput.png`` (bench.report.write_plots)
(``python -m bench``)
======================  ====================================================================

Each ``plot_<mode>(source, outdir=None)`` takes the JSON file or its directory, writes into
``outdir`` (default: the JSON file's directory) and returns the paths written; it raises
:class:`PlotError` when the file is missing, not JSON or not shaped as that mode writes it.
:func:`plot_run` is what the modes call at their end: it never raises, it logs. matplotlib
runs on its Agg backend (no screen needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

__all__ = ["MODES", "PlotError", "main", "plot_fanout", "plot_history", "plot_results",
           "plot_run", "plot_scale", "plot_storm"]

DPI = 110


class PlotError(ValueError):
    """The input cannot be plotted: missing, not JSON, or not shaped as its mode writes it."""


# -- helpers -------------------------------------------------------------------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _load(source: str, name: str) -> tuple[dict[str, Any], str]:
    """``(body, path)`` of ``source`` (a JSON file, or a directory holding ``name``)."""
    path = os.path.join(source, name) if os.path.isdir(source) else source
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
    except FileNotFoundError as exc:
        raise PlotError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlotError(f"{path}: not readable as JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise PlotError(f"{path}: a JSON object expected, not {type(body).__name__}")
    return body, path


def _num(value: Any) -> float | None:
    """``value`` as a float, None when it is no finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _command(module: str, argv: Any) -> str:
    """The command line, without ``--out DIR`` (where the files went is no figure)."""
    kept: list[str] = []
    skip = False
    for arg in argv if isinstance(argv, list) else []:
        arg = str(arg)
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return f"python -m {module} {' '.join(kept)}".strip()


def _date(stamp: Any) -> str:
    """``20261203T180433Z`` as ``2026-12-03 18:04 UTC``; anything else as it is."""
    text = str(stamp)
    if len(text) == 16 and text[8] == "T" and text.endswith("Z"):
        return f"{text[:4]}-{text[4:6]}-{text[6:8]} {text[9:11]}:{text[11:13]} UTC"
    return text


def _caption(fig: Any, module: str, argv: Any, date: Any = None, cores: Any = None,
             load: Any = None, extra: str = "") -> None:
    """The command, date and machine state under the figure."""
    bits = [f"$ {_command(module, argv)}"]
    if date:
        bits.append(_date(date))
    if cores:
        bits.append(f"{cores} cores")
    if isinstance(load, list) and load and _num(load[0]) is not None:
        bits.append(f"load at the end {load[0]:.2f}")
    if extra:
        bits.append(extra)
    fig.text(0.5, 0.005, "; ".join(bits), ha="center", va="bottom", fontsize=7.5,
             color="0.3", wrap=True)


def _save(plt: Any, fig: Any, outdir: str, name: str) -> str:
    path = os.path.join(outdir, name)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _outdir(path: str, outdir: str | None) -> str:
    out = outdir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out, exist_ok=True)
    return out


def _cdf(ax: Any, values: Sequence[float], **kw: Any) -> None:
    """A step CDF of ``values`` on ``ax`` (fraction of the values on y)."""
    xs = sorted(values)
    n = len(xs)
    if n:
        ax.step(xs, [(k + 1) / n for k in range(n)], where="post", **kw)


def _guard(path: str, what: str, fn: Callable[[], list[str]]) -> list[str]:
    """Run ``fn``; a missing key or a wrong type becomes a PlotError naming the file."""
    try:
        return fn()
    except PlotError as exc:
        if str(exc).startswith(path):
            raise
        raise PlotError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise PlotError(f"{path}: not shaped as {what} writes it "
                        f"({type(exc).__name__}: {exc})") from exc


# -- python -m bench.scale -----------------------------------------------------------------

def plot_scale(source: str, outdir: str | None = None) -> list[str]:
    """``scale-broadcast.png`` and ``scale-connect.png`` from ``scale.json``.

    The broadcast CDF uses each broadcast's ``quantiles_ms`` (201 percentiles, any N); a
    run written before that key existed is drawn from its p50/p99/max. The connect plot uses
    each connect phase's ``timeline`` (counts per ``bin_s``); without one, the phase's mean
    rate. Raises PlotError (see the module doc)."""
    body, path = _load(source, "scale.json")
    return _guard(path, "bench.scale", lambda: _scale(body, _outdir(path, outdir)))


def _scale(body: dict[str, Any], out: str) -> list[str]:
    settings = body.get("settings") or {}
    n = settings.get("clients") or (body.get("connect") or {}).get("connected")
    argv = body.get("argv")
    if argv is None and settings:  # a run written before "argv" was recorded
        argv = [f"--clients {n}", f"--workers {settings.get('workers')}"]
    machine = body.get("machine") or {}
    others = [f"{x:.2f} ({name})" for name in ("connect", "idle", "storm")
              if isinstance(body.get(name), dict)
              and (x := _num(body[name].get("other_cores"))) is not None]
    caption = {"module": "bench.scale", "argv": argv, "date": body.get("date"),
               "cores": machine.get("cores"), "load": machine.get("load_end"),
               "extra": f"other cores {', '.join(others)}" if others else ""}
    broadcasts = [("broadcast", m) for m in body.get("broadcast") or []]
    broadcasts += [("after the storm", m) for m in body.get("broadcast_after_storm") or []]
    phases = [(name, body[name]) for name in ("connect", "storm")
              if isinstance(body.get(name), dict)]
    if not broadcasts and not phases:
        raise PlotError("no broadcast and no connect phase to plot")
    plt = _pyplot()
    paths = []
    if broadcasts:
        fig, ax = plt.subplots(figsize=(8, 4.8))
        try:
            for k, (label, m) in enumerate(broadcasts):
                style = "--" if label != "broadcast" else "-"
                q = m.get("quantiles_ms") or []
                name = f"{label} #{m['seq']}: {m['received']}/{m['open']} received"
                if q:
                    ax.plot(q, [i / (len(q) - 1) for i in range(len(q))] if len(q) > 1
                            else [1.0], style, color=f"C{k}", label=name)
                else:
                    pts = [(_num(m.get(key)), f) for key, f in
                           (("p50_ms", 0.5), ("p99_ms", 0.99), ("max_ms", 1.0))]
                    pts = [(x, f) for x, f in pts if x is not None]
                    ax.plot([x for x, _ in pts], [f for _, f in pts], "o" + style,
                            color=f"C{k}", label=name + " (p50/p99/max only)")
            ax.set_xlabel("time from PUBLISH to receipt at a connection (ms)")
            ax.set_ylabel("fraction of the connections that received it")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"One message to all N = {n}: receive-time CDF per broadcast\n"
                         f"(the right end is the time for the message to reach all N)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7.5, loc="lower right")
            _caption(fig, **caption)
            paths.append(_save(plt, fig, out, "scale-broadcast.png"))
        finally:
            plt.close(fig)
    if phases:
        fig, axes = plt.subplots(1, len(phases), figsize=(6.5 * len(phases), 4.5),
                                 squeeze=False)
        try:
            for ax, (name, ph) in zip(axes[0], phases, strict=True):
                tl = ph.get("timeline")
                if isinstance(tl, dict):
                    width = float(tl["bin_s"])
                    ok, bad = tl["connected"], tl.get("failed_attempts") or []
                    ax.stairs([c / width for c in ok], [i * width for i in range(len(ok) + 1)],
                              color="tab:blue", label="connections accepted /s")
                    if any(bad):
                        ax.stairs([c / width for c in bad],
                                  [i * width for i in range(len(bad) + 1)], color="tab:red",
                                  label="attempts refused or failed /s")
                    ax.set_xlabel(f"time since the phase started (s; bins of {width:.2g} s)")
                else:
                    ax.hlines(ph["per_s"], 0, ph["seconds"], color="tab:blue",
                              label="mean connections accepted /s (no timeline recorded)")
                    ax.set_xlabel("time since the phase started (s)")
                ax.set_ylabel("per second")
                title = "first connect" if name == "connect" else "reconnect storm after restart"
                ax.set_title(f"{title}: {ph['connected']} connected, {ph.get('failed', 0)} "
                             f"failed in {ph['seconds']:.1f} s ({ph['per_s']:,.0f}/s)",
                             fontsize=10)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
            fig.suptitle(f"bench.scale, N = {n}: connect rate over time")
            _caption(fig, **caption)
            paths.append(_save(plt, fig, out, "scale-connect.png"))
        finally:
            plt.close(fig)
    return paths


# -- python -m bench.history ---------------------------------------------------------------

def _median(values: Sequence[float]) -> float | None:
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return None
    mid = len(vs) // 2
    return vs[mid] if len(vs) % 2 else (vs[mid - 1] + vs[mid]) / 2


def _rate(rate: float) -> str:
    return "max" if not rate else f"{rate:g}"


def plot_history(source: str, outdir: str | None = None) -> list[str]:
    """``history-cpu.png`` and ``history-throughput.png`` from ``history.json``: medians
    over repeats, plain vs history, one group of bars per layout x offered rate. Raises
    PlotError (see the module doc)."""
    body, path = _load(source, "history.json")
    return _guard(path, "bench.history", lambda: _history(body, _outdir(path, outdir)))


def _history(body: dict[str, Any], out: str) -> list[str]:
    runs = body["runs"]
    if not isinstance(runs, list) or not runs:
        raise PlotError("no runs to plot")
    meta = body.get("meta") or {}
    groups: list[tuple[str, float]] = []
    for r in runs:
        if (r["layout"], r["rate"]) not in groups:
            groups.append((r["layout"], r["rate"]))

    def med(layout: str, rate: float, mode: str, key: str) -> float | None:
        return _median([_num(r.get(key)) for r in runs if r["layout"] == layout  # type: ignore
                        and r["rate"] == rate and r["mode"] == mode])

    labels = [f"{layout}\n{_rate(rate)}/s" for layout, rate in groups]
    xs = list(range(len(groups)))
    width = 0.38
    colors = {"plain": "tab:gray", "history": "tab:blue"}
    caption = {"module": "bench.history", "argv": meta.get("argv"), "date": meta.get("date"),
               "cores": meta.get("nproc"), "load": meta.get("load_end"),
               "extra": "medians over repeats"}
    other = _median([_num(r.get("other_cores")) for r in runs])  # type: ignore[misc]
    if other is not None:
        caption["extra"] += f"; other cores (median over runs) {other:.2f}"
    plt = _pyplot()

    def panel(ax: Any, key: str, ylabel: str, title: str, fmt: str) -> dict[str, list]:
        vals: dict[str, list] = {}
        for k, mode in enumerate(("plain", "history")):
            vs = [med(layout, rate, mode, key) for layout, rate in groups]
            vals[mode] = vs
            bars = ax.bar([x + (k - 0.5) * width for x in xs], [v or 0.0 for v in vs], width,
                          color=colors[mode], label=mode)
            ax.bar_label(bars, labels=["-" if v is None else format(v, fmt) for v in vs],
                         fontsize=7)
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_xlabel("layout (channels x clients each) and offered deliveries/s")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        return vals

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 3 * len(groups) + 4), 4.8))
    try:
        vals = panel(axes[0], "redis_us_per_msg", "Redis CPU per message (us, net of idle)",
                     "Redis CPU per published message", ".1f")
        for x, plain in zip(xs, vals["plain"], strict=True):
            if plain:
                axes[0].hlines(2 * plain, x - width, x + width, colors="tab:red",
                               linestyles="--", label="goal: history <= 2x plain"
                               if x == 0 or not any(vals["plain"][:x]) else None)
        axes[0].legend(fontsize=8)
        panel(axes[1], "hub_us_per_delivery", "hub CPU per delivery (us)",
              "hub CPU per delivery", ".2f")
        axes[1].legend(fontsize=8)
        fig.suptitle("History channels (FCALL hub_publish) vs plain PUBLISH: CPU")
        _caption(fig, **caption)
        paths.append(_save(plt, fig, out, "history-cpu.png"))
    finally:
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 3 * len(groups) + 4), 4.8))
    try:
        panel(axes[0], "deliveries_per_s", "deliveries/s (received; log scale)",
              "deliveries per second", ",.0f")
        panel(axes[1], "p99_ms", "publish-to-receive p99 (ms; log scale)", "p99 latency", ".1f")
        for ax in axes:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        fig.suptitle("History channels vs plain PUBLISH: throughput and latency")
        _caption(fig, **caption)
        paths.append(_save(plt, fig, out, "history-throughput.png"))
    finally:
        plt.close(fig)
    return paths


# -- python -m bench.storm -----------------------------------------------------------------

def plot_storm(source: str, outdir: str | None = None) -> list[str]:
    """``storm-recovery.png`` and ``storm-cdf.png`` from ``storm.json``.

    Uses the result's ``per_client`` times and ``attempts_s`` when present; a run written
    before them is drawn from its ``timeline`` (caught clients over time) and percentiles.
    Raises PlotError (see the module doc)."""
    body, path = _load(source, "storm.json")
    return _guard(path, "bench.storm", lambda: _storm(body, _outdir(path, outdir)))


def _storm(body: dict[str, Any], out: str) -> list[str]:
    r, meta = body["result"], body.get("meta") or {}
    if not isinstance(r, dict) or "timeline" not in r:
        raise PlotError(f"the storm did not complete: {meta.get('errors')}")
    n = r["clients"]
    caption = {"module": "bench.storm", "argv": meta.get("argv"), "date": meta.get("date"),
               "cores": meta.get("nproc"), "load": meta.get("load_end"),
               "extra": f"other cores {r['other_cores']:.2f}"
               if _num(r.get("other_cores")) is not None else ""}
    per = r.get("per_client") or {}
    plt = _pyplot()
    paths = []
    fig, (ax, low) = plt.subplots(2, 1, figsize=(9, 6.4), sharex=True,
                                  gridspec_kw={"height_ratios": (2, 1)})
    try:
        tl = r["timeline"]
        if per.get("opened_s") is not None:
            opened, caught = per["opened_s"], per["caught_s"]
            ax.step([0.0, *opened], range(len(opened) + 1), where="post", color="tab:blue",
                    label="reconnected (cumulative)")
            ax.step([0.0, *caught], range(len(caught) + 1), where="post", color="tab:green",
                    label="recovered: ack recovered:true and caught up (cumulative)")
        else:
            ax.plot([row["t"] for row in tl], [row["caught"] for row in tl], color="tab:green",
                    label="recovered (sampled every 0.2 s)")
        ax.plot([row["t"] for row in tl], [row["open"] for row in tl], ":", color="0.4",
                label="connections open (sampled)")
        ax.axhline(n, color="0.6", lw=0.8)
        for axis in (ax, low):
            ready = _num(r.get("restart_to_ready_s"))
            if ready is not None:
                axis.axvline(ready, color="tab:purple", ls="--", lw=1, label="new hub ready")
            sigterm = _num(r.get("sigterm_s"))
            if sigterm is not None:
                axis.axvline(sigterm, color="tab:red", ls="--", lw=1, label="old hub SIGTERM")
            axis.grid(True, alpha=0.3)
        ax.set_ylabel("clients")
        ax.legend(fontsize=8, loc="upper left")
        attempts = r.get("attempts_s")
        if attempts:
            lo, hi = min(attempts), max(attempts)
            width = max(0.1, (hi - lo) / 100)
            nb = int((hi - lo) / width) + 1
            counts = [0] * nb
            for t in attempts:
                counts[min(nb - 1, int((t - lo) / width))] += 1
            low.stairs([c / width for c in counts], [lo + i * width for i in range(nb + 1)],
                       color="tab:orange", fill=True, alpha=0.6,
                       label=f"connect attempts /s ({len(attempts)} in all; bins of "
                             f"{width:.2g} s)")
            low.legend(fontsize=8, loc="upper right")
        else:
            low.text(0.5, 0.5, "no connect attempt times in this run", ha="center",
                     transform=low.transAxes, color="0.4")
        low.set_ylabel("attempts per second")
        low.set_xlabel("time since the new hub process was spawned (s)")
        done = (f"all {n} recovered {r['storm_from_spawn_s']:.1f} s after the spawn"
                if r.get("recovered_all") else f"not all {n} recovered")
        ax.set_title(f"Recovery storm after a hub restart: {n} clients, {r['channels']} "
                     f"history channels, {r['rate']:g} msg/s\n{done}", fontsize=10)
        _caption(fig, **caption)
        paths.append(_save(plt, fig, out, "storm-recovery.png"))
    finally:
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    try:
        for ax, key, pct, xlabel, title in (
                (axes[0], "recover_s", "recover_pct_s", "reconnect to recovered (s)",
                 "per client: from its reconnect to recovered"),
                (axes[1], "caught_s", "caught_pct_s", "new hub's spawn to recovered (s)",
                 "per client: from the new hub's spawn to recovered")):
            values = per.get(key)
            if values is not None:
                _cdf(ax, values, color="tab:green", label=f"{len(values)} clients")
            else:
                qs = r.get(pct) or []
                pts = [(x, f) for x, f in zip(qs, (0.5, 0.9, 0.99, 1.0), strict=False)
                       if _num(x) is not None]
                ax.plot([x for x, _ in pts], [f for _, f in pts], "o-", color="tab:green",
                        label="p50/p90/p99/max only")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("fraction of the clients")
            ax.set_ylim(0, 1.02)
            ax.set_title(title, fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        fig.suptitle(f"Recovery storm, {n} clients: CDF of recovery times")
        _caption(fig, **caption)
        paths.append(_save(plt, fig, out, "storm-cdf.png"))
    finally:
        plt.close(fig)
    return paths


# -- python -m bench.fanout ----------------------------------------------------------------

def plot_fanout(source: str, outdir: str | None = None) -> list[str]:
    """``fanout-burst.png`` from ``fanout.json``: write syscalls and CPU per delivery of
    each path (bars: medians; dots: repeats). Raises PlotError (see the module doc)."""
    body, path = _load(source, "fanout.json")
    return _guard(path, "bench.fanout", lambda: _fanout(body, _outdir(path, outdir)))


def _fanout(body: dict[str, Any], out: str) -> list[str]:
    meta, paths_ = body.get("meta") or {}, body["paths"]
    if not isinstance(paths_, list) or not paths_:
        raise PlotError("no paths to plot")
    names = [p["path"] for p in paths_]
    xs = list(range(len(names)))
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    try:
        for ax, key, ylabel, fmt in (
                (axes[0], "write_syscalls_per_delivery", "write syscalls per delivery", ".3f"),
                (axes[1], "cpu_us_per_delivery", "server CPU per delivery (us)", ".2f")):
            vals = [float(p[key]) for p in paths_]
            bars = ax.bar(xs, vals, 0.6, color=[f"C{i}" for i in xs])
            ax.bar_label(bars, fmt="%" + fmt, fontsize=8)
            for x, p in zip(xs, paths_, strict=True):
                reps = [float(rep[key]) for rep in p.get("repeats") or []]
                ax.plot([x + 0.2] * len(reps), reps, "k.", ms=4)  # beside the bar's label
            ax.set_xticks(xs, names)
            ax.set_ylabel(ylabel)
            ax.set_title(ylabel, fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"One message to {meta.get('clients', '?')} connections: broadcast() vs "
                     f"fan_out vs coalesced bursts of {meta.get('burst', '?')}")
        _caption(fig, "bench.fanout", meta.get("argv"), meta.get("date"), meta.get("nproc"),
                 meta.get("load_end"), "bars: medians; dots: repeats")
        return [_save(plt, fig, out, "fanout-burst.png")]
    finally:
        plt.close(fig)


# -- python -m bench -----------------------------------------------------------------------

def plot_results(source: str, outdir: str | None = None) -> list[str]:
    """``latency.png`` and ``throughput.png`` from the main bench's ``results.json``
    (:func:`bench.report.write_plots` on the aggregated runs). Raises PlotError."""
    body, path = _load(source, "results.json")

    def go() -> list[str]:
        from .report import aggregate, write_plots

        runs = body["runs"]
        if not runs:
            raise PlotError("no runs to plot")
        clean = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in runs]
        return write_plots(_outdir(path, outdir), aggregate(clean))

    return _guard(path, "python -m bench", go)


#: mode -> (the JSON file it writes, its plot function)
MODES: dict[str, tuple[str, Callable[[str, str | None], list[str]]]] = {
    "scale": ("scale.json", plot_scale),
    "history": ("history.json", plot_history),
    "storm": ("storm.json", plot_storm),
    "fanout": ("fanout.json", plot_fanout),
    "bench": ("results.json", plot_results),
}


def plot_run(outdir: str, mode: str, log: TextIO | None = None) -> list[str]:
    """Plot ``mode``'s JSON in ``outdir`` (a mode calls this at its end). Never raises: a
    failure is printed to ``log`` (default stdout) and ``[]`` returned."""
    log = log or sys.stdout
    try:
        paths = MODES[mode][1](outdir, None)
    except Exception as exc:
        print(f"plots: none written for {mode} ({type(exc).__name__}: {exc})", file=log,
              flush=True)
        return []
    for path in paths:
        print(f"wrote {path}", file=log, flush=True)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.plots RUN_DIR|JSON ...``: exit 0 when every argument gave plots, 1
    when one failed or held no known JSON file (said on stderr), 2 on a usage error."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.plots", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="a run's output directory (or one of its JSON files)")
    parser.add_argument("--out", default=None,
                        help="write the PNGs here instead of next to each JSON file")
    args = parser.parse_args(argv)
    failed = 0
    for run in args.runs:
        if os.path.isdir(run):
            found = [(mode, os.path.join(run, name)) for mode, (name, _) in MODES.items()
                     if os.path.isfile(os.path.join(run, name))]
        else:
            found = [(mode, run) for mode, (name, _) in MODES.items()
                     if os.path.basename(run) == name]
        if not found:
            print(f"python -m bench.plots: {run}: none of "
                  f"{', '.join(name for name, _ in MODES.values())}", file=sys.stderr)
            failed += 1
            continue
        for mode, path in found:
            try:
                for out in MODES[mode][1](path, args.out):
                    print(f"wrote {out}")
            except PlotError as exc:
                print(f"python -m bench.plots: {exc}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
