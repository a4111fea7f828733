"""bench.plots draws every mode's JSON output (bench/plots.py).

Each plot function gets a small synthetic JSON file shaped as its mode writes it (the
scale bench's helpers build its distribution and timeline, so the shapes cannot drift) and
must write non-empty PNGs; runs written before the plot keys existed still plot; a missing,
broken or foreign file raises PlotError (never anything else, never a hang), and
``plot_run``, which the modes call at their end, only logs it.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from bench import plots
from bench.plots import PlotError, plot_fanout, plot_history, plot_run, plot_scale, plot_storm
from bench.scale import QUANTILES, _quantiles_ms, _timeline

pytestmark = pytest.mark.timeout(60)
PNG = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, body: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))
    return path


def _png(path: str) -> None:
    data = Path(path).read_bytes()
    assert data.startswith(PNG) and len(data) > 5000, path


def _scale_body(n: int = 50, quantiles: bool = True) -> dict:
    rnd = random.Random(1)

    def broadcast(seq: int) -> dict:
        lat = [rnd.uniform(0.001, 0.2) for _ in range(n)]
        m = {"seq": seq, "open": n, "received": n, "lost": 0, "p50_ms": 90.0, "p99_ms": 190.0,
             "max_ms": max(lat) * 1e3}
        if quantiles:
            m["quantiles_ms"] = _quantiles_ms(lat)
        return m

    def phase() -> dict:
        t0 = 1_700_000_000.0
        ph = {"connected": n, "failed": 0, "open": n, "seconds": 2.0, "per_s": n / 2.0,
              "wall_s": 2.1, "server_cpu_s": 0.5, "server_cpu_us_per_handshake": 1e4,
              "errors": {}, "other_cores": 0.1, "load1": 1.0}
        if quantiles:
            ph["timeline"] = _timeline(t0, [t0 + rnd.uniform(0, 2) for _ in range(n)],
                                       [t0 + rnd.uniform(0, 1) for _ in range(5)])
        return ph

    body = {"settings": {"clients": n, "workers": 2}, "connect": phase(), "storm": phase(),
            "memory": {"workers": [], "kib_per_conn": 8.6}, "idle": {"open": n},
            "broadcast": [broadcast(0), broadcast(1), broadcast(2)],
            "broadcast_after_storm": [broadcast(3)], "pushes": {"published": n},
            "error": None, "machine": {"cores": 2, "load_end": [1.0, 1.0, 1.0]}}
    if quantiles:
        body.update(argv=["--clients", str(n), "--workers", "2"], date="20261203T180000Z")
    return body


def _history_body() -> dict:
    runs = []
    for layout in ("1x20", "4x5"):
        for rate in (200.0, 0.0):
            for mode, cpu in (("plain", 20.0), ("history", 45.0)):
                runs.append({"run": len(runs), "mode": mode, "layout": layout, "rate": rate,
                             "published": 30, "lost": 0, "deliveries_per_s": 5000.0,
                             "p50_ms": 1.0, "p99_ms": 3.0, "redis_us_per_msg": cpu,
                             "redis_us_per_delivery": cpu / 20,
                             "hub_us_per_delivery": None if rate == 0 else 12.0,
                             "commandstats": {}})
    return {"meta": {"argv": ["--duration", "15"], "errors": [], "seconds": 10.0, "nproc": 2,
                     "date": "20261203T180000Z", "load_end": [1.0, 1.0, 1.0]}, "runs": runs}


def _storm_body(per_client: bool = True) -> dict:
    n = 40
    rnd = random.Random(2)
    opened = sorted(rnd.uniform(0.3, 2.0) for _ in range(n))
    caught = sorted(t + rnd.uniform(0.01, 0.3) for t in opened)
    r = {"clients": n, "channels": 4, "workers": 1, "rate": 30.0, "restart_to_ready_s": 0.25,
         "recovered_all": True, "storm_from_spawn_s": caught[-1], "other_cores": 0.05,
         "timeline": [{"t": 0.2 * k, "open": min(n, 4 * k), "acked": min(n, 4 * k),
                       "caught": min(n, 3 * k), "closed": n, "phases": {}} for k in range(15)],
         "opened_pct_s": [1.0, 1.8, 2.0, 2.0], "caught_pct_s": [1.1, 1.9, 2.1, 2.2],
         "recover_pct_s": [0.1, 0.2, 0.3, 0.3], "checks": {}, "ok": True}
    if per_client:
        r.update(per_client={"opened_s": opened, "caught_s": caught,
                             "recover_s": sorted(c - o for o, c in zip(opened, caught,
                                                                       strict=True))},
                 attempts_s=sorted(rnd.uniform(-0.05, 2.0) for _ in range(2 * n)),
                 sigterm_s=-0.06)
    return {"meta": {"argv": ["--clients", str(n)], "errors": [], "nproc": 2,
                     "date": "20261203T180000Z", "load_end": [1.0, 1.0, 1.0]}, "result": r}


def _fanout_body() -> dict:
    paths = [{"path": name, "cpu_us_per_delivery": cpu, "write_syscalls_per_delivery": w,
              "x_broadcast": cpu / 13.0,
              "repeats": [{"cpu_us_per_delivery": cpu * f, "write_syscalls_per_delivery": w}
                          for f in (0.9, 1.1)]}
             for name, cpu, w in (("broadcast", 13.0, 1.0), ("fan_out", 10.0, 1.0),
                                  ("burst 10", 3.0, 0.1))]
    return {"meta": {"argv": ["--burst", "10"], "date": "20261203T180000Z", "clients": 1000,
                     "messages": 300, "repeat": 2, "burst": 10, "nproc": 2,
                     "load_end": [1.0, 1.0, 1.0]}, "paths": paths}


CASES = [
    (plot_scale, "scale.json", _scale_body, {"scale-broadcast.png", "scale-connect.png"}),
    (plot_history, "history.json", _history_body, {"history-cpu.png",
                                                   "history-throughput.png"}),
    (plot_storm, "storm.json", _storm_body, {"storm-recovery.png", "storm-cdf.png"}),
    (plot_fanout, "fanout.json", _fanout_body, {"fanout-burst.png"}),
]


@pytest.mark.parametrize(("fn", "name", "make", "pngs"), CASES, ids=[c[1] for c in CASES])
def test_each_mode_writes_its_pngs(tmp_path: Path, fn, name, make, pngs) -> None:
    _write(tmp_path / name, make())
    paths = fn(str(tmp_path))
    assert {Path(p).name for p in paths} == pngs
    for p in paths:
        _png(p)


def test_scale_plots_any_n_and_runs_without_the_new_keys(tmp_path: Path) -> None:
    for n in (1, 7, 3000):
        _write(tmp_path / f"n{n}" / "scale.json", _scale_body(n))
        for p in plot_scale(str(tmp_path / f"n{n}")):
            _png(p)
    _write(tmp_path / "old" / "scale.json", _scale_body(20, quantiles=False))
    assert len(plot_scale(str(tmp_path / "old"))) == 2


def test_storm_plots_a_run_without_per_client_times(tmp_path: Path) -> None:
    _write(tmp_path / "storm.json", _storm_body(per_client=False))
    for p in plot_storm(str(tmp_path), str(tmp_path / "elsewhere")):
        assert Path(p).parent == tmp_path / "elsewhere"
        _png(p)


def test_quantiles_and_timeline_shapes() -> None:
    q = _quantiles_ms([0.003, 0.001, 0.002])
    assert len(q) == QUANTILES and q == sorted(q) and q[0] == 1.0 and q[-1] == 3.0
    assert _quantiles_ms([]) == []
    tl = _timeline(100.0, [100.0, 100.05, 101.0], [100.5])
    assert sum(tl["connected"]) == 3 and sum(tl["failed_attempts"]) == 1
    assert len(tl["connected"]) == len(tl["failed_attempts"]) <= 201
    assert tl["bin_s"] >= 0.1


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"runs": 3}',
                                     '{"result": {"clients": 1}}', '{"paths": [{"x": 1}]}',
                                     '{"broadcast": [{"seq": 0}]}'])
@pytest.mark.parametrize(("fn", "name"), [(c[0], c[1]) for c in CASES])
def test_malformed_input_raises_plot_error(tmp_path: Path, fn, name, content: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(PlotError, match=name):
        fn(str(tmp_path))


def test_missing_file_raises_plot_error(tmp_path: Path) -> None:
    with pytest.raises(PlotError, match="no such file"):
        plot_scale(str(tmp_path))


def test_plot_run_logs_and_never_raises(tmp_path: Path) -> None:
    (tmp_path / "storm.json").write_text('{"meta": {"errors": ["boom"]}, "result": {}}')
    log = io.StringIO()
    assert plot_run(str(tmp_path), "storm", log=log) == []
    assert "plots: none written for storm" in log.getvalue()
    _write(tmp_path / "fanout.json", _fanout_body())
    log = io.StringIO()
    assert len(plot_run(str(tmp_path), "fanout", log=log)) == 1
    assert "wrote" in log.getvalue()


def test_cli_regenerates_every_mode_found(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _write(run / "history.json", _history_body())
    _write(run / "fanout.json", _fanout_body())
    assert plots.main([str(run)]) == 0
    assert capsys.readouterr().out.count("wrote") == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    (run / "fanout.json").write_text("{broken")
    assert plots.main([str(run), str(empty)]) == 1
    err = capsys.readouterr().err
    assert "fanout.json: not readable as JSON" in err and "empty: none of" in err


def test_main_bench_results_replot(tmp_path: Path) -> None:
    runs = [{"stack": stack, "clients": 100, "rate": rate, "run": k, "repeat": 0,
             "p50_ms": 1.0, "p99_ms": None if rate == 0 else 4.0,
             "deliveries_per_s": 1e5, "cpu_us_per_delivery": 2.0, "published": 10}
            for k, (stack, rate) in enumerate((s, r) for s in ("hub", "socketio")
                                              for r in (1000.0, 0.0))]
    _write(tmp_path / "results.json", {"meta": {}, "runs": runs})
    paths = plots.plot_results(str(tmp_path))
    assert {Path(p).name for p in paths} == {"latency.png", "throughput.png"}
    for p in paths:
        _png(p)
