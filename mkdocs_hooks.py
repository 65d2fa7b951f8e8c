"""MkDocs hooks: links from docs/ to repository files (examples, benchmarks) work on the site too.

The pages link to files such as ``../examples/settings.json`` so that they read well on GitHub.
MkDocs only knows files inside docs/, so such a link would be "not found"; here each linked
repository file is copied into the site under ``repo/`` and the link is pointed at the copy.
A link to a repository file that does not exist stays as written, and MkDocs reports it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

# A Markdown link's target; inline code and fenced blocks hold no "](" in these pages' examples.
_LINK = re.compile(r"\]\((?P<target>\.\./[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
_PREFIX = "repo"


def _repository_file(config: MkDocsConfig, page_uri: str, target: str) -> str | None:
    """The repository-relative path a page's link points at, if it leaves docs/ for a file."""
    docs = Path(config.docs_dir).resolve()
    root = docs.parent
    path = (docs / posixpath.dirname(page_uri) / target).resolve()
    if path.is_relative_to(docs) or not path.is_relative_to(root) or not path.is_file():
        return None
    return path.relative_to(root).as_posix()


def on_page_markdown(
    markdown: str, *, page: Page, config: MkDocsConfig, files: Files, **_: Any
) -> str:
    """Point links at repository files to their copies in the site, adding the copies."""

    def relink(match: re.Match[str]) -> str:
        source = _repository_file(config, page.file.src_uri, match["target"])
        if source is None:
            return match[0]
        copy = f"{_PREFIX}/{source}"
        if files.get_file_from_path(copy) is None:
            root = Path(config.docs_dir).resolve().parent
            files.append(File.generated(config, copy, abs_src_path=str(root / source)))
        relative = posixpath.relpath(copy, posixpath.dirname(page.file.src_uri) or ".")
        return f"]({relative}{match['anchor'] or ''})"

    return _LINK.sub(relink, markdown)
