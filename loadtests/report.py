"""The benchmark report of `loadtests.bench`: the table, the detail behind it, the plots.

Pure functions of the results dict the bench builds (also written to bench.json), so a
report can be redrawn from a saved bench.json:

    python -m loadtests.report bench-out/bench.json    # rewrites report.md and the plots

The TLS rows (`tls-unary`, `tls-telemetry`, `mtls-handshake`) have one line over TLS
beside bare grpc.aio over TLS, and one of the TLS / plaintext ratio, ours beside bare's
(no target: what TLS costs); the handshake row has cars/s per server core.

The table has one line per figure: ours, the ceiling measured in the same run, ours /
ceiling, the target and whether it is met ("n/a" where this run cannot judge it, "error"
or "skipped" with the reason). For times (drain, latency) lower is better, so the target
is an upper bound on the ratio; for rates it is a lower bound.

Plots (matplotlib, Agg backend): latency.png, percentile curves p50..p99.9 of SendCommand
at the highest concurrency (bare unary, wait=none, wait=result) and of unlock before and
during the telemetry storm; throughput.png, SendCommand calls/s against calls in flight,
the three series on the same axes.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

FLEET_100K = "`python -m loadtests.fleet steady --cars 100000 --processes 4`"
PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
SERIES = {
    "ceiling": "bare grpc.aio unary",
    "none": "SendCommand wait=none, offline cars",
    "result": "SendCommand wait=result, connected cars",
}


# -- the table ------------------------------------------------------------------------------


def _ratio(ours: float | None, ceiling: float | None) -> float | None:
    if ours is None or not ceiling:
        return None
    return round(ours / ceiling, 3)


def _line(
    row: str,
    ours: str,
    ceiling: str,
    ratio: float | None,
    target: str,
    met: bool | str | None,
) -> dict[str, Any]:
    """`met`: True/False when judged, None when this run cannot judge it, or a status."""
    verdicts = {True: "met", False: "**missed**", None: "n/a"}
    return {
        "row": row,
        "ours": ours,
        "ceiling": ceiling,
        "ratio": ratio,
        "target": target,
        "status": met if isinstance(met, str) else verdicts[met],
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _calls(point: dict[str, Any] | None) -> str:
    if not point:
        return "-"
    lat = point["latency_ms"]
    return f"{point['qps']:,.0f} calls/s · p50 {_ms(lat['p50'])} · p99 {_ms(lat['p99'])}"


def _streams_lines(data: dict[str, Any]) -> list[dict[str, Any]]:
    ours, bare = data.get("ours"), data.get("ceiling")
    held = _line(
        "Vehicle streams held by one process",
        f"{ours['held']:,} of {ours['streams']:,}" if ours else "-",
        f"{bare['held']:,} of {bare['streams']:,}" if bare else "-",
        _ratio(ours and ours["held"], bare and bare["held"]),
        f">= 100,000 cars held; this run holds {(ours or bare or {}).get('streams', '-'):,}, "
        f"the 100k figure comes from {FLEET_100K}",
        None,
    )
    kb = _ratio(ours and ours["kb_per_stream"], bare and bare["kb_per_stream"])
    memory = _line(
        "KB per connected car (server VmRSS delta / streams)",
        f"{ours['kb_per_stream']:.1f} KB" if ours else "-",
        f"{bare['kb_per_stream']:.1f} KB" if bare else "-",
        kb,
        "<= 1.2x bare idle bidi stream",
        None if kb is None else kb <= 1.2,
    )
    return [held, memory]


def _telemetry_lines(data: dict[str, Any]) -> list[dict[str, Any]]:
    def text(side: dict[str, Any] | None) -> str:
        if not side or side["msgs_per_s_per_core"] is None:
            return "-"
        return (
            f"{side['msgs_per_s_per_core']:,.0f} msgs/s/core ({side['msgs_per_s']:,.0f} msgs/s "
            f"at {side['server_cpu_pct']:.0f} % CPU)"
        )

    ours, bare = data.get("ours"), data.get("ceiling")
    ratio = _ratio(ours and ours["msgs_per_s_per_core"], bare and bare["msgs_per_s_per_core"])
    streams = (ours or bare or {}).get("streams", "-")
    return [
        _line(
            f"Telemetry ingest per core, {streams} streams",
            text(ours),
            text(bare),
            ratio,
            ">= 0.7x bare grpc.aio streaming",
            None if ratio is None else ratio >= 0.7,
        )
    ]


def _unary_lines(data: dict[str, Any]) -> list[dict[str, Any]]:
    sweep = data["sweep"]
    bare = sweep["ceiling"][-1] if sweep["ceiling"] else None
    lines = []
    for name, what in (("none", "offline cars (durable enqueue)"), ("result", "round trip")):
        ours = sweep[name][-1] if sweep[name] else None
        level = (ours or bare or {}).get("concurrency", "-")
        ratio = _ratio(ours and ours["qps"], bare and bare["qps"])
        lines.append(
            _line(
                f"SendCommand wait={name}, {what}, {level} in flight",
                _calls(ours),
                _calls(bare),
                ratio,
                ">= 0.8x bare grpc.aio unary",
                None if ratio is None else ratio >= 0.8,
            )
        )
    return lines


def _tls_cost_line(
    row: str, data: dict[str, Any], figure: Callable[[dict[str, Any]], float | None], unit: str
) -> dict[str, Any]:
    """TLS / plaintext of `figure`, ours beside the bare server's."""

    def cost(side: str) -> tuple[str, float | None]:
        tls, plain = (data.get(t, {}).get(side) for t in ("tls", "plaintext"))
        ratio = _ratio(tls and figure(tls), plain and figure(plain))
        if ratio is None or tls is None or plain is None:
            return "-", None
        return f"{ratio:.2f}x ({figure(tls):,.0f} vs {figure(plain):,.0f} {unit})", ratio

    (ours, ours_ratio), (bare, bare_ratio) = cost("ours"), cost("ceiling")
    return _line(
        row,
        ours,
        bare,
        _ratio(ours_ratio, bare_ratio),
        "no target: what TLS costs, beside what it costs bare grpc.aio",
        None,
    )


