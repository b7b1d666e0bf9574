"""The report of ``bench.proxy``: what a run measured (its outcome), printed as tables of
cells, overheads over direct calls, throughput ratios, memory and start-up, the rate-limit
comparison and a summary, then its notes and result."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench._load import MODES, Cell, find, overhead, print_table, ratio, text
from bench._servers import Memory

MIB = 2**20


@dataclass
class Outcome:
    cells: list[Cell] = field(default_factory=list)
    startup_s: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Memory] = field(default_factory=dict)
    gateways: list[str] = field(default_factory=list)  # gateway wN, in the order measured
    failures: list[str] = field(default_factory=list)  # the gateway's: the exit status
    notes: list[str] = field(default_factory=list)
    ledger_floor_s: list[tuple[float, float]] = field(default_factory=list)  # before, after


def print_overheads(out: Outcome, low: int) -> None:
    print(f"overhead over direct at concurrency {low} (latency - direct latency):")
    for target in (*out.gateways, "litellm"):
        parts = []
        for mode in MODES:
            p50, p99 = (overhead(out.cells, target, mode, low, q) for q in (0.5, 0.99))
            if p50 is not None and p99 is not None:
                parts.append(f"{mode} p50 {p50:+.2f} ms, p99 {p99:+.2f} ms")
        print(f"  {target:<10} " + ("; ".join(parts) or "not measured"))
    if out.ledger_floor_s:
        pairs = " / ".join(f"{p * 1000:.2f}" for p, _ in out.ledger_floor_s)
        bares = " / ".join(f"{b * 1000:.2f}" for _, b in out.ledger_floor_s)
        print(
            f"  floor under the gateway's: its hold + settlement alone {pairs} ms p50 before / "
            f"after its load (two durable commits; a bare durable one-row UPDATE {bares} ms)"
        )
        pair = min(p for p, _ in out.ledger_floor_s) * 1000
        for target in out.gateways:
            parts = [
                f"{mode} {extra - pair:+.2f} ms"
                for mode in MODES
                if (extra := overhead(out.cells, target, mode, low, 0.5)) is not None
            ]
            if parts:
                print(f"  {target:<10} p50 overhead beyond the lower floor: " + ", ".join(parts))


def print_ratios(out: Outcome, high: int) -> None:
    print(f"throughput ratios at concurrency {high}:")
    for name in out.gateways:
        others = ["litellm", "direct"] + [g for g in out.gateways[:1] if g != name]
        for other in others:
            parts = []
            for mode in MODES:
                value = ratio(out.cells, name, other, mode, high, False)
                if value is not None:
                    parts.append(f"{mode} {value:.2f}")
            print(f"  {name} / {other:<10} " + (", ".join(parts) or "not measured"))


def print_memory(out: Outcome) -> None:
    for name in (*out.gateways, "litellm"):
        mem, start = out.memory.get(name), out.startup_s.get(name)
        memory = "not measured"
        if mem and mem.rss:
            memory = f"RSS {mem.rss / MIB:.0f} MiB (PSS {mem.pss / MIB:.0f} MiB)"
            memory += f" in {mem.processes} process" + ("es" if mem.processes > 1 else "")
        started = f"{start:.2f} s" if start is not None else "not measured"
        print(f"{name:<10} after load: {memory}; start to 1st answer {started}")


def print_limits(out: Outcome, concurrency: Sequence[int]) -> None:
    if not find(out.cells, "limits on", "plain", concurrency[0]):
        return
    print("\nrate limits on vs off (gateway w1, plain; served at once, taking turns):")
    print(f"{'conc':>6} {'off req/s':>10} {'on req/s':>9} {'on/off':>7}", end="")
    print(f" {'off p50 ms':>11} {'on p50 ms':>10} {'on/off':>7}")
    for conc in concurrency:
        off, on = (find(out.cells, f"limits {x}", "plain", conc) for x in ("off", "on"))
        if off and on and off.rate:
            print(
                f"{conc:>6} {off.rate:>10.0f} {on.rate:>9.0f} {on.rate / off.rate:>7.2f} "
                f"{off.ms(0.5):>11.2f} {on.ms(0.5):>10.2f} {on.ms(0.5) / off.ms(0.5):>7.2f}"
            )


def print_summary(out: Outcome, low: int, high: int) -> None:
    print()
    print(f"summary: req/s at concurrency {high}; p50 overhead over direct at concurrency {low};")
    print("         RSS of the whole process tree after load; spawn to first good answer;")
    print(f"         server CPU ms per answered request at concurrency {high} (direct: the fake's)")
    print(
        f"{'target':<10} {'plain req/s':>11} {'stream req/s':>12} {'plain +ms':>9} "
        f"{'stream +ms':>10} {'RSS MiB':>7} {'start s':>7} {'cpu plain':>9} {'cpu stream':>10}"
    )
    for name in ("direct", *out.gateways, "litellm"):
        cells = [find(out.cells, name, m, high) for m in MODES]
        rates = [cell.rate if cell else None for cell in cells]
        cpu = [cell.cpu_ms_per_call if cell else None for cell in cells]
        extra = [
            overhead(out.cells, name, m, low, 0.5) if name != "direct" else None for m in MODES
        ]
        mem, start = out.memory.get(name), out.startup_s.get(name)
        print(
            f"{name:<10} {text(rates[0], '.0f'):>11} {text(rates[1], '.0f'):>12} "
            f"{text(extra[0], '+.2f'):>9} {text(extra[1], '+.2f'):>10} "
            f"{text(mem.rss / MIB if mem else None, '.0f'):>7} {text(start, '.2f'):>7} "
            f"{text(cpu[0], '.3f'):>9} {text(cpu[1], '.3f'):>10}"
        )
    parts = [
        f"{label} x{conc} {value:.2f}"
        for label, p50 in (("req/s", False), ("p50", True))
        for conc in (low, high)
        if (value := ratio(out.cells, "limits on", "limits off", "plain", conc, p50)) is not None
    ]
    if parts:
        print("limits on/off (w1, plain): " + ", ".join(parts))


def print_report(args: argparse.Namespace, out: Outcome, seconds: float) -> None:
    low, high = min(args.concurrency), max(args.concurrency)
    print_table(out.cells)
    print_overheads(out, low)
    print_ratios(out, high)
    print_memory(out)
    print_limits(out, args.concurrency)
    print_summary(out, low, high)
    print()
    for note in out.notes:
        print(note)
    print(f"run took {seconds:.0f} s; load average at the end {os.getloadavg()[0]:.2f} (1 min)")
    print("RESULT: " + ("ok" if not out.failures else "FAILED"))
    for failure in out.failures[:20]:
        print(f"  {failure}")
