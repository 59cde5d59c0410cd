"""Reports from a run's raw data (run.json): summary rows, Markdown, HTML with
plots, a rich table, and the comparison of two runs.

Everything here is a pure function of run.json, so `tmem-testbed report RESULTS`
rebuilds a report byte for byte from the raw samples, and a report never shows a
number that is not in the raw data.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.table import Table

from tmem_host.replies import RemoteGuestStats
from tmem_host.testbed import density, hostmetrics, stats
from tmem_host.testbed.modes import MODES
from tmem_host.testbed.records import MigrationRecord, RunRecord, Sample, TmemdCounter, guest_name

RUN_FILE = "run.json"


def load_run(results: Path) -> RunRecord:
    path = results / RUN_FILE if results.is_dir() else results
    data: RunRecord = json.loads(path.read_text())
    return data


@dataclass(frozen=True, slots=True)
class RemoteRow:
    """A remote mode's figures in tmemd's remote tier, means per run."""

    local_hits: float  # tmem hits served from memory (hits - remote hits)
    remote_hits: float  # pages a get read back from the cluster, checked
    read_around: float  # pages read with them, same round trips (later hits count as local)
    read_ahead: float  # pages read ahead of a sequential stream of gets (later hits count as local)
    remote_share: float | None  # remote hits / tmem hits
    local_pages: float  # where the guest's pages were at the end
    remote_pages: float
    puts: float  # pages put straight to the cluster (memory full)
    demoted: float  # cold pages moved there to make room
    failed_gets: float  # missing, failed their check or unreachable: the guest's read failed
    round_trips: float
    rtt_median: str | None  # the round-trip histogram bucket holding the median, all runs


@dataclass(frozen=True, slots=True)
class ModeRow:
    """One line of the summary: a mode (per guest when several ran at once)."""

    key: str
    mode: str
    samples: int
    failures: int
    wall: stats.Summary | None
    change_pct: float | None  # against the baseline's mean wall time
    welch: stats.WelchResult | None
    swap_out_pages: float | None
    swap_in_pages: float | None
    major_faults: float | None
    tmem_hit_ratio: float | None
    compression_ratio: float | None
    # Where the memory went: what tmemd held for the guest at the end, and the
    # puts it refused (budget or cap; those pages went to the fallback disk).
    tmem_stored_mib: float | None
    tmem_refusals: float | None
    remote: RemoteRow | None = None  # None: no remote tier (or a run from before it)
    # tmemd's CPU time per page it handled (puts + gets), µs: what a page costs the host.
    tmemd_us_per_page: float | None = None  # None: no remote tier (or a run from before it)

    @property
    def mark(self) -> str:
        return stats.significance_mark(self.welch)


def _key(sample: Sample, guests: int) -> str:
    key = str(sample["mode"]) if guests <= 1 else f"{sample['mode']}/{sample['guest']}"
    return f"{key} migrated" if sample.get("migrated") else key


def _mean(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _walls(samples: Sequence[Sample]) -> list[float]:
    return [float(wall) for sample in samples if sample.get("ok") and (wall := sample.get("wall_s")) is not None]


def _hit_ratio(sample: Sample) -> float | None:
    tmemd = sample.get("tmemd")
    gets = tmemd.get("gets") if tmemd else None
    return float(tmemd["hits"]) / gets if tmemd and gets else None


def _tmemd(sample: Sample, name: TmemdCounter) -> float | None:
    tmemd = sample.get("tmemd")
    value = tmemd.get(name) if tmemd else None
    return float(value) if value is not None else None


def _remote(sample: Sample) -> RemoteGuestStats | None:
    tmemd = sample.get("tmemd")
    return tmemd.get("remote") if tmemd else None


def tmemd_us_per_page(samples: Sequence[Sample]) -> dict[tuple[str, int], float]:
    """tmemd's CPU time over the pages it put and got, µs, per (mode, repetition):
    what a page costs the host. The guests of one run share one tmemd, so its time
    is divided by all their pages (runs without tmemd, or without a page, left out)."""
    runs: dict[tuple[str, int, bool], tuple[float, float]] = {}
    for sample in samples:
        cpu_s = (sample.get("host") or {}).get("tmemd_cpu_s")
        puts, gets = _tmemd(sample, "puts"), _tmemd(sample, "gets")
        if cpu_s is None or puts is None or gets is None:
            continue
        key = (sample["mode"], sample["repetition"], bool(sample.get("migrated")))
        pages = runs.get(key, (0.0, 0.0))[1] + puts + gets
        runs[key] = (float(cpu_s), pages)
    return {(mode, repetition): cpu_s * 1e6 / pages
            for (mode, repetition, migrated), (cpu_s, pages) in runs.items() if pages > 0 and not migrated}


def _compression_ratio(sample: Sample) -> float | None:
    """Raw over stored bytes; raw counts the pages in the cluster too, so stored does."""
    tmemd = sample.get("tmemd")
    remote = _remote(sample)
    stored = (tmemd.get("stored_bytes") or 0) + (remote["remote_bytes"] if remote else 0) if tmemd else None
    return float(tmemd["raw_bytes"]) / stored if tmemd and stored else None


def _remote_share(sample: Sample) -> float | None:
    remote = _remote(sample)
    hits = _tmemd(sample, "hits")
    return remote["gets"] / hits if remote is not None and hits else None


def _median_bucket(histograms: Iterable[Mapping[str, int]]) -> str | None:
    """The bucket (upper bound, in the recorded order) holding the median round trip."""
    merged: dict[str, int] = {}
    for histogram in histograms:
        for label, count in histogram.items():
            merged[label] = merged.get(label, 0) + count
    total, seen = sum(merged.values()), 0
    for label, count in merged.items():
        seen += count
        if total and seen * 2 >= total:
            return label
    return None


def summarize_remote(samples: Sequence[Sample]) -> RemoteRow | None:
    """Means over the samples that recorded the remote tier; None if none did."""
    present = [(sample, remote) for sample in samples if (remote := _remote(sample)) is not None]
    if not present:
        return None

    def mean(value: Callable[[Sample, RemoteGuestStats], float]) -> float:
        return sum(float(value(sample, remote)) for sample, remote in present) / len(present)

    return RemoteRow(
        local_hits=mean(lambda s, r: (_tmemd(s, "hits") or 0) - r["gets"]),
        remote_hits=mean(lambda s, r: r["gets"]),
        # Absent from runs recorded before read-around.
        read_around=mean(lambda s, r: r.get("prefetched", 0)),
        read_ahead=mean(lambda s, r: r.get("read_ahead", 0)),
        remote_share=_mean(_remote_share(sample) for sample, _ in present),
        local_pages=mean(lambda s, r: r["local_pages"]),
        remote_pages=mean(lambda s, r: r["remote_pages"]),
        puts=mean(lambda s, r: r["puts"]),
        demoted=mean(lambda s, r: r["demoted"]),
        failed_gets=mean(lambda s, r: r["get_missing"] + r["get_errors"] + r["get_unreachable"]),
        round_trips=mean(lambda s, r: sum(r["rtt_us_histogram"].values())),
        rtt_median=_median_bucket(remote["rtt_us_histogram"] for _, remote in present),
    )


def _vmstat(sample: Sample, name: str) -> float | None:
    value = (sample.get("vmstat") or {}).get(name)
    return float(value) if value is not None else None


def summarize_run(run: RunRecord) -> list[ModeRow]:
    scenario = run["scenario"]
    guests = int(scenario["guests"]["count"])
    groups: dict[str, list[Sample]] = {}
    for sample in run["samples"]:
        groups.setdefault(_key(sample, guests), []).append(sample)
    baseline_walls = _walls([s for s in run["samples"]
                             if s["mode"] == scenario["baseline"] and not s.get("migrated")])
    baseline_mean = stats.summarize(baseline_walls).mean if baseline_walls else None
    per_page = tmemd_us_per_page(run["samples"])
    rows = []
    for mode in scenario["modes"]:
        for key, samples in groups.items():
            if samples[0]["mode"] != mode:
                continue
            walls = _walls(samples)
            wall = stats.summarize(walls) if walls else None
            rows.append(
                ModeRow(
                    key=key,
                    mode=mode,
                    samples=len(samples),
                    failures=sum(1 for s in samples if not s.get("ok")),
                    wall=wall,
                    change_pct=(
                        stats.percent_change(wall.mean, baseline_mean)
                        if wall is not None and baseline_mean is not None
                        else None
                    ),
                    welch=(None if _is_baseline(key, mode, scenario["baseline"])
                           else stats.welch_t_test(walls, baseline_walls)),
                    swap_out_pages=_mean(_vmstat(s, "pswpout") for s in samples),
                    swap_in_pages=_mean(_vmstat(s, "pswpin") for s in samples),
                    major_faults=_mean(_vmstat(s, "pgmajfault") for s in samples),
                    tmem_hit_ratio=_mean(_hit_ratio(s) for s in samples),
                    compression_ratio=_mean(_compression_ratio(s) for s in samples),
                    tmem_stored_mib=_mean(
                        None if (stored := _tmemd(s, "stored_bytes")) is None else stored / (1 << 20)
                        for s in samples
                    ),
                    tmem_refusals=_mean(_tmemd(s, "refusals") for s in samples),
                    remote=summarize_remote(samples),
                    tmemd_us_per_page=_mean(per_page.get((s["mode"], s["repetition"])) for s in samples
                                            if not s.get("migrated")),
                )
            )
    return rows


def _is_baseline(key: str, mode: str, baseline: str) -> bool:
    """The baseline's rows, not its migrated runs (compared with the baseline like any mode)."""
    return mode == baseline and not key.endswith(" migrated")


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


