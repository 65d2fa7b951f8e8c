"""A fleet of agents against one throttled vault: failed installs, 429s, 401s, time to installed.

Run: .venv/bin/python benchmarks/bench_fleet.py [--limit 200 --window 10] [--quick]

Each agent is a CertSync with its own KeyVaultSource (its own ImdsCredential) and MemoryStore,
observing the same 10 certificates of one vault. 20 agents run as 20 processes (one agent each);
200 agents as 20 processes of 10 agents each. All start together; the vault (a ``kvcertsync
emulator`` process) answers 429 beyond ``--limit`` GETs per ``--window`` seconds. Each fleet runs
twice: every agent's first polls at once (the default), then spread over a ``start_splay``
sized to the fleet (``--splay-margin`` times the requests it needs over the vault's rate: what
``kvcertsync run --start-splay`` is for).

The limit: Key Vault allows 4,000 secret GETs per 10 s per vault. A real fleet sharing a vault is
thousands of agents; this machine runs 200. Scaling the limit by the same factor as the fleet
(200 agents for 4,000: 1/20) gives 200 GETs per 10 s, the default: 200 agents need their 2,000
GETs over about ten windows, as 4,000 agents of 10 certificates would at the real limit.

401 challenges are attributed to processes by the client's TCP port and the time: each agent
process samples its own sockets' ports (when each was first and last seen) and the emulator logs
each request's peer port and time; a port one process closed may be another's later.
Prints the figures and the targets of issue 16; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
from _common import (  # run as a script: benchmarks/ is on sys.path
    EmulatorProcess,
    process_cpu_seconds,
    secret_url,
    verdict,
)

# Imported before an agent process says it is ready: the start is the agents', not imports'.
from kvcertsync.auth import ImdsCredential
from kvcertsync.engine import CertSync, InitialSyncError
from kvcertsync.sources import KeyVaultSource
from kvcertsync.stores import MemoryStore
from kvcertsync.uri import SecretUri

CERTIFICATES = 10
PROCESSES = 20
_SCRIPT = Path(__file__).resolve()


def own_ports() -> set[int]:
    """The local TCP ports of this process's sockets."""
    # Asked of each socket, not read from /proc/self/net/tcp: that table lists every socket of
    # the machine, and 20 processes reading it 50 times a second took more CPU than the agents.
    ports = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:["):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as sock:
                stream, address = sock.type == socket.SOCK_STREAM, sock.getsockname()
        except OSError:
            continue  # closed since listed
        if stream and isinstance(address, tuple):
            ports.add(address[1])
    return ports


async def run_agent(info: dict[str, Any]) -> int:
    """One agent's initial sync; how many of its certificates it installed."""
    uris = [SecretUri.parse(secret_url(info["vault"], f"f{i}")) for i in range(CERTIFICATES)]
    store = MemoryStore()
    source = KeyVaultSource(
        ImdsCredential(info["imds_endpoint"]),
        ca_file=info["ca_file"],
        redirect={"*.vault.azure.net": f"127.0.0.1:{info['port']}"},
        owns_credentials=True,
    )
    sync = CertSync(uris, store=store, source=source, start_splay=info["splay"])
    try:
        async with sync:
            await sync.wait_ready()
    except InitialSyncError:
        pass  # counted below: what is not installed failed
    return sum(1 for uri in uris if store.current(uri) is not None)


async def agents(info: dict[str, Any], count: int) -> None:
    """Run ``count`` agents at once when the parent says go; print what they did as JSON."""
    # Each throttled poll logs a warning: thousands of lines that say what the figures say.
    logging.getLogger("kvcertsync").setLevel(logging.ERROR)
    print("ready", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)
    # When each port was first and last seen here: a port closed here may be reused by another
    # process later (idle connections close during a long splay), so the time tells them apart.
    ports: dict[int, list[float]] = {}
    done = anyio.Event()

    async def sample() -> None:
        while not done.is_set():
            now = time.time()
            for port in own_ports():
                ports.setdefault(port, [now, now])[1] = now
            with anyio.move_on_after(0.02):
                await done.wait()

    installed: list[int] = []

    async def one() -> None:
        installed.append(await run_agent(info))

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        async with anyio.create_task_group() as fleet:
            for _ in range(count):
                fleet.start_soon(one)
        finished = time.time()
        done.set()
    result = {"installed": installed, "finished": finished, "ports": ports}
    print(json.dumps(result), flush=True)


def sized_splay(requests: int, args: argparse.Namespace) -> float:
    """A start splay for ``requests`` (GETs and challenges): the vault's rate, with a margin."""
    return args.splay_margin * requests * args.window / args.limit


def scenario(
    emulator: EmulatorProcess, agent_count: int, args: argparse.Namespace, *, splayed: bool
) -> None:
    """Run ``agent_count`` agents in processes against a fresh throttled vault; print."""
    vault = f"fleet{agent_count}{'-splay' if splayed else ''}"
    emulator.load_certificates([(vault, f"f{i}") for i in range(CERTIFICATES)])
    emulator.admin("DELETE", "faults")
    throttle = {"vault": vault, "limit": args.limit, "window": args.window}
    emulator.admin("POST", "faults", {"throttle": throttle})
    processes = min(args.processes, agent_count)
    per_process = agent_count // processes
    splay = sized_splay(agent_count * CERTIFICATES + processes, args) if splayed else 0.0
    info = {**emulator.info(), "vault": vault, "splay": splay}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(_SCRIPT), "--child", json.dumps(info)]
    children = [
        subprocess.Popen(
            [*command, "--agents", str(per_process)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(processes)
    ]
    for child in children:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit(f"an agent process exited with {child.wait()}")
    cpu = emulator.cpu_seconds()
    started = time.time()
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.close()
    results = []
    for child in children:
        assert child.stdout is not None
        out = child.stdout.read()  # stdin is closed already: not communicate()
        if child.wait(timeout=1800) != 0:
            raise SystemExit(f"an agent process failed (exit {child.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    elapsed = max(r["finished"] for r in results) - started
    emulator_share = (process_cpu_seconds(emulator.pid) - cpu) / elapsed
    report(emulator, vault, agent_count, processes, results, elapsed, emulator_share, splay, args)


def owner(results: list[dict[str, Any]], record: dict[str, Any]) -> int:
    """The process that held the record's client port when the emulator logged it, or -1."""
    slack = 0.1  # the sampling period and more: a port is seen up to 20 ms after it opens
    port, when = str(record["peerPort"]), record["time"]
    spans = [(i, r["ports"][port]) for i, r in enumerate(results) if port in r["ports"]]
    inside = [i for i, (first, last) in spans if first - slack <= when <= last + slack]
    return inside[0] if len(inside) == 1 else -1


def report(
    emulator: EmulatorProcess,
    vault: str,
    agent_count: int,
    processes: int,
    results: list[dict[str, Any]],
    elapsed: float,
    emulator_share: float,
    splay: float,
    args: argparse.Namespace,
) -> None:
    """Print one scenario's figures beside its targets."""
    counts: dict[str, int] = emulator.admin("GET", "stats")["responseCounts"].get(vault, {})
    total = sum(counts.values())
    throttled = counts.get("429", 0)
    challenges = counts.get("401", 0)
    log = [r for r in emulator.admin("GET", "requests") if r["vault"] == vault]
    per_process = Counter(owner(results, r) for r in log if r["status"] == 401)
    unattributed = per_process.pop(-1, 0)
    challenge_counts = [per_process.get(i, 0) for i in range(processes)]
    failed = sum(CERTIFICATES - n for r in results for n in r["installed"])
    gets = agent_count * CERTIFICATES
    # No client can beat the throttle: its windows bound the time to all installed.
    floor = (math.ceil((gets + processes) / args.limit) - 1) * args.window
    start = f"first polls spread over {splay:.1f} s (start_splay)" if splay else "all at once"
    print(
        f"\n{agent_count} agents ({processes} processes x {agent_count // processes}) x "
        f"{CERTIFICATES} certificates, vault throttled at {args.limit} GETs per {args.window:g} s, "
        f"{start}"
    )
    share = throttled / total if total else 0.0
    worst = max(challenge_counts)
    goal = "target <= 5 %"
    if not splay:
        # Agents that start together, each sending its polls at once as a lone agent should:
        # whatever exceeds the first window is answered 429 before any agent has seen one.
        over = max(0, gets + processes - args.limit)
        goal += f"; at least {over / (gets + processes + over):.1%} for agents started together"
    rows = [
        ("failed installs", f"{failed}", "target 0", verdict(not failed)),
        ("requests to the vault", f"{total}", f"answers {dict(sorted(counts.items()))}", ""),
        ("throttled (429) share", f"{share:.1%}", goal, verdict(share <= 0.05)),
        (
            "401 challenges per process",
            f"max {worst}",
            f"median {statistics.median(challenge_counts):g}, total {challenges}, "
            f"{unattributed} not attributed; target <= 1 per vault per process",
            verdict(worst <= 1 and challenges <= processes),
        ),
        (
            "time to all installed",
            f"{elapsed:.1f} s",
            f"the throttle's floor {floor:.0f} s" + (f", the splay {splay:.0f} s" if splay else ""),
            "",
        ),
        ("emulator CPU", f"{emulator_share:.0%}", "of one core", ""),
    ]
    for name, value, beside, state in rows:
        print(f"  {name:28s} {value:>8s}  ({beside})  {state}")


def main(args: argparse.Namespace) -> None:
    """Each fleet size in turn, against one emulator process."""
    with EmulatorProcess() as emulator:
        scaled = f"{args.limit} per {args.window:g} s"
        print(f"Key Vault's 4,000 GETs per 10 s per vault scaled to {scaled}")
        for count in args.agents:
            for splayed in (False, True) if args.splay_margin else (False,):
                scenario(emulator, count, args, splayed=splayed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--processes", type=int, default=PROCESSES)
    parser.add_argument("--limit", type=int, default=200, help="GETs per window (scaled)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--splay-margin",
        type=float,
        default=1.2,
        help="the second run's start splay: this times the fleet's requests over the vault's "
        "rate (0: no second run)",
    )
    parser.add_argument("--quick", action="store_true", help="20 agents in 10 processes (< 60 s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        anyio.run(agents, json.loads(options.child), options.agents[0])
    else:
        if options.quick:
            options.agents, options.processes = [20], 10
        main(options)