def _tls_unary_lines(data: dict[str, Any]) -> list[dict[str, Any]]:
    level = data["concurrency"]
    tls = data.get("tls", {})
    ours, bare = tls.get("ours"), tls.get("ceiling")
    ratio = _ratio(ours and ours["qps"], bare and bare["qps"])
    return [
        _line(
            f"SendCommand wait=none over TLS, offline cars, {level} in flight",
            _calls(ours),
            _calls(bare),
            ratio,
            ">= 0.8x bare grpc.aio unary over TLS",
            None if ratio is None else ratio >= 0.8,
        ),
        _tls_cost_line(
            f"SendCommand wait=none, TLS / plaintext calls/s, {level} in flight",
            data,
            lambda point: point["qps"],
            "calls/s",
        ),
    ]


def _tls_telemetry_lines(data: dict[str, Any]) -> list[dict[str, Any]]:
    tls = data.get("tls", {})
    lines = _telemetry_lines(tls)
    for line in lines:
        line["row"] = line["row"].replace("Telemetry ingest", "Telemetry ingest over TLS")
        line["target"] = ">= 0.7x bare grpc.aio streaming over TLS"
    lines.append(
        _tls_cost_line(
            f"Telemetry ingest, TLS / plaintext per core, {data['streams']} streams",
            data,
            lambda side: side["msgs_per_s_per_core"],
            "msgs/s/core",
        )
    )
    return lines


def _handshake_lines(data: dict[str, Any]) -> list[dict[str, Any]]:
    def text(side: dict[str, Any] | None) -> str:
        if not side or side["cars_per_s_per_core"] is None:
            return "-"
        welcomed = "" if side["welcomed"] == side["cars"] else f", {side['welcomed']} welcomed"
        return (
            f"{side['cars_per_s_per_core']:,.0f} cars/s/core ({side['cars_per_s']:,.0f} cars/s "
            f"at {side['server_cpu_pct']:.0f} % CPU{welcomed})"
        )

    ours, bare = data.get("ours"), data.get("ceiling")
    ratio = _ratio(ours and ours["cars_per_s_per_core"], bare and bare["cars_per_s_per_core"])
    return [
        _line(
            f"New mTLS car streams per core, {data['cars']:,} cars (own connection and "
            "certificate, Hello → Welcome)",
            text(ours),
            text(bare),
            ratio,
            "no target set: bare grpc.aio's mTLS handshake + one bidi message beside",
            None,
        )
    ]