COLUMNS = ("mode", "runs", "wall s (mean ± sd)", "vs baseline", "swap out", "swap in", "major faults",
           "tmem MiB", "refused",
           "tmem hits", "compression", "tmemd µs/page")
# Added when a mode had a remote tier: of the tmem hits, those the cluster served.
REMOTE_COLUMNS = ("remote hits", "remote %")
REMOTE_COLUMNS_NOTE = (" With a remote tier, tmem MiB is what tmemd held in memory and compression "
                       "counts the bytes in the cluster too; remote hits = tmem hits that waited for the "
                       "remote tier to read them back (pages read around or ahead of their gets count as "
                       "local: they were here when the get came), remote % = their share of the tmem hits.")


def columns(rows: Sequence[ModeRow]) -> tuple[str, ...]:
    """The summary's columns: runs without a remote tier keep the table they had."""
    return COLUMNS + REMOTE_COLUMNS if any(row.remote for row in rows) else COLUMNS


def row_cells(row: ModeRow, baseline: str, remote: bool = False, flagged: bool = False) -> list[str]:
    """The summary's cells; ``remote``: with REMOTE_COLUMNS; ``flagged``: the mode's
    standing depends on the guest CPU's speed (CPU_MARK)."""
    wall = "-" if row.wall is None else f"{row.wall.mean:.1f} ± {row.wall.stdev:.1f}"
    if _is_baseline(row.key, row.mode, baseline):
        change = "baseline"
    elif row.change_pct is None:
        change = "-"
    else:
        change = f"{row.change_pct:+.1f}%{row.mark}"
    runs = f"{row.samples - row.failures}/{row.samples}"
    return [
        row.key + (CPU_MARK if flagged else ""),
        runs,
        wall,
        change,
        _fmt(row.swap_out_pages, ".0f"),
        _fmt(row.swap_in_pages, ".0f"),
        _fmt(row.major_faults, ".0f"),
        _fmt(row.tmem_stored_mib, ".0f"),
        _fmt(row.tmem_refusals, ".0f"),
        _fmt(None if row.tmem_hit_ratio is None else row.tmem_hit_ratio * 100, ".1f", "%"),
        _fmt(row.compression_ratio, ".2f", "x"),
        _fmt(row.tmemd_us_per_page, ".0f"),
        *(_remote_hit_cells(row.remote) if remote else ()),
    ]


def _remote_hit_cells(remote: RemoteRow | None) -> list[str]:
    if remote is None:
        return ["-"] * len(REMOTE_COLUMNS)
    share = None if remote.remote_share is None else remote.remote_share * 100
    return [_fmt(remote.remote_hits, ".0f"), _fmt(share, ".1f", "%")]


REMOTE_DETAIL_COLUMNS = ("mode", "pages local", "pages remote", "hits local", "hits remote", "remote %",
                         "read around", "read ahead", "put to cluster", "demoted", "failed reads", "round trips",
                         "round trip median")
REMOTE_NOTE = ("Means per run, at the end of the workload: pages local / remote = the guest's pages in "
               "tmemd's memory / in the cluster; hits remote = pages a get waited for the cluster to "
               "read back (checked), hits local = the other tmem hits (pages in memory, or in the read "
               "cache, where the pages read around and ahead wait for their gets); read around = "
               "pages read in the same round trips as the hits remote, for the gets of neighbouring "
               "slots that followed; read ahead = pages of the next neighbourhoods read while the "
               "guest's gets walked through the swap device in order; put to cluster = puts that went straight there (memory "
               "full); demoted = cold pages moved there to make room; failed reads = remote reads missing, "
               "damaged or unreachable (the guest's read failed); round trips = the guest's pipelines to "
               "the cluster, and the histogram bucket holding their median.")


def remote_detail_cells(row: ModeRow) -> list[str] | None:
    """The remote tier's table row for a mode with one (else None)."""
    remote = row.remote
    if remote is None:
        return None
    return [
        row.key,
        _fmt(remote.local_pages, ".0f"),
        _fmt(remote.remote_pages, ".0f"),
        _fmt(remote.local_hits, ".0f"),
        *_remote_hit_cells(remote),
        _fmt(remote.read_around, ".0f"),
        _fmt(remote.read_ahead, ".0f"),
        _fmt(remote.puts, ".0f"),
        _fmt(remote.demoted, ".0f"),
        _fmt(remote.failed_gets, ".0f"),
        _fmt(remote.round_trips, ".0f"),
        "-" if remote.rtt_median is None else f"{remote.rtt_median} µs",
    ]


def remote_detail_rows(run: RunRecord) -> list[list[str]]:
    return [cells for row in summarize_run(run) if (cells := remote_detail_cells(row)) is not None]


def _add_columns(table: Table, names: Sequence[str]) -> None:
    # A narrow console wraps the headers and figures, never the mode's name.
    for name in names:
        table.add_column(name, justify="left" if name == "mode" else "right", no_wrap=name == "mode")


def summary_table(run: RunRecord, title: str | None = None) -> Table:
    baseline = run["scenario"]["baseline"]
    rows = summarize_run(run)
    names = columns(rows)
    table = Table(title=title or f"{run['scenario']['name']}: workload wall time per mode",
                  caption=" ".join(finding_sentences(run)) or None, caption_justify="left")
    _add_columns(table, names)
    for row in rows:
        table.add_row(*row_cells(row, baseline, names != COLUMNS, cpu_flagged(run, row.mode)))
    return table


