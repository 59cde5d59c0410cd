"""`tmem-testbed run | compare | report | list`: the testbed's subcommands.

Exit codes: 0 pass, 1 verification failure, 2 usage or scenario error,
3 infrastructure error (QEMU, boot, image, tmemd).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.table import Table

from tmem_host.testbed import report
from tmem_host.testbed.modes import MODES
from tmem_host.testbed.records import RunRecord
from tmem_host.testbed.runner import EXIT_INFRASTRUCTURE, EXIT_USAGE, INFRASTRUCTURE_ERRORS, Runner, RunOutcome
from tmem_host.testbed.scenario import WORKLOADS, ScenarioError, load_scenario

DEFAULT_RESULTS = Path("results")


def stdout_console() -> Console:
    """Rich output; wide enough when piped to a log that tables do not wrap."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def add_subcommands(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = subcommands.add_parser("run", help="run a scenario and write its report")
    run.add_argument("scenario", type=Path, help="scenario file (TOML)")
    run.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (default: results)")
    run.set_defaults(handler=command_run)

    compare = subcommands.add_parser("compare", help="compare two runs mode by mode")
    compare.add_argument("results_a", type=Path)
    compare.add_argument("results_b", type=Path)
    compare.set_defaults(handler=command_compare)

    rebuild = subcommands.add_parser("report", help="rebuild a run's report from its run.json")
    rebuild.add_argument("results", type=Path)
    rebuild.set_defaults(handler=command_report)

    listing = subcommands.add_parser("list", help="list workloads and modes")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=command_list)


def command_run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as error:
        print(f"tmem-testbed: {error}", file=sys.stderr)
        return EXIT_USAGE
    if console.is_terminal:
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console)
        task = progress.add_task(scenario.name, total=len(scenario.modes) * scenario.repetitions)

        def update(description: str, completed: int, total: int) -> None:
            progress.update(task, description=description, completed=completed, total=total)

        runner = Runner(scenario, args.results, progress=update, log=progress.console.print)
        with progress:
            outcome = _run_guarded(runner)
    else:
        started = time.monotonic()

        def plain(description: str, completed: int, total: int) -> None:
            left = remaining_text(time.monotonic() - started, completed, total)
            print(f"[{completed}/{total}] {description}{left}", file=sys.stderr, flush=True)

        runner = Runner(scenario, args.results, progress=plain,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
        outcome = _run_guarded(runner)
    if outcome is None:
        return EXIT_INFRASTRUCTURE
    print_summary(outcome.run)
    print(f"results: {outcome.results} (report.md, report.html, run.json)")
    return outcome.exit_code


def remaining_text(elapsed_s: float, completed: int, total: int) -> str:
    """', about N min left' from the pace so far (mode runs take alike long enough
    for a mean); empty before the first run has finished."""
    if completed <= 0 or completed >= total:
        return ""
    left = elapsed_s / completed * (total - completed)
    return f", about {max(1, round(left / 60))} min left"


def print_summary(run: RunRecord) -> None:
    """The summary table; the remote tier's when a mode had one; the migrations'."""
    console = stdout_console()
    console.print(report.summary_table(run))
    for table in (report.application_table(run), report.density_table(run), report.memory_table(run),
                  report.remote_table(run),
                  report.migration_table(run)):
        if table is not None:
            console.print(table)


def _run_guarded(runner: Runner) -> RunOutcome | None:
    try:
        return runner.run()
    except INFRASTRUCTURE_ERRORS as error:
        print(f"tmem-testbed: infrastructure error: {error}", file=sys.stderr)
        return None


def command_compare(args: argparse.Namespace) -> int:
    try:
        run_a, run_b = report.load_run(args.results_a), report.load_run(args.results_b)
    except (OSError, ValueError, KeyError) as error:
        print(f"tmem-testbed: cannot read results: {error}", file=sys.stderr)
        return EXIT_USAGE
    stdout_console().print(report.compare_table(run_a, run_b))
    return 0


def command_report(args: argparse.Namespace) -> int:
    try:
        written = report.write_reports(args.results)
        run = report.load_run(args.results)
    except (OSError, ValueError, KeyError) as error:
        print(f"tmem-testbed: cannot rebuild the report: {error}", file=sys.stderr)
        return EXIT_USAGE
    print_summary(run)
    for path in written[:2]:
        print(f"wrote {path}")
    return 0


def command_list(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({
            "modes": {name: mode.summary for name, mode in MODES.items()},
            "workloads": {kind: {"summary": spec.summary, "parameters": dict(spec.defaults),
                                 "modes": list(spec.modes)}
                          for kind, spec in WORKLOADS.items()},
        }, indent=1))
        return 0
    console = stdout_console()
    modes = Table(title="modes")
    modes.add_column("mode")
    modes.add_column("what it measures")
    for name, mode in MODES.items():
        modes.add_row(name, mode.summary)
    workloads = Table(title="workloads")
    workloads.add_column("kind")
    workloads.add_column("what it does")
    workloads.add_column("parameters (defaults)")
    workloads.add_column("modes")
    for kind, spec in WORKLOADS.items():
        workloads.add_row(kind, spec.summary, ", ".join(f"{k}={v}" for k, v in spec.defaults.items()),
                          "all" if spec.modes == tuple(MODES) else ", ".join(spec.modes))
    console.print(modes)
    console.print(workloads)
    return 0
