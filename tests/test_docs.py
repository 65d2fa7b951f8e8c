"""The docs site covers the package: each public module in the API reference, each page in the nav.

`mkdocs build --strict` (in .ci/run) checks that what the site names exists; these tests check the
other direction, without MkDocs installed: nothing public is left out of it.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "kvcertsync"

# Modules whose use is through a command, so their pages are the commands' (docs/agent.md,
# docs/check.md, docs/windows-service.md, docs/emulator.md), not the API reference.
COMMAND_INTERNALS = {
    "kvcertsync.demo",
    "kvcertsync.agent.cli",
    "kvcertsync.agent.handler",
    "kvcertsync.agent.logs",
    "kvcertsync.agent.notify",
    "kvcertsync.agent.preflight",
    "kvcertsync.agent.systemd",
    "kvcertsync.agent.winservice",
    "kvcertsync.emulator.admin",
    "kvcertsync.emulator.tls",
}
# Packages documented through the modules that define their names.
REEXPORTING = {
    "kvcertsync",
    "kvcertsync.agent",
    "kvcertsync.auth",
    "kvcertsync.emulator",
    "kvcertsync.sources",
    "kvcertsync.stores",
}
DIRECTIVE = re.compile(r"^::: *([\w.]+)\s*$", re.MULTILINE)


def public_modules() -> set[str]:
    """Every module of the package whose dotted name has no part starting with ``_``."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(part.startswith("_") for part in parts):
            names.add(".".join(parts))
    return names


def referenced() -> set[str]:
    """The identifiers of every ``::: name`` directive in docs/reference/."""
    found: set[str] = set()
    for page in (DOCS / "reference").glob("*.md"):
        found.update(DIRECTIVE.findall(page.read_text(encoding="utf-8")))
    return found


def test_every_public_module_is_in_the_api_reference() -> None:
    wanted = public_modules() - COMMAND_INTERNALS - REEXPORTING
    missing = sorted(
        module
        for module in wanted
        if not any(ref == module or ref.startswith(module + ".") for ref in referenced())
    )
    assert not missing, f"add a '::: <module>' for these to a page in docs/reference/: {missing}"


def test_every_reference_directive_names_an_importable_module() -> None:
    for name in sorted(referenced()):
        module, _, attribute = name, "", ""
        while module:
            try:
                imported = importlib.import_module(module)
                break
            except ModuleNotFoundError:
                module, _, tail = module.rpartition(".")
                attribute = f"{tail}.{attribute}".rstrip(".")
        else:
            raise AssertionError(f"docs/reference names {name}, which does not exist")
        obj: object = imported
        for part in filter(None, attribute.split(".")):
            assert hasattr(obj, part), f"docs/reference names {name}, which does not exist"
            obj = getattr(obj, part)


def test_the_exclusion_lists_name_real_modules() -> None:
    # A module renamed or removed must not linger here, excused from the reference forever.
    stale = sorted((COMMAND_INTERNALS | REEXPORTING) - public_modules())
    assert not stale, f"no such modules: {stale}"


def test_every_nav_entry_is_a_page_and_every_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = config[config.index("\nnav:") :]
    entries = set(re.findall(r"^\s+- (?:[^:\n]+: )?([\w./-]+\.md)\s*$", nav, re.MULTILINE))
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert entries - pages == set(), "nav entries in mkdocs.yml without a page"
    assert pages - entries == set(), "pages to add to the nav in mkdocs.yml"