def remote_table(run: RunRecord) -> Table | None:
    """The remote tier's figures per mode that had one (None: no such mode)."""
    return _detail_table(f"{run['scenario']['name']}: tmemd's remote tier (means per run)",
                         REMOTE_DETAIL_COLUMNS, remote_detail_rows(run))


def _detail_table(title: str, names: Sequence[str], rows: Sequence[Sequence[str]]) -> Table | None:
    if not rows:
        return None
    table = Table(title=title)
    _add_columns(table, names)
    for cells in rows:
        table.add_row(*cells)
    return table


def _markdown_rows(names: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names),
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def markdown_table(run: RunRecord) -> str:
    baseline = run["scenario"]["baseline"]
    rows = summarize_run(run)
    names = columns(rows)
    return "\n".join(_markdown_rows(names, (row_cells(row, baseline, names != COLUMNS, cpu_flagged(run, row.mode))
                                            for row in rows)))


def remote_lines(run: RunRecord) -> list[str]:
    """Modes with a remote tier: where the guest's pages were and which tier served
    its reads."""
    details = remote_detail_rows(run)
    if not details:
        return []
    return ["## Remote tier", "", *_markdown_rows(REMOTE_DETAIL_COLUMNS, details), "",
            REMOTE_NOTE, ""]



MIGRATION_COLUMNS = ("mode", "runs", "wall s still", "wall s migrated", "slowdown", "at s", "migration ms",
                     "downtime ms", "RAM sent MiB", "stopped s", "handoff MiB", "pages from tmem")
MIGRATION_NOTE = ("Means per run. wall s: the host's, from the workload's launch to its result (the same "
                  "way with and without the migration); slowdown = migrated / still; at s: when the migration began; migration and "
                  "downtime ms: QEMU's query-migrate; RAM sent: what QEMU's stream carried; stopped s: "
                  "from the source's stop to the destination's cont (QEMU's downtime plus tmemd's "
                  "handoff and restore); handoff MiB: the state tmemd a wrote for tmemd b (remote pages "
                  "by key); pages from tmem: swap pages tmemd b served after the switch.")


MigrationFigure = Literal["total_ms", "downtime_ms", "ram_bytes", "handoff_s", "handoff_bytes",
                          "served_from_tmem", "started_s"]


def _migrations(run: RunRecord, mode: str) -> list[MigrationRecord]:
    return [migration for s in run["samples"] if s["mode"] == mode and s.get("ok") and s.get("migrated")
            and (migration := s.get("migration")) is not None]


def migration_rows(run: RunRecord) -> list[list[str]]:
    """A migration scenario's figures per mode (none for other scenarios)."""
    if not run["scenario"].get("migration"):
        return []
    rows = []
    for mode in run["scenario"]["modes"]:
        still = _mean(_walls([s for s in run["samples"] if s["mode"] == mode and not s.get("migrated")]))
        moved_samples = [s for s in run["samples"] if s["mode"] == mode and s.get("migrated")]
        moved = _mean(_walls(moved_samples))
        migrations = _migrations(run, mode)

        def mean(name: MigrationFigure, scale: float = 1.0) -> float | None:
            return _mean(float(m[name]) / scale for m in migrations)

        rows.append([mode, str(len(moved_samples)), _fmt(still, ".1f"), _fmt(moved, ".1f"),
                     _fmt(moved / still if moved is not None and still else None, ".2f", "x"),
                     _fmt(mean("started_s"), ".1f"), _fmt(mean("total_ms"), ".0f"), _fmt(mean("downtime_ms"), ".0f"),
                     _fmt(mean("ram_bytes", 1 << 20), ".0f"), _fmt(mean("handoff_s"), ".2f"),
                     _fmt(mean("handoff_bytes", 1 << 20), ".1f"), _fmt(mean("served_from_tmem"), ".0f")])
    return rows


def migration_sentences(run: RunRecord) -> str:
    """The result in two sentences, from the figures."""
    modes = [mode for mode in run["scenario"]["modes"] if _migrations(run, mode)]
    if not modes:
        return ""

    def figure(mode: str, name: MigrationFigure) -> float:
        return _mean(float(m[name]) for m in _migrations(run, mode)) or 0.0

    slowdowns = {}
    for mode in modes:
        still = _mean(_walls([s for s in run["samples"] if s["mode"] == mode and not s.get("migrated")]))
        moved = _mean(_walls([s for s in run["samples"] if s["mode"] == mode and s.get("migrated")]))
        if still and moved is not None:
            slowdowns[mode] = moved / still
    stopped = {mode: figure(mode, "handoff_s") for mode in modes}
    least, most = min(stopped, key=stopped.__getitem__), max(stopped, key=stopped.__getitem__)
    first = ((f"Migrating mid-workload cost {min(slowdowns.values()):.2f}x to {max(slowdowns.values()):.2f}x "
              f"of the unmigrated wall time ({', '.join(f'{m} {x:.2f}x' for m, x in slowdowns.items())}); "
              if slowdowns else "")
             + f"the guest stood still {stopped[least]:.2f} s ({least}) to {stopped[most]:.2f} s ({most}), "
             "tmemd's handoff and restore included.")
    ram = {mode: figure(mode, "ram_bytes") / (1 << 20) for mode in modes}
    swapping = [mode for mode in modes if mode != "bigmem"]
    tmem = [mode for mode in modes if mode.startswith("tmem")]
    if "bigmem" in ram and swapping:
        low, high = min(ram[m] for m in swapping), max(ram[m] for m in swapping)
        second = (f"QEMU sent {low:.0f}-{high:.0f} MiB of RAM for the swapping modes against "
                  f"{ram['bigmem']:.0f} MiB for bigmem ({ram['bigmem'] / max(low, 1):.1f}x): their swapped "
                  "pages stayed on the shared disk or with tmemd")
        if tmem:
            second += (", and tmemd handed them over in "
                       + ", ".join(f"{figure(m, 'handoff_bytes') / (1 << 20):.0f} MiB ({m})" for m in tmem)
                       + (", remote pages by key" if "tmem-remote" in tmem else ""))
        second += "."
    else:
        second = "RAM sent per mode: " + ", ".join(f"{m} {ram[m]:.0f} MiB" for m in modes) + "."
    return f"{first} {second}"


def migration_lines(run: RunRecord) -> list[str]:
    rows = migration_rows(run)
    if not rows:
        return []
    return ["## Live migration", "", migration_sentences(run), "", *_markdown_rows(MIGRATION_COLUMNS, rows),
            "", MIGRATION_NOTE, ""]


def migration_table(run: RunRecord) -> Table | None:
    return _detail_table(f"{run['scenario']['name']}: live migration mid-workload (means per run)",
                         MIGRATION_COLUMNS, migration_rows(run))


MEMORY_LABELS = {"total": "host peak MiB", "qemu_rss": "QEMU RSS", "tmemd_rss": "tmemd RSS",
                 "redis_rss": "Redis RSS", "guest_file_cache": "guest images cached",
                 "tmemd_file_cache": "tmemd files cached", "root_image_cache": "root image cached"}
MEMORY_COLUMNS = ("mode", *MEMORY_LABELS.values())
MEMORY_NOTE = ("Means per run of each component's peak, MiB; host peak = the peak of their sum at one "
               "instant, the shared root image left out. RSS: resident memory of the guests' QEMUs, tmemd and a remote mode's Redis "
               "nodes; cached: host page cache (mincore) of the files they hold open: the guests' disk "
               "images (a disk mode's swap lands there), tmemd's journal and NBD fallback, and the root "
               "image every guest boots from (shared, the same in every mode).")


