"""Artifact globs (``dist/**``, ``reports/*.xml``) matched in linear-bounded time.

``*`` and ``?`` stay within a path segment, a segment ``**`` spans any number of segments
(``**`` inside a segment acts as ``*``), and a pattern that names a directory (or ends in
``/``) selects everything below it. No regular expression is built from a job's pattern: a
pattern such as ``*a*a*a*a*a*a*a*b`` cannot make matching backtrack without end. Matching a
path costs at most (pattern segments x path segments) segment matches, and a segment match at
most (pattern length x name length) steps.
"""

from __future__ import annotations


def segment_match(pattern: str, name: str) -> bool:
    """Whether one segment ``name`` matches ``pattern`` (``*``, ``?``; no ``/`` in either)."""
    p = n = 0
    star, mark = -1, 0
    while n < len(name):
        if p < len(pattern) and pattern[p] == "*":
            star, mark = p, n
            p += 1
        elif p < len(pattern) and (pattern[p] == "?" or pattern[p] == name[n]):
            p += 1
            n += 1
        elif star >= 0:  # let the last star take one more character
            p, mark = star + 1, mark + 1
            n = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def glob_match(pattern: str, path: str) -> bool:
    """Whether ``path`` (relative, ``/``-separated) is selected by ``pattern``."""
    pats = [seg for seg in pattern.strip("/").split("/") if seg]
    segs = path.split("/")
    # reach[j]: the pattern's first i segments can match exactly the path's first j segments
    reach = [True] + [False] * len(segs)
    for pat in pats:
        nxt = [False] * (len(segs) + 1)
        if pat == "**":
            seen = False
            for j in range(len(segs) + 1):
                seen = seen or reach[j]
                nxt[j] = seen
        else:
            for j in range(len(segs)):
                if reach[j] and segment_match(pat.replace("**", "*"), segs[j]):
                    nxt[j + 1] = True
        reach = nxt
    return any(reach)  # whatever is left of the path lies below what the pattern selects