def _batch_lines(data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = []
    for entry in data:
        ours, raw = entry["ours"], entry["ceiling"]
        ratio = _ratio(ours["rate_per_s"], raw["rate_per_s"])
        lines.append(
            _line(
                f"Batch durable enqueue, SendCommands of {entry['batch_size']}",
                f"{ours['rate_per_s']:,.0f} commands/s",
                f"{raw['rate_per_s']:,.0f} commands/s (raw py-lmdb, same puts and sync)",
                ratio,
                ">= 0.7x raw LMDB",
                None if ratio is None else ratio >= 0.7,
            )
        )
    return lines


def _drain_lines(data: dict[str, Any]) -> list[dict[str, Any]]:
    work = f"{data['cars']:,} cars x {data['per_car']}"
    if "skipped" in data:
        return [
            _line(
                f"Offline drain {work} and kill -9 loss vs Mosquitto",
                "-",
                "-",
                None,
                "drain time <= Mosquitto's, 0 lost on kill -9",
                f"skipped: {data['skipped']}",
            )
        ]
    ours, theirs = data.get("ours"), data.get("ceiling")
    total = data["cars"] * data["per_car"]

    def drain(side: dict[str, Any] | None) -> str:
        if not side:
            return "-"
        seconds = "did not finish" if side["drain_s"] is None else f"{side['drain_s']:.2f} s"
        return f"{seconds} ({side['delivered']:,}/{total:,} delivered)"

    def loss(side: dict[str, Any] | None) -> str:
        if not side:
            return "-"
        return f"{side['lost']:,} lost of {side['acked_before_kill']:,} acknowledged"

    ratio = _ratio(ours and ours["drain_s"], theirs and theirs["drain_s"])
    drained = ours is not None and ours["drain_s"] is not None and ours["delivered"] == total
    return [
        _line(
            f"Offline drain, {work} queued, all reconnect",
            drain(ours),
            f"{drain(theirs)}, {theirs['system']}" if theirs else "-",
            ratio,
            "<= 1.0x Mosquitto's time (lower is better)",
            None if ratio is None else ratio <= 1.0 and drained,
        ),
        _line(
            "kill -9 right after the last acknowledgement",
            loss(ours),
            loss(theirs),
            None,
            "0 lost",
            None if not ours else ours["lost"] == 0,
        ),
    ]


def _storm_lines(data: dict[str, Any]) -> list[dict[str, Any]]:
    ours, calm = data["ours"], data["ceiling"]
    ratio = _ratio(ours["p99"], calm["p99"])
    return [
        _line(
            f"Unlock p99 during a 10x telemetry storm, {data['cars']} cars",
            f"p99 {_ms(ours['p99'])} (p50 {_ms(ours['p50'])}, n={ours['n']})",
            f"unloaded p99 {_ms(calm['p99'])} (p50 {_ms(calm['p50'])}, n={calm['n']})",
            ratio,
            "<= 2x unloaded (lower is better)",
            None if ratio is None else ratio <= 2.0,
        )
    ]


def _signing_lines(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The signing row's table lines (in the report's line format: `_line`)."""
    cpu = data.get("cpu") or {}
    lines = []
    for who, what, alone in (
        ("sender", "sender's CPU per command (build + sign)", "ed25519_sign_us"),
        ("car", "car's CPU per command (parse + verify)", "ed25519_verify_us"),
    ):
        on, off = cpu.get(f"{who}_on_us"), cpu.get(f"{who}_off_us")
        if on is None or off is None:
            continue
        lines.append(
            _line(
                f"SendCommand signing on vs off: {what}",
                f"{on:,.1f} µs on vs {off:,.1f} µs off (+{on - off:,.1f} µs)",
                f"Ed25519 alone: {cpu.get(alone, 0):,.1f} µs",
                _ratio(on, off),
                "no target: what signing costs (ratio: on / off)",
                None,
            )
        )
    for wait, what in (("none", "offline cars"), ("result", "connected cars, round trip")):
        side = data.get(wait) or {}
        signed, unsigned = side.get("paced_signed"), side.get("paced_unsigned")
        if not signed or not unsigned:
            continue
        s_us, u_us = signed["server_us_per_call"], unsigned["server_us_per_call"]

        def text(point: dict[str, Any], us: float | None) -> str:
            shown = "-" if us is None else f"{us:,.0f} µs/call"
            return f"{shown} · {_calls(point)}"

        lines.append(
            _line(
                f"Broker CPU per SendCommand wait={wait}, signed vs unsigned, {what}, "
                f"both at {signed['paced_at']:,.0f} calls/s",
                f"signed: {text(signed, s_us)}",
                f"unsigned: {text(unsigned, u_us)}",
                _ratio(s_us, u_us),
                "no target: what carrying signed envelopes costs the broker",
                None,
            )
        )
    return lines


LINES: dict[str, tuple[Callable[[Any], list[dict[str, Any]]], str]] = {
    "streams": (_streams_lines, "Vehicle streams held; KB per connected car"),
    "telemetry": (_telemetry_lines, "Telemetry ingest per core"),
    "unary": (_unary_lines, "SendCommand vs bare unary"),
    "tls-unary": (_tls_unary_lines, "SendCommand over TLS vs bare unary over TLS"),
    "tls-telemetry": (_tls_telemetry_lines, "Telemetry ingest over TLS"),
    "mtls-handshake": (_handshake_lines, "New mTLS car streams per core"),
    "batch": (_batch_lines, "Batch durable enqueue vs raw LMDB"),
    "drain": (_drain_lines, "Offline drain and kill -9 loss vs Mosquitto"),
    "storm": (_storm_lines, "Unlock p99 during a 10x telemetry storm"),
    "signing": (_signing_lines, "SendCommand signing on vs off"),
}


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's table as data: one dict per line (row, ours, ceiling, ratio, target,
    status), for every row the run did; a row that failed says so (with what it got)."""
    lines: list[dict[str, Any]] = []
    for name, (make, title) in LINES.items():
        error = results["errors"].get(name)
        data = results.get(name)
        made: list[dict[str, Any]] = []
        if data:
            try:
                made = make(data)
            except (KeyError, TypeError, IndexError):  # a row that failed half way
                made = []
        if error is not None:
            made = made or [_line(title, "-", "-", None, "-", None)]
            for line in made:
                line["status"] = f"error: {error[:300]}"
        lines += made
    return lines


def saturation_notes(results: dict[str, Any], busy_pct: float = 90.0) -> list[str]:
    """Measurements where a load client used `busy_pct` % of a core or more: there the
    client, not the server, may have set the figure."""
    notes = []
    sweep = (results.get("unary") or {}).get("sweep", {})
    for name, points in sweep.items():
        for p in points:
            busiest = max((c for c in p["client_cpu_pct"] if c is not None), default=0.0)
            if busiest >= busy_pct:
                notes.append(
                    f"{SERIES[name]} at {p['concurrency']} in flight: a load client used "
                    f"{busiest:.0f} % of a core, so it may have bounded that figure"
                )
    for side, data in (results.get("telemetry") or {}).items():
        busiest = max((c for c in data["client_cpu_pct"] if c is not None), default=0.0)
        if busiest >= busy_pct:
            notes.append(
                f"telemetry ({'bare grpc.aio' if side == 'ceiling' else 'broker'}): a load "
                f"client used {busiest:.0f} % of a core, so it may have bounded that figure"
            )
    servers = {"ceiling": "bare grpc.aio", "ours": "broker"}
    for row, what in (("tls-unary", "SendCommand"), ("tls-telemetry", "telemetry")):
        for transport, sides in _transports(results.get(row)):
            for side, data in sides.items():
                busiest = max((c for c in data["client_cpu_pct"] if c is not None), default=0.0)
                if busiest >= busy_pct:
                    notes.append(
                        f"{what} ({servers[side]}, {transport}): a load client used "
                        f"{busiest:.0f} % of a core, so it may have bounded that figure"
                    )
    for side, data in _sides(results.get("mtls-handshake")):
        busiest = max((c for c in data["client_cpu_pct"] if c is not None), default=0.0)
        if busiest >= busy_pct:
            notes.append(
                f"mTLS handshakes ({servers[side]}): a handshake client used {busiest:.0f} % "
                "of a core, so it may have bounded cars/s (not cars/s per server core)"
            )
    return notes


def _transports(data: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """(transport, {side: figures}) of a TLS row, plaintext first."""
    data = data or {}
    return [(t, data[t]) for t in ("plaintext", "tls") if isinstance(data.get(t), dict)]


def _sides(data: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """(side, figures) of a row with a bare and a broker side, bare first."""
    data = data or {}
    return [(s, data[s]) for s in ("ceiling", "ours") if isinstance(data.get(s), dict)]


# -- the markdown -----------------------------------------------------------------------------


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _cpu(percent: dict[str, float | None] | None) -> str:
    if not percent:
        return "-"
    return ", ".join(f"{k} {'-' if v is None else f'{v:.0f}'}" for k, v in percent.items())


def _clients(percents: Sequence[float | None]) -> str:
    return " + ".join("-" if p is None else f"{p:.0f}" for p in percents) or "-"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"


def _signing_detail(results: dict[str, Any]) -> list[str]:
    """The signing row's detail for the"""
    data = results.get("signing")
    if not data or "cpu" not in data:
        return []
    cpu = data["cpu"]
    out = [
        "### End-to-end signed commands",
        "",
        f"CPU per command on one thread ({cpu.get('samples', '-')} commands each): sender "
        f"{cpu.get('sender_off_us')} µs unsigned, {cpu.get('sender_on_us')} µs signed; car "
        f"{cpu.get('car_off_us')} µs unsigned (parse), {cpu.get('car_on_us')} µs signed "
        f"(parse + CommandVerifier.check); Ed25519 sign {cpu.get('ed25519_sign_us')} µs, "
        f"verify {cpu.get('ed25519_verify_us')} µs. Request {cpu.get('unsigned_request_bytes')}"
        f" → {cpu.get('signed_request_bytes')} bytes, frame {cpu.get('unsigned_frame_bytes')}"
        f" → {cpu.get('signed_frame_bytes')} bytes.",
        "",
        "| series | calls/s | p50 | p99 | broker CPU | broker µs/call | bench process CPU "
        "| errors |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for wait in ("none", "result"):
        for kind in ("unsigned", "signed", "paced_unsigned", "paced_signed"):
            point = (data.get(wait) or {}).get(kind)
            if not point:
                continue
            lat, cpu_pct = point["latency_ms"], point["cpu_pct"]
            series = f"wait={wait} {kind.replace('paced_', '')}"
            if point.get("paced_at"):
                series += f", paced at {point['paced_at']:,.0f}/s"
            else:
                series += f", {data['concurrency']} in flight"
            out.append(
                f"| {series} | {point['qps']:,.0f} | {_ms(lat['p50'])} | "
                f"{_ms(lat['p99'])} | {cpu_pct.get('server')} % | "
                f"{point['server_us_per_call']} | {cpu_pct.get('bench')} % | "
                f"{_errors(point['errors'])} |"
            )
    out.append("")
    out.append(
        f"{data.get('car_refusals', 0)} commands refused by the cars' verifiers (0 expected). "
        "The load client and the cars share the bench process: when its CPU is near 100 % it, "
        "not the broker, bounds calls/s; the broker's µs/call is what this row compares."
    )
    return out


# -- 4: SendCommands batches to offline cars, beside raw py-lmdb --------------------------------


def _detail(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    streams = results.get("streams") or {}
    if streams:
        out += [
            "### Streams held (row 1)",
            "",
            "| server | held | connect s | VmRSS MB before / after | KB/car (anon KB/car) |",
            "|---|--:|--:|--:|--:|",
        ]
        for side, label in (("ceiling", "bare grpc.aio"), ("ours", "broker")):
            d = streams.get(side)
            if d:
                before, after = d["rss_kb_before"]["VmRSS"], d["rss_kb_after"]["VmRSS"]
                out.append(
                    f"| {label} | {d['held']:,}/{d['streams']:,} | {d['connect_s']} | "
                    f"{before / 1024:.1f} / {after / 1024:.1f} | "
                    f"{d['kb_per_stream']} ({d['anon_kb_per_stream']}) |"
                )
        out.append("")
    telemetry = results.get("telemetry") or {}
    if telemetry:
        out += [
            "### Telemetry ingest (row 2)",
            "",
            "| server | taken in msgs/s | server CPU % | per core | client CPU % | "
            "client writes/s | server counts |",
            "|---|--:|--:|--:|--:|--:|---|",
        ]
        for side, label in (("ceiling", "bare grpc.aio"), ("ours", "broker")):
            d = telemetry.get(side)
            if d:
                out.append(
                    f"| {label} | {d['msgs_per_s']:,.0f} | {d['server_cpu_pct']} | "
                    f"{d['msgs_per_s_per_core'] or 0:,.0f} | {_clients(d['client_cpu_pct'])} | "
                    f"{d['client_written_per_s']:,.0f} | {_cell(d['counted'])} |"
                )
        out.append("")
    unary = results.get("unary") or {}
    if unary:
        out += [
            f"### SendCommand sweep (row 3; {unary['client_procs']} client process(es) "
            f"at most, {unary['cars']} connected cars)",
            "",
            "| series | in flight | calls/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | "
            "CPU % | client CPU % |",
            "|---|--:|--:|--:|--:|--:|--:|---|---|--:|",
        ]
        for name, points in unary["sweep"].items():
            for p in points:
                lat = p["latency_ms"]
                out.append(
                    f"| {SERIES[name]} | {p['concurrency']} | {p['qps']:,.0f} | "
                    f"{lat['p50']} | {lat['p90']} | {lat['p99']} | {lat['p99.9']} | "
                    f"{_cell(_errors(p['errors']))} | {_cpu(p['cpu_pct'])} | "
                    f"{_clients(p['client_cpu_pct'])} |"
                )
        out.append("")
    out += _tls_detail(results)
    out += _signing_detail(results)
    batch = results.get("batch") or []
    if batch:
        out += [
            "### Batch enqueue (row 4)",
            "",
            "| batch | broker commands/s | batch p50 / p99 ms | CPU % | raw LMDB commands/s | "
            "raw batch p50 / p99 ms | record B | errors |",
            "|--:|--:|--:|---|--:|--:|--:|---|",
        ]
        for e in batch:
            o, r = e["ours"], e["ceiling"]
            out.append(
                f"| {e['batch_size']} | {o['rate_per_s']:,.0f} | {o['latency_ms']['p50']} / "
                f"{o['latency_ms']['p99']} | {_cpu(o['cpu_pct'])} | {r['rate_per_s']:,.0f} | "
                f"{r['latency_ms']['p50']} / {r['latency_ms']['p99']} | {r['record_bytes']} | "
                f"{_cell(_errors(o['errors']))} |"
            )
        out.append("")
    drain = results.get("drain") or {}
    if drain.get("ours") and drain.get("ceiling"):
        out += [
            "### Offline drain (row 5)",
            "",
            "| system | drain s (all received) | all results recorded s | delivered "
            "| CPU % client / server | acked before kill | recovered | lost |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for d in (drain["ceiling"], drain["ours"]):
            cpu = d["drain_cpu_pct"]
            recorded = d.get("results_recorded_s") or "-"
            out.append(
                f"| {d['system']} | {d['drain_s']} | {recorded} | {d['delivered']} | "
                f"{cpu['client']} / "
                f"{cpu['server']} | {d['acked_before_kill']} | {d['recovered_after_kill']} | "
                f"{d['lost']} |"
            )
        out.append("")
    storm = results.get("storm") or {}
    if storm:
        out += [
            "### Unlocks before and during the storm (row 6)",
            "",
            "| phase | n | p50 ms | p90 ms | p99 ms | max ms |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for side, label in (("ceiling", "unloaded"), ("ours", "telemetry storm x10")):
            d = storm[side]
            out.append(
                f"| {label} | {d['n']} | {d['p50']} | {d['p90']} | {d['p99']} | {d['max']} |"
            )
        passed = sum(c["passed"] for c in storm["checks"])
        out += ["", f"storm drill checks passed: {passed}/{len(storm['checks'])}", ""]
    return out


def _tls_detail(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    labels = {"ceiling": "bare grpc.aio", "ours": "broker"}
    unary = results.get("tls-unary") or {}
    if _transports(unary):
        out += [
            f"### SendCommand wait=none over TLS (row 7; offline cars, "
            f"{unary['concurrency']} in flight, {unary['client_procs']} client process(es) "
            "at most)",
            "",
            "| server | transport | calls/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | "
            "CPU % | client CPU % |",
            "|---|---|--:|--:|--:|--:|--:|---|---|--:|",
        ]
        for transport, sides in _transports(unary):
            for side, p in _sides(sides):
                lat = p["latency_ms"]
                out.append(
                    f"| {labels[side]} | {transport} | {p['qps']:,.0f} | {lat['p50']} | "
                    f"{lat['p90']} | {lat['p99']} | {lat['p99.9']} | "
                    f"{_cell(_errors(p['errors']))} | {_cpu(p['cpu_pct'])} | "
                    f"{_clients(p['client_cpu_pct'])} |"
                )
        out.append("")
    telemetry = results.get("tls-telemetry") or {}
    if _transports(telemetry):
        out += [
            f"### Telemetry ingest over TLS (row 8; {telemetry['streams']} streams)",
            "",
            "| server | transport | taken in msgs/s | server CPU % | per core | client CPU % | "
            "client writes/s | server counts |",
            "|---|---|--:|--:|--:|--:|--:|---|",
        ]
        for transport, sides in _transports(telemetry):
            for side, d in _sides(sides):
                out.append(
                    f"| {labels[side]} | {transport} | {d['msgs_per_s']:,.0f} | "
                    f"{d['server_cpu_pct']} | {d['msgs_per_s_per_core'] or 0:,.0f} | "
                    f"{_clients(d['client_cpu_pct'])} | {d['client_written_per_s']:,.0f} | "
                    f"{_cell(d['counted'])} |"
                )
        out.append("")
    handshakes = results.get("mtls-handshake") or {}
    if _sides(handshakes):
        out += [
            f"### New mTLS car streams (row 9; {handshakes['cars']:,} cars, each its own "
            "connection and certificate)",
            "",
            "| server | welcomed | in flight | s | cars/s | server CPU s (%) | cars/s/core | "
            "connect → Welcome p50 / p90 / p99 ms | errors | client CPU % |",
            "|---|--:|--:|--:|--:|--:|--:|--:|---|--:|",
        ]
        for side, d in _sides(handshakes):
            lat = d["latency_ms"]
            out.append(
                f"| {labels[side]} | {d['welcomed']:,}/{d['cars']:,} | {d['concurrency']} | "
                f"{d['elapsed_s']} | {d['cars_per_s'] or 0:,.0f} | {d['server_cpu_s']} "
                f"({d['server_cpu_pct']}) | {d['cars_per_s_per_core'] or 0:,.0f} | "
                f"{lat['p50']} / {lat['p90']} / {lat['p99']} | "
                f"{_cell(_errors(d['errors']))} | {_clients(d['client_cpu_pct'])} |"
            )
        out.append("")
    return out


def render_markdown(results: dict[str, Any]) -> str:
    env, settings = results["environment"], results["settings"]
    lines = [
        "# Broker benchmark: each figure beside its ceiling, one run",
        "",
        "| row | ours | ceiling | ours / ceiling | target | met |",
        "|---|---|---|--:|---|---|",
    ]
    for r in results.get("rows", []):
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(
            f"| {_cell(r['row'])} | {_cell(r['ours'])} | {_cell(r['ceiling'])} | {ratio} | "
            f"{_cell(r['target'])} | {_cell(r['status'])} |"
        )
    lines += [
        "",
        f"{env['cpus']} CPUs · {env['platform']} · Python {env['python']} · grpcio "
        f"{env['grpcio']} · loop: broker {env.get('broker_loop', '-')}, clients "
        f"{env['client_loop']} · extensions: broker {env.get('broker_extensions', '-')} · "
        f"durability {settings['durability']} · data on {env['data_filesystem']} · "
        f"load average {env['load_average_at_start']} at start, "
        f"{env.get('load_average_at_end', '-')} at end · {settings['duration']:g} s per "
        f"measurement after {settings['warmup']:g} s warm-up · whole run "
        f"{results.get('elapsed_s', '-')} s",
        "",
        "## Detail",
        "",
        *_detail(results),
    ]
    plots = results.get("plots", {})
    if plots.get("files"):
        names = [Path(f).name for f in plots["files"]]
        lines += ["Plots: " + ", ".join(f"![{Path(n).stem}]({n})" for n in names)]
    elif plots.get("skipped"):
        lines.append(f"Plots skipped: {plots['skipped']}")
    lines += [f"note: {note}" for note in results["notes"]]
    lines += [f"error in {row}: {error}" for row, error in results["errors"].items()]
    return "\n".join(lines)


# -- the plots --------------------------------------------------------------------------------


def _nines(q: float) -> float:
    """Where percentile q sits on a "nines" axis: p50 0.3, p90 1, p99 2, p99.9 3."""
    return -math.log10(1 - q)


def _curve(ax: Any, label: str, latency: dict[str, Any]) -> None:
    points = [(_nines(q), latency[name]) for name, q in PERCENTILES if latency.get(name)]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=label)


def _log_axis(ax: Any, which: str, base: int = 10) -> None:
    """A log scale on `which` ("x" or "y") labelled in plain numbers, not powers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{which}scale")("log", base=base)
    axis = getattr(ax, f"{which}axis")
    subs = (1.0, 2.0, 3.0, 5.0) if base == 10 else (1.0,)
    axis.set_major_locator(LogLocator(base=base, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _percentile_axes(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xticks([_nines(q) for _, q in PERCENTILES], [name for name, _ in PERCENTILES])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms")
    _log_axis(ax, "y")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)


def plot(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """latency.png and throughput.png in `out`: {"files": [...]}, or {"skipped": why}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install -e '.[dev]')"}
    sweep = (results.get("unary") or {}).get("sweep", {})
    storm = results.get("storm") or {}
    files = []

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    level = None
    for name, label in SERIES.items():
        if sweep.get(name):
            point = sweep[name][-1]
            level = point["concurrency"]
            _curve(left, f"{label} ({point['qps']:,.0f}/s)", point["latency_ms"])
    _percentile_axes(left, f"SendCommand latency, {level or '-'} in flight")
    if storm:
        _curve(right, "unloaded", storm["ceiling"])
        _curve(right, "during a 10x telemetry storm", storm["ours"])
    _percentile_axes(right, "unlock (wait=result) latency, verbosity storm drill")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    files.append(str(out / "latency.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label in SERIES.items():
        points = sweep.get(name) or []
        if points:
            ax.plot(
                [p["concurrency"] for p in points],
                [p["qps"] for p in points],
                marker="o",
                label=label,
            )
    _log_axis(ax, "x", base=2)
    ax.set_xlabel("calls in flight")
    ax.set_ylabel("calls/s")
    ax.set_title("SendCommand throughput vs load (same clients, same machine)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if sweep:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    files.append(str(out / "throughput.png"))
    return {"files": files}


def main(argv: Sequence[str] | None = None) -> int:
    path = Path((argv or sys.argv[1:] or ["bench-out/bench.json"])[0])
    results = json.loads(path.read_text())
    results["rows"] = table_rows(results)
    results["plots"] = plot(results, path.parent)
    text = render_markdown(results)
    (path.parent / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