def memory_rows(run: RunRecord) -> list[list[str]]:
    """Host memory per mode by component (runs before the sampler had none)."""
    guests = int(run["scenario"]["guests"]["count"])
    rows = []
    for mode in run["scenario"]["modes"]:
        groups: dict[str, list[dict[str, int]]] = {}
        for sample in run["samples"]:
            # One host figure per run: every guest's sample carries the same timeline.
            if sample["mode"] == mode and sample.get("ok") and (peaks := sample.get("host_memory")) \
                    and (guests <= 1 or sample["guest"] == "g0"):
                key = f"{mode} migrated" if sample.get("migrated") else mode
                groups.setdefault(key, []).append(peaks)
        for key, runs in groups.items():
            rows.append([key, *(_fmt(_mean(p[name] / (1 << 20) if name in p else None for p in runs), ".0f")
                                for name in MEMORY_LABELS)])
    return rows


def memory_lines(run: RunRecord) -> list[str]:
    rows = memory_rows(run)
    if not rows:
        return []
    return ["## Host memory", "", *_markdown_rows(MEMORY_COLUMNS, rows), "", MEMORY_NOTE, ""]


def memory_table(run: RunRecord) -> Table | None:
    return _detail_table(f"{run['scenario']['name']}: host memory by component (MiB, peaks, means per run)",
                         MEMORY_COLUMNS, memory_rows(run))


DENSITY_ALONE = "alone"  # runner.DENSITY_ALONE: the reference runs' samples
DENSITY_COLUMNS = ("policy", "runs", "work MiB/min (mean ± sd)", "vs static", "makespan s", "slowdown mean",
                   "slowdown worst", "Jain", "swap out MiB/guest", "tmem puts MiB/guest", "refused MiB/guest",
                   "committed peak MiB", "budget MiB", "held")
DENSITY_NOTE = ("Means over runs. work = the hungry phases the guests completed and verified (MiB of working set "
                "each; with phase = build, builds) per minute of the run's makespan (launch to the last guest's "
                "last phase); slowdown = a "
                "guest's mean phase time over the same phase run alone in a guest with enough RAM (the "
                "repetition's reference), mean over guests and the worst guest; Jain = Jain's fairness index "
                "of the guests' 1/slowdown (1: all alike); swap out = guest /proc/vmstat pswpout; tmem puts "
                "and refused = tmemd's puts for the guest and those it refused (to the fallback disk, as slow "
                "as the hdd); committed peak = the most the guests' RAM (balloon actual) plus tmemd's used "
                "bytes came to at one tick of the monitor (every second); held = never above the budget M.")


@dataclass(frozen=True, slots=True)
class DensityRun:
    """One repetition of one density policy."""

    work_per_min: float  # in density.work_unit's unit
    makespan_s: float
    slowdowns: list[float]  # per guest
    swap_out_mib: list[float]
    tmem_put_mib: list[float]
    refused_mib: list[float]
    committed_peak: int
    budget: int


def density_runs(run: RunRecord, mode: str) -> list[DensityRun]:
    """The policy's runs in which every guest verified and the reference ran."""
    scenario = run["scenario"]
    unit, _ = density.work_unit(scenario["params"])
    alone = {s["repetition"]: float(wall) for s in run["samples"]
             if s["mode"] == DENSITY_ALONE and s.get("ok") and (wall := s.get("wall_s"))}
    runs = []
    for repetition in range(scenario["repetitions"]):
        samples = [s for s in run["samples"] if s["mode"] == mode and s["repetition"] == repetition]
        first = next((s for s in samples if s.get("density")), None)
        if not samples or not all(s.get("ok") for s in samples) or first is None or repetition not in alone:
            continue
        record = first["density"]
        phases = [[float(p) for p in (s.get("workload") or {}).get("phase_s", [])] for s in samples]
        slowdowns = [sum(p) / len(p) / alone[repetition] for p in phases if p]
        tmemd = [s.get("tmemd") for s in samples]
        runs.append(DensityRun(
            work_per_min=sum(len(p) for p in phases) * unit / record["makespan_s"] * 60,
            makespan_s=record["makespan_s"], slowdowns=slowdowns,
            swap_out_mib=[(_vmstat(s, "pswpout") or 0) * 4096 / (1 << 20) for s in samples],
            tmem_put_mib=[(t["puts"] if t else 0) * 4096 / (1 << 20) for t in tmemd],
            refused_mib=[(t["refusals"] if t else 0) * 4096 / (1 << 20) for t in tmemd],
            committed_peak=record["committed_peak_bytes"], budget=record["budget_bytes"]))
    return runs


def _per_guest(runs: Sequence[DensityRun], values: Callable[[DensityRun], list[float]]) -> float | None:
    return _mean(sum(values(r)) / len(values(r)) for r in runs if values(r))


def density_rows(run: RunRecord) -> list[list[str]]:
    if run["scenario"]["workload"] != "density":
        return []
    reference = [r.work_per_min for r in density_runs(run, "static")]
    digits = 2 if _builds(run) else 0
    rows = []
    for mode in run["scenario"]["modes"]:
        runs = density_runs(run, mode)
        total = sum(1 for r in range(run["scenario"]["repetitions"])
                    if any(s["mode"] == mode and s["repetition"] == r for s in run["samples"]))
        work = stats.summarize([r.work_per_min for r in runs]) if runs else None
        if mode == "static" or work is None or not reference:
            change = "baseline" if mode == "static" and work is not None else "-"
        else:
            welch = stats.welch_t_test([r.work_per_min for r in runs], reference)
            change = (f"{stats.percent_change(work.mean, sum(reference) / len(reference)):+.1f}%"
                      f"{stats.significance_mark(welch)}")
        held = all(r.committed_peak <= r.budget + (1 << 20) for r in runs)
        rows.append([
            mode, f"{len(runs)}/{total}",
            "-" if work is None else f"{work.mean:.{digits}f} ± {work.stdev:.{digits}f}", change,
            _fmt(_mean(r.makespan_s for r in runs), ".1f"),
            _fmt(_mean(sum(r.slowdowns) / len(r.slowdowns) for r in runs if r.slowdowns), ".2f", "x"),
            _fmt(_mean(max(r.slowdowns) for r in runs if r.slowdowns), ".2f", "x"),
            _fmt(_mean(jain for r in runs if (jain := density.jain_index([1 / x for x in r.slowdowns]))), ".3f"),
            _fmt(_per_guest(runs, lambda r: r.swap_out_mib), ".0f"),
            _fmt(_per_guest(runs, lambda r: r.tmem_put_mib), ".0f"),
            _fmt(_per_guest(runs, lambda r: r.refused_mib), ".0f"),
            _fmt(_mean(r.committed_peak / (1 << 20) for r in runs), ".0f"),
            _fmt(_mean(r.budget / (1 << 20) for r in runs), ".0f"),
            ("yes" if held else "NO") if runs else "-",
        ])
    return rows


