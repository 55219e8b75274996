"""Strip server filesystem paths from text a client will read (API errors, job errors, events).

A message such as "Model directory not found: /srv/tunery/jobs/ftjob-x/model" tells a key holder
where the server keeps its data and which directories exist. Clients get the last component only
("…/model"); the full text goes to the server log. A candidate is replaced only when its first
component exists at the filesystem root, so URL paths (`/v1/models`) and fractions stay as written.
"""

from __future__ import annotations

import functools
import os
import re

# An absolute path not glued to a word, a URL's "//" or another path: "/a/b", not "http://h/a" or "x/y".
_ABSOLUTE = re.compile(r"(?<![\w:/.~\-])(/[\w.@+\-]+)((?:/[\w.@+\-]*)*)")


@functools.lru_cache(maxsize=512)
def _is_root_entry(name: str) -> bool:
    # Cached: the root's entries do not change while a server runs, and error paths are short-lived.
    return os.path.lexists(name)


def scrub_paths(text: str) -> str:
    """`text` with every absolute server path shortened to "…/<last component>"."""
    if "/" not in text:
        return text

    def shorten(match: re.Match[str]) -> str:
        head, rest = match.group(1), match.group(2)
        if not _is_root_entry(head):
            return match.group(0)
        last = (head + rest).rstrip("/").rsplit("/", 1)[-1]
        return f"…/{last}" if last else "…"

    return _ABSOLUTE.sub(shorten, text)
