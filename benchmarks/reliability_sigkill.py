"""SIGKILL rounds of the full ``kvcertsync run`` agent while the vault rotates its certificates.

Run: .venv/bin/python benchmarks/reliability_sigkill.py [--rounds 40] [--certs 20] [--layout split]

The emulator runs in a process of its own and rotates a certificate every ``--rotate-every`` s;
the agent polls every second and is killed (SIGKILL, its whole process group) at a random moment
of each round. After each kill every certificate's link and every version under its final name
is read: ``torn`` (a file that does not parse), ``mismatched`` (a key that is not the
certificate's), ``dangling`` (a link to nothing). The next start must sweep what a kill left in
flight: ``stale`` counts temp and trash entries older than that start once it has read every
certificate. Prints the figures per round and the totals; it asserts nothing (``--quick``: two
short rounds, to show the script works).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from reliability_common import KVCERTSYNC, VAULT, Emulator

from kvcertsync.errors import MaterialError
from kvcertsync.material import CertificateMaterial

_LEFTOVER_PREFIXES = (".kvcertsync-tmp-", ".kvcertsync-trash-")


def verdict(data: bytes) -> str:
    """``ok``, ``torn`` or ``mismatched`` for the bytes a reader got."""
    try:
        CertificateMaterial.from_secret(data)
    except MaterialError as error:
        return "mismatched" if "matches none" in str(error) else "torn"
    return "ok"


def read_entry(path: Path, layout: str) -> list[str]:
    """The verdicts of what a reader of one version (a file, or a split directory) gets."""
    if layout == "kvlinux":
        return [verdict(path.read_bytes())]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:

        def read(name: str) -> bytes:
            handle = os.open(name, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(handle, "rb") as file:
                return file.read()

        combined = read("combined.pem")
        pair = read("fullchain.pem") + read("privkey.pem")
    finally:
        os.close(fd)
    return [verdict(combined), verdict(pair)]


def inspect(directory: Path, certs: int, layout: str) -> dict[str, int]:
    """What a reader finds in ``directory`` now: counts of each kind of outcome."""
    counts = dict.fromkeys(("ok", "torn", "mismatched", "dangling", "missing", "leftover"), 0)
    # Killed before its first install (a slow start on a busy machine): nothing to find yet.
    names = os.listdir(directory) if directory.is_dir() else []
    for name in names:
        path = directory / name
        if name.startswith(_LEFTOVER_PREFIXES):
            counts["leftover"] += 1
        elif name.startswith(f"{VAULT}.c") and name.count(".") == 2 and not path.is_symlink():
            for outcome in read_entry(path, layout):  # a version under its final name
                counts[outcome] += 1
    for index in range(certs):
        link = directory / f"{VAULT}.c{index}"
        if not link.is_symlink():
            counts["missing"] += 1  # not installed yet: killed before its first install
        elif not link.exists():
            counts["dangling"] += 1
        else:
            for outcome in read_entry(link, layout):
                counts[outcome] += 1
    return counts


def stale_entries(directory: Path, before: float) -> int:
    """Temp and trash entries older than ``before`` (left by a killed process, not swept)."""
    stale = 0
    for name in os.listdir(directory):
        if name.startswith(_LEFTOVER_PREFIXES):
            try:
                if os.lstat(directory / name).st_mtime < before:
                    stale += 1
            except FileNotFoundError:
                continue
    return stale


class Agent:
    """One ``kvcertsync run`` process, in a process group of its own."""

    def __init__(self, settings: Path, work: Path, options: list[str]) -> None:
        self.status = work / "status" / "status.json"
        self.started = time.time()
        command = [*KVCERTSYNC, "run", str(settings), "--status-dir", str(self.status.parent)]
        command += ["--log-file", str(work / "agent.log"), "--log-level", "warning", *options]
        self.process = subprocess.Popen(command, start_new_session=True)

    def has_read_every_certificate(self, certs: int) -> bool:
        """Whether its status file, written since it started, shows a version for each."""
        try:
            if self.status.stat().st_mtime < self.started:
                return False
            (document,) = json.loads(self.status.read_bytes())
        except (FileNotFoundError, ValueError):
            return False
        entries = document["status"].get("substatus") or []
        versions = [e for e in entries if "version: " in e["formattedMessage"]["message"]]
        return len(versions) == certs

    def wait_until_read(self, certs: int, within: float = 60) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.has_read_every_certificate(certs):
                return True
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the rounds in a temporary directory (removed after: it holds keys); the totals."""
    with tempfile.TemporaryDirectory(prefix="kvcertsync-sigkill-") as work:
        return rounds(args, Path(work))