def density_sentences(run: RunRecord) -> list[str]:
    """Whether tmem let the host do more work with the same memory, and by how much
    against static and ballooning."""
    work = {mode: [r.work_per_min for r in density_runs(run, mode)] for mode in run["scenario"]["modes"]}
    work = {mode: values for mode, values in work.items() if values}
    if not work:
        return []
    means = {mode: sum(values) / len(values) for mode, values in work.items()}
    best = max(means, key=means.__getitem__)
    budget = run["scenario"]["budget_bytes"] >> 20
    first = (f"With the same {budget} MiB for {run['scenario']['guests']['count']} guests' RAM and tmem, "
             f"{best} did the most work: {_amount(run, means[best])} "
             f"{'verified builds' if _builds(run) else 'MiB of verified hungry phases'} per minute")
    others = [f"{mode} {_amount(run, means[mode])} ({(means[best] / means[mode] - 1) * 100:+.0f}% for {best}, "
              f"{_significance(stats.welch_t_test(work[best], work[mode]))})"
              for mode in means if mode != best and means[mode] > 0]
    sentences = [first + (f", against {'; '.join(others)}." if others else ".")]
    for tmem_mode, rival in (("tmem", "balloon"), ("tmem-balloon", "balloon"), ("tmem", "static")):
        if tmem_mode in means and rival in means and tmem_mode != best and rival != best:
            change = (means[tmem_mode] / means[rival] - 1) * 100
            sentences.append(f"{tmem_mode} against {rival}: {change:+.0f}% work per minute "
                             f"({_significance(stats.welch_t_test(work[tmem_mode], work[rival]))}).")
    rows = {row[0]: row for row in density_rows(run)}
    broke = [mode for mode, row in rows.items() if row[-1] == "NO"]
    sentences.append("Every policy held its budget (the monitor's committed peak never exceeded M)." if not broke
                     else f"Over budget at some tick: {', '.join(broke)} (see committed peak).")
    return sentences


def _builds(run: RunRecord) -> bool:
    return density.work_unit(run["scenario"]["params"])[1] == "builds/min"


def _amount(run: RunRecord, per_minute: float) -> str:
    return f"{per_minute:.2f}" if _builds(run) else f"{per_minute:.0f}"


def density_columns(run: RunRecord) -> tuple[str, ...]:
    """DENSITY_COLUMNS with the work column in the scenario's unit."""
    unit = density.work_unit(run["scenario"]["params"])[1]
    return tuple(f"work {unit} (mean ± sd)" if name.startswith("work ") else name for name in DENSITY_COLUMNS)


def density_lines(run: RunRecord) -> list[str]:
    rows = density_rows(run)
    if not rows:
        return []
    return ["## Density", "", *_markdown_rows(density_columns(run), rows), "", DENSITY_NOTE, ""]


def density_table(run: RunRecord) -> Table | None:
    return _detail_table(f"{run['scenario']['name']}: policies under one host budget (means per run)",
                         density_columns(run), density_rows(run))


# A guest CPU this many times slower than the host's makes guest-CPU-bound rows
# (Mode.guest_cpu) rank by emulation as much as by design.
CPU_FACTOR_FLAG = 1.5
CPU_MARK = "†"


def cpu_factor(run: RunRecord) -> float | None:
    """The guest CPU's slowdown against the host's (the larger of the two kinds)."""
    calibration = run["metadata"].get("calibration")
    if calibration is None:
        return None
    return max(calibration["python_factor"], calibration["lz4_factor"] or 0.0)


def cpu_flagged(run: RunRecord, mode: str) -> bool:
    factor = cpu_factor(run)
    known = MODES.get(mode)
    return factor is not None and factor >= CPU_FACTOR_FLAG and known is not None and bool(known.guest_cpu)


def title(run: RunRecord) -> str:
    """The report's title: the scenario, the accelerator and the calibration."""
    meta = run["metadata"]
    accelerator = meta.get("accelerator", "accelerator unknown").upper()
    calibration = meta.get("calibration")
    speed = ""
    if calibration is not None:
        speed = f", guest CPU {calibration['python_factor']:.1f}x slower than the host's (Python)"
        if calibration["lz4_factor"]:
            speed += f", {calibration['lz4_factor']:.1f}x (lz4)"
    return f"tmem-testbed: {run['scenario']['name']} ({accelerator}{speed})"


def _significance(welch: stats.WelchResult | None) -> str:
    if welch is None:
        return "too few runs to test"
    if welch.significant:
        return f"p = {welch.p_value:.3g}, Welch's t-test"
    return f"not significant: p = {welch.p_value:.2f}"


# A page-cache run whose slow disk costs less than this over bigmem cannot show a
# cache's worth (issue 18: the sequential pagecache scenario's gap was 1.14x).
MIN_DISK_GAP = 2.0
DISK_GAP_MARK = "(!)"


def finding_sentences(run: RunRecord) -> list[str]:
    """What the run found, in a few generated sentences: the winner, by how much and
    how sure, the order of the rest, host memory, and the calibration caveat."""
    if run["scenario"]["workload"] == "density":
        return (density_sentences(run) + _kv_sentences(run, run["scenario"]["modes"])
                + _calibration_sentences(run, run["scenario"]["modes"]))
    baseline = run["scenario"]["baseline"]
    rows = [row for row in summarize_run(run) if row.wall is not None and not row.key.endswith(" migrated")]
    floors = [row for row in rows if (known := MODES.get(row.mode)) is not None and known.enough_memory]
    contenders = [row for row in rows if row not in floors]
    if not contenders:
        return []
    ranked = sorted(contenders, key=lambda row: row.wall.mean if row.wall else 0.0)
    best = ranked[0]
    assert best.wall is not None
    first = f"{best.key} was the fastest of the {len(contenders)} memory-starved modes ({best.wall.mean:.1f} s mean"
    if best.mode != baseline and best.change_pct is not None:
        first += (f", {abs(best.change_pct):.0f}% {'less' if best.change_pct < 0 else 'more'} wall time than "
                  f"the baseline {baseline}; {_significance(best.welch)}")
    first += ")"
    if floors and floors[0].wall is not None:
        first += f"; bigmem, with enough RAM, took {floors[0].wall.mean:.1f} s ({best.wall.mean / floors[0].wall.mean:.2f}x)"
    sentences = [first + "."]
    if len(ranked) > 1:
        sentences.append("The rest, in order of wall time against the fastest: " + ", ".join(
            f"{row.key} {row.wall.mean / best.wall.mean:.2f}x{stats.significance_mark(row.welch)}"
            for row in ranked[1:] if row.wall is not None) + ".")
    sentences += _kv_sentences(run, [row.mode for row in contenders])
    sentences += disk_gap_sentences(rows)
    sentences += shared_pool_sentences(run)
    memory = {row[0]: row[1] for row in memory_rows(run)}
    if best.key in memory and len(memory) > 1:
        others = [f"{key} {value}" for key, value in memory.items() if key != best.key]
        sentences.append(f"At its peak the run took {memory[best.key]} MiB of host memory with {best.key} "
                         f"(RSS and page cache, the shared root image left out), against {', '.join(others)} MiB.")
    sentences += _calibration_sentences(run, [row.mode for row in rows])
    return sentences


def disk_gap_sentences(rows: Sequence[ModeRow]) -> list[str]:
    """How much a cache could save at most: the slow disk against a guest that holds
    everything in RAM. Under MIN_DISK_GAP the disk is not the bottleneck and the
    run says little about caching (flagged)."""
    walls = {row.key: row.wall.mean for row in rows if row.wall is not None}
    if "disk-hdd" not in walls or "bigmem" not in walls or walls["bigmem"] <= 0:
        return []
    gap = walls["disk-hdd"] / walls["bigmem"]
    sentence = f"disk-hdd took {gap:.2f}x bigmem's wall time: the most any cache could save"
    if gap < MIN_DISK_GAP:
        return [f"{DISK_GAP_MARK} {sentence}, under {MIN_DISK_GAP:.0f}x: the disk is not the bottleneck here, "
                "so this run says little about caching (a scenario meant to measure one needs a wider gap)."]
    return [sentence + "."]


