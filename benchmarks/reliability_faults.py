"""The fault matrix: every vault and identity fault against a running agent, files kept intact.

``kvcertsync emulator`` and ``kvcertsync run`` run as processes of their own, as an operator runs
them. For each fault the emulator is told (through its admin routes) to misbehave for ``--hold``
seconds while the agent polls every second; the installed files must stay byte-identical all
along. Then the fault is lifted, the certificate rotated, and the time until the new version is
in place is printed as the recovery time. It asserts nothing (``--quick``: fewer faults, short
holds, for the test that proves the script works).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from kvcertsync.emulator import TestAuthority
from kvcertsync.material import PKCS12_CONTENT_TYPE as PKCS12

_CONSOLE = Path(sys.executable).with_name("kvcertsync")
KVCERTSYNC = [str(_CONSOLE)] if _CONSOLE.exists() else [sys.executable, "-m", "kvcertsync"]
# A plain secret holding a PFX (as many users keep them): a certificate-backed one cannot be
# given a corrupt value, the vault refuses that.
VAULT, NAME = "demo", "plain-cert"
_AUTHORITY = TestAuthority()


def new_version(admin: Admin) -> None:
    """A freshly minted certificate as the secret's next version."""
    pfx = base64.b64encode(_AUTHORITY.issue(["web.example"]).to_pkcs12()).decode()
    admin.call("POST", f"secrets/{VAULT}/{NAME}", {"value": pfx, "contentType": PKCS12})


#: (name, what the emulator is told, how to undo it beyond resetting faults)
FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("503 service unavailable", {"faults": {"fail": {"status": 503, "times": 100000}}}),
    ("429 throttled, Retry-After 1", {"faults": {"throttle": {"limit": 0, "retryAfter": 1}}}),
    ("connection reset", {"faults": {"drop": {"times": 100000}}}),
    (
        "403 ForbiddenByRbac",
        {
            "faults": {
                "fail": {"status": 403, "code": "Forbidden", "innerCode": "ForbiddenByRbac"}
                | {"times": 100000}
            }
        },
    ),
    ("IMDS 500", {"faults": {"imds": {"status": 500, "times": 100000}}}),
    ("a corrupt secret value", {"value": "bm90IGEgY2VydGlmaWNhdGU="}),
    ("404 secret deleted", {"delete": True}),
    ("latency past the 30 s limit", {"faults": {"latency": {"seconds": 40}}}),
]
QUICK = {"503 service unavailable", "a corrupt secret value", "404 secret deleted"}


class Admin:
    """The emulator's admin routes, with its token."""

    def __init__(self, port: int, ca_file: str, token: str) -> None:
        self.base = f"https://localhost:{port}/_emulator"
        self.context = ssl.create_default_context(cafile=ca_file)
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base}/{path}",
            data=data,
            method=method,
            headers={"X-Emulator-Token": self.token, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
            return json.load(response)


def start_emulator() -> tuple[subprocess.Popen[str], dict[str, str]]:
    """``kvcertsync emulator`` and what its banner says (ports, CA, token, msiEndpoint)."""
    process = subprocess.Popen(
        [*KVCERTSYNC, "emulator", "--port", "0", "--vault", VAULT],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("ready"):
            break
    text = "".join(lines)

    def field(pattern: str) -> str:
        found = re.search(pattern, text)
        if found is None:
            raise SystemExit(f"the emulator's banner has no {pattern!r}:\n{text}")
        return found.group(1)

    return process, {
        "port": field(r"https port:\s+(\d+)"),
        "ca": field(r"CA certificate:\s+(\S+)"),
        "token": field(r"admin token:\s+(\S+)"),
        "msi": field(r"msiEndpoint:\s+(\S+)"),
    }


def snapshot(directory: Path) -> dict[str, tuple[str, bytes]]:
    """What a reader sees: each link's target and the bytes behind it, by the link's name.

    Not the version entries themselves: the install that ended the previous fault prunes a
    superseded version just after its links move, and that is no change a reader could see.
    """
    return {
        p.name: (os.readlink(p), p.read_bytes())
        for p in sorted(directory.iterdir())
        if not p.name.startswith(".") and p.is_symlink()
    }


def wait_for(condition: Any, within: float) -> float | None:
    """Seconds until ``condition()`` held, or None if it never did within ``within``."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """The matrix; one row per fault (printed as it goes)."""
    emulator, banner = start_emulator()
    admin = Admin(int(banner["port"]), banner["ca"], banner["token"])
    certs = work / "certs"
    settings = work / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "secretsManagementSettings": {
                    "pollingIntervalInS": "1",
                    "observedCertificates": [
                        {
                            "url": f"https://{VAULT}.vault.azure.net/secrets/{NAME}",
                            "certificateStoreLocation": str(certs),
                        }
                    ],
                },
                "authenticationSettings": {"msiEndpoint": banner["msi"]},
            }
        )
    )
    link = certs / f"{VAULT}.{NAME}"
    new_version(admin)
    redirect = f"*.vault.azure.net=127.0.0.1:{banner['port']}"
    logs = ["--status-dir", str(work / "status"), "--log-file", str(work / "agent.log")]
    agent = subprocess.Popen(
        [
            *KVCERTSYNC,
            "run",
            str(settings),
            "--ca-file",
            banner["ca"],
            "--redirect",
            redirect,
            *logs,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = []
    try:
        if wait_for(link.exists, 60) is None:
            raise SystemExit("the agent installed nothing within 60 s; see agent.log")
        for name, fault in FAULTS:
            if args.quick and name not in QUICK:
                continue
            before = snapshot(certs)
            if "faults" in fault:
                admin.call("POST", "faults", fault["faults"])
            if "value" in fault:
                body = {"value": fault["value"], "contentType": PKCS12}
                admin.call("POST", f"secrets/{VAULT}/{NAME}", body)
            if fault.get("delete"):
                admin.call("DELETE", f"secrets/{VAULT}/{NAME}?purge=true")
            intact, deadline = True, time.monotonic() + args.hold
            while time.monotonic() < deadline:
                intact = intact and snapshot(certs) == before
                time.sleep(0.2)
            admin.call("DELETE", "faults")
            target = link.resolve()
            new_version(admin)
            recovered = wait_for(lambda t=target: link.resolve() != t, args.within)
            row = {"fault": name, "intact": intact, "recovery_s": recovered}
            rows.append(row)
            took = "never" if recovered is None else f"{recovered:5.2f} s"
            verdict = "byte-identical" if intact else "CHANGED"
            print(f"{name:32} files {verdict:14}  new version in place after {took}", flush=True)
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        emulator.terminate()
        emulator.wait(timeout=30)
    changed = sum(not r["intact"] for r in rows)
    slowest = max((r["recovery_s"] or float("inf")) for r in rows)
    print(f"totals: {len(rows)} faults, files changed under {changed}, slowest {slowest:.2f} s")
    return rows


def main() -> None:
    """Parse the options and run the matrix in a temporary directory (it holds keys)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold", type=float, default=10.0, help="seconds each fault lasts")
    parser.add_argument("--within", type=float, default=90.0, help="seconds to wait to recover")
    parser.add_argument("--quick", action="store_true", help="three faults, 2 s each (tests)")
    args = parser.parse_args()
    if args.quick:
        args.hold = 2.0
    with tempfile.TemporaryDirectory(prefix="kvcertsync-faults-") as work:
        run(args, Path(work))


if __name__ == "__main__":
    main()
