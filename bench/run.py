"""`make bench`: MailSender side by side with the limit of SMTP and the common Celery recipes.

Every row runs against its own Postfix ``smtp-sink`` (and, for the real relay, a proxy that
answers the end of DATA 20 ms late), its own private redis-server and its own worker, in two
scenarios, and the table shows the median mails/s of ``--runs`` runs. Every mail is counted
at the sink: a lost, doubled or failed mail makes the row an error, not a figure.

    python -m bench.run [--mails 2000] [--relay-mails 1000] [--runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table

from bench.procs import Processes
from bench.rows import ROWS, Options, RowResult, Scenario

console = Console(width=None if Console().is_terminal else 150)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(results: list[RowResult]) -> Table:
    out = Table(
        title="MailSender benchmark: mails/s, median of runs, every mail counted at the sink"
    )
    out.add_column("scenario")
    out.add_column("row")
    out.add_column("mails/s", justify="right")
    out.add_column("runs (min-max)", justify="right")
    out.add_column("/common", justify="right")
    out.add_column("/batch", justify="right")
    out.add_column("/limit", justify="right")
    out.add_column("Done p50/p99 ms", justify="right")
    out.add_column("peak RSS MB main/child", justify="right")
    previous = None
    for r in results:
        if previous is not None and r.scenario != previous:
            out.add_section()
        first = r.scenario != previous
        previous = r.scenario
        same = {x.key: x.rate for x in results if x.scenario == r.scenario}
        rate = r.rate
        if r.error:
            figure = f"[red]ERROR: {r.error}[/red]"
        else:
            figure = f"{rate:,.0f}" if rate is not None else "-"
        spread = f"{min(r.rates):,.0f}-{max(r.rates):,.0f}" if r.rates else "-"
        latency = "-" if r.latency_ms is None else f"{r.latency_ms[0]:.1f} / {r.latency_ms[1]:.1f}"
        rss = "-" if r.rss_mb is None else f"{_mb(r.rss_mb[0])} / {_mb(r.rss_mb[1])}"
        out.add_row(
            r.scenario.title if first else "",
            r.title,
            figure,
            f"{len(r.rates)}: {spread}",
            _ratio(rate, same.get("common")),
            _ratio(rate, same.get("batch")),
            _ratio(rate, same.get("smtp-source")),
            latency,
            rss,
        )
    return out


def targets(results: list[RowResult]) -> list[tuple[str, bool | None, str]]:
    """Issue 4's targets: (what, met (None: not measured), the figures)."""
    by = {(r.scenario.key, r.key): r for r in results}

    def rate(s: str, k: str) -> float | None:
        r = by.get((s, k))
        return r.rate if r else None

    checks: list[tuple[str, bool | None, str]] = []

    def ratio_check(what: str, s: str, base: str, minimum: float) -> None:
        ms, b = rate(s, "mailsender"), rate(s, base)
        if ms is None or b is None:
            checks.append((what, None, "not measured"))
        else:
            checks.append((what, ms / b >= minimum, f"{ms / b:.2f}x (target ≥ {minimum}x)"))

    ratio_check("fast sink: MailSender ≥ 3x common recipe", "fast", "common", 3)
    ratio_check("fast sink: MailSender ≥ 0.75x batch recipe", "fast", "batch", 0.75)
    ratio_check("real relay: MailSender ≥ 10x common recipe", "relay", "common", 10)
    fast = by.get(("fast", "mailsender"))
    if fast is None or fast.latency_ms is None:
        checks.append(("light load: p50 < 10 ms, p99 < 50 ms", None, "not measured"))
    else:
        p50, p99 = fast.latency_ms
        checks.append(
            (
                "light load: p50 < 10 ms, p99 < 50 ms",
                p50 < 10 and p99 < 50,
                f"{p50:.1f} / {p99:.1f}",
            )
        )
    for r in results:
        if r.key == "mailsender" and r.rss_mb is not None:
            peak = max(x for x in r.rss_mb if x is not None)
            checks.append(
                (f"{r.scenario.title}: worker RSS < 100 MB", peak < 100, f"{peak:.0f} MB")
            )
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make bench", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--mails", type=int, default=2000, help="mails per run, fast sink")
    parser.add_argument("--relay-mails", type=int, default=1000, help="mails per run, real relay")
    parser.add_argument("--runs", type=int, default=3, help="runs per row (the median is shown)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="the relay's DATA delay")
    parser.add_argument("--latency-rate", type=float, default=50.0, help="events/s, light load")
    parser.add_argument("--latency-s", type=float, default=5.0, help="seconds of light load")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}"
    )
    parser.add_argument("--scenarios", default="fast,relay", help="fast, relay or both")
    parser.add_argument("--quick", action="store_true", help="small runs: a smoke test, 1 run")
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.mails, args.relay_mails, args.runs, args.latency_s = 300, 100, 1, 2.0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows: {', '.join(unknown)}")
    for tool in ("smtp-sink", "smtp-source", "redis-server"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is missing: run `make bench-deps`", file=sys.stderr)
            return 2

    scenarios = [
        s
        for s in (
            Scenario("fast", "fast sink", 0.0, args.mails),
            Scenario(
                "relay", f"relay, DATA +{args.delay_ms:g} ms", args.delay_ms, args.relay_mails
            ),
        )
        if s.key in args.scenarios.split(",")
    ]
    workdir = Path(tempfile.mkdtemp(prefix="mailsender-bench-"))
    opts = Options(args.runs, args.latency_rate, args.latency_s, workdir)
    procs = Processes()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background
    results: list[RowResult] = []
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        for scenario in scenarios:
            for key in rows:
                console.print(f"[dim]{scenario.title}: {key} …[/dim]", end=" ")
                t0 = time.monotonic()
                result = ROWS[key](procs, scenario, opts)
                results.append(result)
                shown = "error" if result.error else f"{result.rate or 0:,.0f} mails/s"
                console.print(f"[dim]{shown} ({time.monotonic() - t0:.0f} s)[/dim]")
    except KeyboardInterrupt:
        console.print("\n[red]interrupted; stopping everything started[/red]")
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        return 130
    finally:
        procs.stop_all()
    console.print(table(results))
    console.print(
        f"N = {args.mails} mails per run (fast), {args.relay_mails} (relay); {args.runs} runs; "
        f"light load {args.latency_rate:g} events/s for {args.latency_s:g} s; "
        f"total {time.monotonic() - began:.0f} s; load average before {load_before:.2f}, "
        f"after {os.getloadavg()[0]:.2f} (other work on the machine skews the figures)."
    )
    for what, met, figures in targets(results):
        mark = (
            "[green]met[/green]"
            if met
            else ("[dim]—[/dim]" if met is None else "[red]missed[/red]")
        )
        console.print(f"  {mark}  {what}: {figures}")
    failed = any(r.error for r in results)
    if failed or args.keep:
        console.print(f"logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