def _kv_sentences(run: RunRecord, modes: Sequence[str]) -> list[str]:
    """The key-value server's tail: what its users feel of a swapping server."""
    if _application(run) not in ("kv", "density-kv"):
        return []
    tails = {}
    for mode in modes:
        value = _mean(w["latency"]["p999_ms"] for w in _application_results(run, mode) if "latency" in w)
        if value is not None:
            tails[mode] = value
    if len(tails) < 2:
        return []
    ranked = sorted(tails, key=tails.__getitem__)
    return [f"The server's p99.9 GET latency was lowest with {ranked[0]} ({tails[ranked[0]]:.1f} ms), then "
            + ", ".join(f"{mode} {tails[mode]:.1f} ms" for mode in ranked[1:]) + "."]


def _calibration_sentences(run: RunRecord, modes: Sequence[str]) -> list[str]:
    calibration = run["metadata"].get("calibration")
    factor = cpu_factor(run)
    if calibration is None or factor is None:
        return []
    accelerator = run["metadata"].get("accelerator", "unknown").upper()
    measured = (f"The guest CPU ran {calibration['python_factor']:.1f}x slower than the host's on pure Python"
                + (f" and {calibration['lz4_factor']:.1f}x on lz4" if calibration["lz4_factor"] else "")
                + f" ({accelerator})")
    flagged = [mode for mode in modes if cpu_flagged(run, mode)]
    if not flagged:
        return [measured + (": no mode here spends much guest CPU." if factor >= CPU_FACTOR_FLAG
                            else ": no row depends on emulation.")]
    reasons = "; ".join(dict.fromkeys(MODES[mode].guest_cpu for mode in flagged))
    return [measured + f": the rows marked {CPU_MARK} ({', '.join(flagged)}) spend guest CPU ({reasons}), so "
            "their ranking depends on that factor; under KVM, where the guest CPU runs near the host's speed, "
            "those rows would gain the most and could overtake the others."]


def _metadata_lines(run: RunRecord) -> list[str]:
    meta: Mapping[str, object] = run.get("metadata", {})
    lines = []
    if calibration := run["metadata"].get("calibration"):
        guest, host = calibration["guest"], calibration["host"]
        lines.append(f"- calibration (tmem_workloads.cpubench, best of 3): pure Python {guest['python_s']:.3f} s "
                     f"in the guest, {host['python_s']:.3f} s on the host ({calibration['python_factor']:.2f}x); "
                     f"lz4 {_fmt(guest['lz4_s'], '.3f')} s / {_fmt(host['lz4_s'], '.3f')} s "
                     f"({_fmt(calibration['lz4_factor'], '.2f', 'x')})")
    names = {
        "qemu_version": "QEMU",
        "accelerator": "accelerator (as QMP reports it)",
        "guest_kernel": "guest kernel",
        "image_hash": "image",
        "host_cpu": "host CPU",
        "host_load": "host load (1/5/15 min, at start)",
        "started": "started",
        "finished": "finished",
    }
    return [f"- {label}: {meta[key]}" for key, label in names.items() if key in meta] + lines


# The application workloads' own figures, per mode: (column, what a sample's
# workload result gives for it); means over the runs that verified.
KV_FIGURES: tuple[tuple[str, Callable[[Mapping[str, Any]], float | None]], ...] = (
    ("GET/s", lambda w: w["latency"]["requests_per_s"]), ("p50 ms", lambda w: w["latency"]["p50_ms"]),
    ("p99 ms", lambda w: w["latency"]["p99_ms"]), ("p99.9 ms", lambda w: w["latency"]["p999_ms"]),
    ("max ms", lambda w: w["latency"]["max_ms"]), ("load s", lambda w: w["load_s"]),
    ("benchmark s", lambda w: w["bench_s"]))
APPLICATION_FIGURES: dict[str, tuple[tuple[str, Callable[[Mapping[str, Any]], float | None]], ...]] = {
    "kv": KV_FIGURES,
    "density-kv": (*KV_FIGURES, ("verify s", lambda w: w["verify_s"])),
    "build": (("build s", lambda w: w["build_s"]), ("extract s", lambda w: w["extract_s"]),
              ("check s", lambda w: w.get("check_s")), ("objects", lambda w: w["objects"])),
    "command": (("metric", lambda w: w.get("metric")), ("run s", lambda w: w["total_s"])),
}
APPLICATION_NOTES = {
    "kv": ("Means per run. redis-benchmark's GETs of random keys of the set, from the host through a "
           "forwarded port (one request in flight per connection); latency percentiles from its HDR "
           "histogram (the first bucket at or above the percentile). load s: SETting the set, pipelined; "
           "every value was read back and compared after the benchmark."),
    "density-kv": ("Means per hungry phase (alone: the same phase in one guest with enough RAM, the "
                   "slowdown reference). redis-benchmark's GETs of random keys, run in the guest beside its "
                   "server (one request in flight per connection); latency percentiles from its HDR histogram. "
                   "load s: SETting the phase's values, pipelined; verify s: reading every value back and "
                   "comparing, after the benchmark."),
    "build": ("Means per run. build s: make -j<vCPUs> of Lua 5.4 in the workload's memory cgroup; check s: the "
              "built interpreter running a program whose answer the workload checks."),
    "command": "Means per run. metric: the number the scenario's metric pattern found in run's output.",
}


def _application(run: RunRecord) -> str | None:
    """The application whose own figures the run has: its workload, or a density
    run's kv phase (APPLICATION_FIGURES and APPLICATION_NOTES key)."""
    scenario = run["scenario"]
    if scenario["workload"] == "density":
        return "density-kv" if scenario["params"].get("phase") == "kv" else None
    return scenario["workload"] if scenario["workload"] in APPLICATION_FIGURES else None


def _application_results(run: RunRecord, mode: str) -> list[Mapping[str, Any]]:
    """The mode's verified results: one per run, or in a density run one per hungry
    phase (a guest's phases are its workload's `bursts`)."""
    workloads: list[Mapping[str, Any]] = [s["workload"] for s in run["samples"]
                                          if s["mode"] == mode and s.get("ok") and s.get("workload")]
    if run["scenario"]["workload"] != "density":
        return workloads
    return [phase for workload in workloads for phase in workload.get("bursts", [workload])]


def application_columns(run: RunRecord) -> tuple[str, ...]:
    application = _application(run)
    names = [name for name, _ in APPLICATION_FIGURES.get(application or "", ())]
    if application == "command":
        names[0] = str(run["scenario"]["params"].get("metric_name") or "metric")
    return ("policy", "phases", *names) if application == "density-kv" else ("mode", "runs", *names)


def application_rows(run: RunRecord) -> list[list[str]]:
    application = _application(run)
    if application is None:
        return []
    figures = APPLICATION_FIGURES[application]
    # A density run's policies after the reference: the same phase alone with enough RAM.
    modes = [DENSITY_ALONE, *run["scenario"]["modes"]] if application == "density-kv" else run["scenario"]["modes"]
    rows = []
    for mode in modes:
        if results := _application_results(run, mode):
            rows.append([mode, str(len(results)),
                         *(_fmt(_mean(figure(w) for w in results), ".0f" if name in ("GET/s", "objects") else
                                ".2f" if name.endswith("ms") else ".1f") for name, figure in figures)])
    return rows


def application_note(run: RunRecord) -> str:
    return APPLICATION_NOTES[_application(run) or ""]


