"""Soak: N certificates polled every second for M minutes; do memory, tasks and fds stay flat?

Run: .venv/bin/python benchmarks/reliability_soak.py [--certs 200] [--minutes 5]

A CertSync built from extension settings (KeyVaultSource, PemDirectoryStore in a temporary
directory) polls the emulator, which runs in a process of its own (so its memory is not counted)
and rotates a certificate every ``--rotate-every`` s. Every ``--sample-every`` s this process's
RSS (from /proc), asyncio tasks, open fds and threads are sampled; at the end the first, last and
largest of each and the ratio last/first are printed. Nothing is asserted (``--quick``: a few
seconds with 20 certificates, to show the script works).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from reliability_common import Emulator, open_fds, proc_status, rss_mib

from kvcertsync import parse_settings, sync_from_settings

_COLUMNS = ("rss_mib", "tasks", "fds", "threads")


def sample(started: float, polls: int, changes: int) -> dict[str, float]:
    """One reading of this process, with the engine's counters."""
    return {
        "t": time.monotonic() - started,
        "rss_mib": rss_mib(),
        "tasks": len(asyncio.all_tasks()),
        "fds": open_fds(),
        "threads": int(proc_status()["Threads"]),
        "polls": polls,
        "changes": changes,
    }


async def soak(
    args: argparse.Namespace, emulator: Emulator, directory: Path
) -> list[dict[str, float]]:
    """Poll for ``args.seconds``; the samples taken along the way."""
    document = emulator.settings(directory, interval=args.interval)
    settings = parse_settings(json.dumps(document))
    redirect = dict([emulator.info["redirect"].split("=", 1)])
    sync = sync_from_settings(settings, ca_file=emulator.info["ca_file"], redirect=redirect)
    samples: list[dict[str, float]] = []
    async with sync:
        with anyio.fail_after(max(60.0, args.certs / 10)):
            await sync.wait_ready()
        started = time.monotonic()
        while True:
            stats = sync.stats()
            samples.append(sample(started, stats.polls, stats.changes))
            line = samples[-1]
            print(
                f"{line['t']:7.0f} s  rss {line['rss_mib']:7.1f} MiB  tasks {line['tasks']:5.0f}  "
                f"fds {line['fds']:4.0f}  threads {line['threads']:3.0f}  polls {stats.polls:7}  "
                f"installs {stats.changes:6}",
                flush=True,
            )
            if line["t"] >= args.seconds:
                break
            await anyio.sleep(min(args.sample_every, max(0.0, args.seconds - line["t"])))
    return samples


def summary(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """First, last and largest of each column, and the ratio last/first."""
    out = {}
    for column in _COLUMNS:
        values = [s[column] for s in samples]
        first, last = values[0], values[-1]
        out[column] = {
            "first": first,
            "last": last,
            "max": max(values),
            "ratio": last / first if first else float("nan"),
        }
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak; returns the summary (also printed)."""
    print(
        f"soak: {args.certs} certificates polled every {args.interval:g} s for {args.seconds:g} s, "
        f"a rotation every {args.rotate_every:g} s, a sample every {args.sample_every:g} s"
    )
    with (
        tempfile.TemporaryDirectory(prefix="kvcertsync-soak-") as work,
        Emulator(args.certs, args.rotate_every) as emulator,
    ):
        samples = anyio.run(soak, args, emulator, Path(work) / "certs")
    result = summary(samples)
    for column, figures in result.items():
        print(
            f"{column:8} first {figures['first']:8.1f}  last {figures['last']:8.1f}  "
            f"max {figures['max']:8.1f}  last/first {figures['ratio']:6.3f}"
        )
    polls = samples[-1]["polls"] - samples[0]["polls"]
    print(
        f"polls {polls:.0f} ({polls / max(samples[-1]['t'], 1e-9):.0f}/s), "
        f"vault rotations {emulator.rotations}"
    )
    return {"summary": result, "polls": polls, "rotations": emulator.rotations}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--certs", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=1.0, metavar="S")
    parser.add_argument("--rotate-every", type=float, default=0.5, metavar="S")
    parser.add_argument("--sample-every", type=float, default=10.0, metavar="S")
    parser.add_argument("--quick", action="store_true", help="a few seconds (for the tests)")
    args = parser.parse_args(argv)
    args.seconds = args.minutes * 60
    if args.quick:
        args.certs, args.seconds, args.sample_every = 20, 3.0, 1.0
    return args


if __name__ == "__main__":
    main(parse_args())