def rounds(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The SIGKILL rounds with their store and files in ``work``; returns the totals (printed)."""
    rng = random.Random(args.seed)
    certs_dir = work / "certs"
    options = ["--store", f"pem-split:{certs_dir}"] if args.layout == "split" else []
    totals = dict.fromkeys(("torn", "mismatched", "dangling", "leftover", "stale"), 0)
    unswept_starts = 0
    with Emulator(args.certs, args.rotate_every) as emulator:
        settings = work / "settings.json"
        document = emulator.settings(certs_dir, interval=args.interval)
        settings.write_text(json.dumps(document))
        options += emulator.run_options()
        print(
            f"{args.rounds} SIGKILL rounds, {args.certs} certificates, layout {args.layout}, "
            f"a rotation every {args.rotate_every:g} s, polls every {args.interval:g} s"
        )
        for round_number in range(1, args.rounds + 2):
            agent = Agent(settings, work, options)
            if round_number > 1:
                # Every certificate read: the store was opened, so its sweep has run.
                if agent.wait_until_read(args.certs):
                    totals["stale"] += stale_entries(certs_dir, agent.started)
                else:
                    unswept_starts += 1
            else:
                # The first kill lands once there is something to tear (a slow start would
                # otherwise waste the round on an empty store).
                links = [certs_dir / f"{VAULT}.c{i}" for i in range(args.certs)]
                deadline = time.monotonic() + 60
                while not all(link.is_symlink() for link in links) and time.monotonic() < deadline:
                    time.sleep(0.05)
            if round_number > args.rounds:
                code = agent.stop()
                print(f"final start: stale {stale_entries(certs_dir, agent.started)}, exit {code}")
                break
            time.sleep(rng.uniform(args.min_wait, args.max_wait))
            agent.kill()
            counts = inspect(certs_dir, args.certs, args.layout)
            for key in ("torn", "mismatched", "dangling", "leftover"):
                totals[key] += counts[key]
            print(
                f"round {round_number:3}: ok {counts['ok']:3}  torn {counts['torn']}  "
                f"mismatched {counts['mismatched']}  dangling {counts['dangling']}  "
                f"not yet installed {counts['missing']}  in flight at the kill "
                f"{counts['leftover']}",
                flush=True,
            )
    result = {
        **totals,
        "rounds": args.rounds,
        "rotations": emulator.rotations,
        "starts_not_fully_read": unswept_starts,
    }
    print(
        f"totals: torn {totals['torn']}, mismatched {totals['mismatched']}, dangling "
        f"{totals['dangling']}; left in flight by kills {totals['leftover']}, stale after the "
        f"next start {totals['stale']}; vault rotations {emulator.rotations}"
        + (f"; {unswept_starts} starts did not read every certificate" if unswept_starts else "")
    )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--certs", type=int, default=20)
    parser.add_argument("--layout", choices=("kvlinux", "split"), default="kvlinux")
    parser.add_argument("--rotate-every", type=float, default=0.02, metavar="S")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S")
    parser.add_argument("--min-wait", type=float, default=0.5, metavar="S")
    parser.add_argument("--max-wait", type=float, default=3.0, metavar="S")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="two short rounds (for the tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.certs, args.min_wait, args.max_wait = 2, 2, 0.8, 1.5
    return args


if __name__ == "__main__":
    main(parse_args())