def application_lines(run: RunRecord) -> list[str]:
    rows = application_rows(run)
    if not rows:
        return []
    return ["## Application", "", *_markdown_rows(application_columns(run), rows), "", application_note(run), ""]


def application_table(run: RunRecord) -> Table | None:
    unit = "per phase" if _application(run) == "density-kv" else "per run"
    return _detail_table(f"{run['scenario']['name']}: the application's own figures (means {unit})",
                         application_columns(run), application_rows(run))


def _pass_figures(run: RunRecord) -> dict[str, tuple[list[float | None], list[float | None]]]:
    """Per mode (per mode and guest when several ran): each pass's mean time and
    mean tmem hits, over the repetitions."""
    guests = run["scenario"]["guests"]["count"]
    keys: dict[str, list[dict[str, Any]]] = {}
    for sample in run["samples"]:
        if sample.get("ok") and (sample.get("workload") or {}).get("pass_s"):
            keys.setdefault(_key(sample, guests), []).append(sample["workload"])
    figures = {}
    for key, workloads in keys.items():
        passes = range(min(len(w["pass_s"]) for w in workloads))
        figures[key] = ([_mean(w["pass_s"][i] for w in workloads) for i in passes],
                        [_mean(w["pass_tmemd"][i]["hits"] if "pass_tmemd" in w else None for w in workloads)
                         for i in passes])
    return figures


def pass_lines(run: RunRecord) -> list[str]:
    """Workloads that read in passes (pagecache): each pass's mean time per mode, and
    the tmem hits in it (the second pass is the one cleancache should serve)."""
    header = ["## Passes", "", "| mode | pass times s (mean) | tmem hits per pass (mean) |", "|---|---|---|"]
    rows = [f"| {key} | {' / '.join(_fmt(t, '.1f') for t in times)} | {' / '.join(_fmt(h, '.0f') for h in hits)} |"
            for key, (times, hits) in _pass_figures(run).items()]
    return header + rows + [""] if rows else []


def shared_pool_sentences(run: RunRecord) -> list[str]:
    """A shared_image run: how much faster the last guest's first pass was with one
    shared pool than with private ones (it reads what the guests before it read)."""
    if not run["scenario"]["params"].get("shared_image"):
        return []
    figures = _pass_figures(run)
    last = guest_name(run["scenario"]["guests"]["count"] - 1)
    shared = figures.get(f"tmem-cache-shared/{last}", ([], []))[0]
    private = figures.get(f"tmem-cache/{last}", ([], []))[0]
    if not shared or not private or shared[0] is None or private[0] is None or shared[0] <= 0:
        return []
    return [f"{last}'s first pass took {shared[0]:.1f} s through the shared pool against {private[0]:.1f} s "
            f"through a private one ({private[0] / shared[0]:.2f}x faster): it read what the guests before it "
            "had brought in."]


def render_markdown(run: RunRecord, plots: Sequence[str] = ()) -> str:
    scenario = run["scenario"]
    failures = [s for s in run["samples"] if not s.get("ok")]
    lines = [
        f"# {title(run)}",
        "",
        scenario.get("description") or "",
        "",
        *(f"{sentence}\n" for sentence in finding_sentences(run)),
        f"Workload `{scenario['workload']}` {json.dumps(scenario['params'], sort_keys=True)}; "
        f"{scenario['guests']['count']} guest(s) of {scenario['guests']['memory_mib']} MiB; "
        f"{scenario['repetitions']} repetition(s); baseline `{scenario['baseline']}`.",
        "",
        markdown_table(run),
        "",
        "`*` p < 0.05, `**` p < 0.01 (Welch's t-test against the baseline's wall times); "
        "swap in/out and major faults are guest /proc/vmstat deltas in pages, mean per run; "
        "tmem MiB = what tmemd held for the guest at the end (stored bytes); refused = puts tmemd "
        "refused (budget or cap: those pages went to the fallback); "
        "tmem hits = tmemd gets that hit; compression = raw / stored bytes in tmemd."
        + (REMOTE_COLUMNS_NOTE if remote_detail_rows(run) else "")
        + (f" {CPU_MARK}: the mode spends guest CPU, so its standing depends on how fast the guest "
           "CPU ran (the calibration above)." if any(cpu_flagged(run, mode) for mode in scenario["modes"]) else ""),
        "",
    ]
    lines += pass_lines(run)
    lines += application_lines(run)
    lines += density_lines(run)
    lines += memory_lines(run)
    lines += remote_lines(run)
    lines += migration_lines(run)
    if failures:
        lines += ["## Failures", ""]
        lines += [f"- {s['mode']} #{s['repetition']} {s.get('guest', '')}: {s.get('error')}" for s in failures]
        lines.append("")
    lines += ["## Run", "", *_metadata_lines(run), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}](plots/{name}.png)" for name in plots] + [""]
    return "\n".join(lines)


def make_plots(run: RunRecord) -> dict[str, bytes]:
    """PNG plots: runtime per mode (error bars), swap I/O, tmem hit ratio, host memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize_run(run)
    labels = [row.key for row in rows]
    plots: dict[str, bytes] = {}

    def save(name: str, figure: Any) -> None:
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=96)
        plt.close(figure)
        plots[name] = buffer.getvalue()

    figure, axes = plt.subplots(figsize=(8, 4))
    axes.bar(labels, [r.wall.mean if r.wall else 0 for r in rows],
             yerr=[r.wall.stdev if r.wall else 0 for r in rows], capsize=4, color="#4c72b0")
    axes.set_ylabel("workload wall time (s)")
    axes.set_title("runtime per mode (mean ± sd)")
    axes.tick_params(axis="x", rotation=30)
    save("runtime", figure)

    figure, axes = plt.subplots(figsize=(8, 4))
    positions = range(len(rows))
    axes.bar([p - 0.2 for p in positions], [r.swap_out_pages or 0 for r in rows], width=0.4, label="pswpout")
    axes.bar([p + 0.2 for p in positions], [r.swap_in_pages or 0 for r in rows], width=0.4, label="pswpin")
    axes.set_xticks(list(positions), labels, rotation=30)
    axes.set_ylabel("pages (guest /proc/vmstat)")
    axes.set_title("guest swap I/O per run")
    axes.legend()
    save("swap_io", figure)

    tmem_rows = [r for r in rows if r.tmem_hit_ratio is not None]
    if tmem_rows:
        figure, axes = plt.subplots(figsize=(8, 4))
        # A remote tier's share of the hits stacked on top of the memory's.
        hits = [(r.tmem_hit_ratio or 0) * 100 for r in tmem_rows]
        remote = [hit * (r.remote.remote_share or 0) if r.remote else 0 for hit, r in zip(hits, tmem_rows)]
        local = [hit - share for hit, share in zip(hits, remote)]
        keys = [r.key for r in tmem_rows]
        axes.bar(keys, local, color="#55a868", label="from memory")
        if any(remote):
            axes.bar(keys, remote, bottom=local, color="#c44e52", label="from the cluster")
            axes.legend()
        axes.set_ylabel("gets that hit (%)")
        axes.set_ylim(0, 100)
        axes.set_title("tmem hit ratio")
        axes.tick_params(axis="x", rotation=30)
        save("tmem_hits", figure)

    timelines = [s for s in run["samples"] if s.get("timeline") and s["guest"] == "g0"]
    if timelines:
        # One colour per mode, one line style per repetition: a line per run, and
        # the legend names each mode once.
        figure, axes = plt.subplots(figsize=(8, 4))
        modes = list(dict.fromkeys(s["mode"] + (" migrated" if s.get("migrated") else "") for s in timelines))
        colours = plt.get_cmap("tab10" if len(modes) <= 10 else "tab20")
        styles = ["-", "--", ":", "-."]
        labelled: set[str] = set()
        for sample in timelines:
            key = sample["mode"] + (" migrated" if sample.get("migrated") else "")
            index = modes.index(key)
            times = [point[0] for point in sample["timeline"]]
            total_mib = [hostmetrics.run_total(point) / (1 << 20) for point in sample["timeline"]]
            axes.plot(times, total_mib, color=colours(index % colours.N),
                      linestyle=styles[sample["repetition"] % len(styles)], linewidth=1,
                      label=None if key in labelled else key)
            labelled.add(key)
        axes.set_xlabel("time in workload (s)")
        axes.set_ylabel("host memory of the run (MiB)")
        axes.set_title("host memory over time (RSS + page cache, root image apart; line style: repetition)")
        axes.legend(fontsize="x-small", ncol=2)
        save("host_memory", figure)

    firsts = [s for s in run["samples"] if s.get("density") and s["repetition"] == 0]
    if firsts:
        # Per policy, its first run: what each guest held and tmemd's used bytes,
        # stacked, against the budget M (the line).
        guests = int(run["scenario"]["guests"]["count"])
        figure, axes_list = plt.subplots(1, len(firsts), figsize=(4 * len(firsts), 3.5), sharey=True,
                                         squeeze=False)
        for axes, sample in zip(axes_list[0], firsts):
            record = sample["density"]
            ticks = record["monitor"]
            times = [tick[0] for tick in ticks]
            layers = [[tick[3 + index] / (1 << 20) for tick in ticks] for index in range(guests)]
            layers.append([tick[1] / (1 << 20) for tick in ticks])
            axes.stackplot(times, layers, labels=[f"g{index} RAM" for index in range(guests)] + ["tmemd used"])
            axes.axhline(record["budget_bytes"] / (1 << 20), color="black", linestyle="--", linewidth=1)
            axes.set_title(sample["mode"])
            axes.set_xlabel("time in workload (s)")
        axes_list[0][0].set_ylabel("committed memory (MiB); dashed: budget M")
        axes_list[0][-1].legend(fontsize="x-small", loc="lower right")
        save("density_budget", figure)

    memory = memory_rows(run)
    if memory:
        figure, axes = plt.subplots(figsize=(8, 4))
        components = [name for name in MEMORY_LABELS
                      if name != "total" and name not in hostmetrics.SHARED_COMPONENTS]
        bottoms = [0.0] * len(memory)
        keys = [row[0] for row in memory]
        for name in components:
            position = 1 + list(MEMORY_LABELS).index(name)
            heights = [float(row[position]) if row[position] != "-" else 0.0 for row in memory]
            if any(heights):
                axes.bar(keys, heights, bottom=bottoms, label=MEMORY_LABELS[name])
                bottoms = [b + h for b, h in zip(bottoms, heights)]
        axes.set_ylabel("MiB (peak of each component, mean per run)")
        axes.set_title("host memory by component (the shared root image left out)")
        axes.tick_params(axis="x", rotation=30)
        axes.legend(fontsize="x-small")
        save("host_memory_components", figure)
    return plots


def _html_table(names: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in names)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>"
                   for cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(run: RunRecord, plots: Mapping[str, bytes]) -> str:
    scenario = run["scenario"]
    baseline = scenario["baseline"]
    rows = summarize_run(run)
    names = columns(rows)
    summary = _html_table(names, (row_cells(row, baseline, names != COLUMNS, cpu_flagged(run, row.mode))
                                  for row in rows))
    details = remote_detail_rows(run)
    remote = (f"<h2>Remote tier</h2>{_html_table(REMOTE_DETAIL_COLUMNS, details)}"
              f"<p>{html.escape(REMOTE_NOTE)}</p>" if details else "")
    if policies := density_rows(run):
        remote = (f"<h2>Density</h2>{_html_table(density_columns(run), policies)}"
                  f"<p>{html.escape(DENSITY_NOTE)}</p>") + remote
    if applications := application_rows(run):
        remote = (f"<h2>Application</h2>{_html_table(application_columns(run), applications)}"
                  f"<p>{html.escape(application_note(run))}</p>") + remote
    if memory := memory_rows(run):
        remote = (f"<h2>Host memory</h2>{_html_table(MEMORY_COLUMNS, memory)}"
                  f"<p>{html.escape(MEMORY_NOTE)}</p>") + remote
    if moves := migration_rows(run):
        remote += (f"<h2>Live migration</h2><p>{html.escape(migration_sentences(run))}</p>"
                   f"{_html_table(MIGRATION_COLUMNS, moves)}<p>{html.escape(MIGRATION_NOTE)}</p>")
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, png in plots.items()
    )
    meta = "".join(f"<li>{html.escape(line[2:])}</li>" for line in _metadata_lines(run))
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title(run))}</title>"
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
        "td:first-child{text-align:left}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title(run))}</h1>"
        f"<p>{html.escape(scenario.get('description') or '')}</p>"
        + "".join(f"<p>{html.escape(sentence)}</p>" for sentence in finding_sentences(run)) +
        f"{summary}"
        "<p>* p &lt; 0.05, ** p &lt; 0.01 (Welch's t-test against the baseline).</p>"
        f"{remote}<h2>Run</h2><ul>{meta}</ul><h2>Plots</h2>{images}</body></html>\n"
    )


def write_reports(results: Path) -> list[Path]:
    """(Re)build report.md, report.html and plots/*.png from results/run.json."""
    run = load_run(results)
    plots = make_plots(run)
    plot_dir = results / "plots"
    plot_dir.mkdir(exist_ok=True)
    written = []
    for name, png in plots.items():
        path = plot_dir / f"{name}.png"
        path.write_bytes(png)
        written.append(path)
    markdown = results / "report.md"
    markdown.write_text(render_markdown(run, list(plots)))
    page = results / "report.html"
    page.write_text(render_html(run, plots))
    return [markdown, page, *written]


def compare_table(run_a: RunRecord, run_b: RunRecord) -> Table:
    """Mode by mode: wall time of run B against run A, with Welch's test."""
    table = Table(title=f"{run_a.get('id', 'A')} -> {run_b.get('id', 'B')}: workload wall time")
    for column in ("mode", "A mean s", "B mean s", "change", "p"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    rows_b = {row.key: row for row in summarize_run(run_b)}
    walls_a = _walls_by_key(run_a)
    walls_b = _walls_by_key(run_b)
    for row_a in summarize_run(run_a):
        row_b = rows_b.get(row_a.key)
        if row_b is None or row_a.wall is None or row_b.wall is None:
            continue
        welch = stats.welch_t_test(walls_b[row_a.key], walls_a[row_a.key])
        change = stats.percent_change(row_b.wall.mean, row_a.wall.mean)
        table.add_row(
            row_a.key,
            f"{row_a.wall.mean:.1f}",
            f"{row_b.wall.mean:.1f}",
            f"{change:+.1f}%{stats.significance_mark(welch)}",
            "-" if welch is None else f"{welch.p_value:.3f}",
        )
    return table


def _walls_by_key(run: RunRecord) -> dict[str, list[float]]:
    guests = int(run["scenario"]["guests"]["count"])
    grouped: dict[str, list[Sample]] = {}
    for sample in run["samples"]:
        grouped.setdefault(_key(sample, guests), []).append(sample)
    return {key: _walls(samples) for key, samples in grouped.items()}
