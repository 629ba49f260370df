"""The one place that redacts secrets: every issued value and its encodings become ``***``.

For each registered value the masker looks for these forms (each at least :data:`MIN_VARIANT`
bytes; a shorter one is not looked for, since it would mask ordinary text):

- the value; each of its lines (split on ``\\r\\n``, ``\\r`` or ``\\n``); without surrounding
  quotes if it was registered as ``"v"`` or ``'v'``; unescaped if it holds backslash escapes
  (``a\\nb`` registered, a real newline printed; ``\\t``, ``\\"``, ``\\\\``, ``\\xHH``, ``\\uXXXX``,
  octal); each of these in every encoding below;
- base64, standard and URL-safe: padded, unpadded, at each of the three byte offsets a value
  can sit at inside a longer base64 stream (including the partial characters at either end
  that mix value bits with the neighbouring bytes), and the lines of an encoding wrapped at
  64 or 76 columns (PEM, ``base64``);
- hex, lower and upper case;
- URL-encoding: ``%XX`` upper and lower case, ``+`` for space, ``/`` kept or encoded
  (``urllib.parse.quote()``'s default keeps it);
- JSON string escaping (``\\uXXXX`` or raw UTF-8); XML/HTML escaping (``&lt;`` ``&gt;``
  ``&amp;`` ``&quot;``/``&#34;`` ``&apos;``/``&#39;``/``&#x27;``); single quotes doubled (SQL,
  YAML); shell quoting (``shlex.quote``, backslash escaping, bash ``printf %q`` in both its
  backslash and ``$'...'`` forms).

Every form longer than :data:`PIECE` bytes is cut into pieces of 64 to 127 bytes, at the
same places for forms that share a start: no pattern is long, so building an automaton stays
linear in the size of its patterns however repetitive a value is, a search never looks further
ahead than a piece past a match (a text full of near-matches costs a bounded amount per byte),
and the streaming redactor never holds back more than a piece. A truncated copy of a long value
is masked too. A match of a base64 form is widened over the neighbouring base64 character
when that character also carries bits of the value.

Patterns live in a few Aho-Corasick automata, each searched leftmost-longest; what is masked
is the union of their matches. The values given to :meth:`Masker.add` (the broker's secrets,
the ID token) share one automaton (a DFA up to :data:`DFA_MAX_BYTES` of patterns, else a
contiguous NFA), built when first needed after a change. Job-chosen values (``::add-mask::``)
go through :meth:`Masker.add_job_mask`, which enforces :data:`MAX_JOB_MASKS`,
:data:`MAX_JOB_MASK_BYTES` and :data:`MAX_JOB_MASK_TOTAL`; they are matched in text folded with
:data:`FOLD` (hex case and the two base64 alphabets), and each registration builds an NFA for
its own patterns only, merged with earlier ones by size class, so that registering n values one
at a time costs O(n log n), never O(n^2), and O(log n) automata are searched. Once they have
searched 1,024 bytes per byte of their patterns (so that the build costs a fraction of the
searching done), a job's NFAs are rebuilt as DFAs: as one, if together they are small enough.

Masking cannot catch a value printed reversed, character by character, or transformed in any
other way not listed here, a value (or a line of one) under 4 bytes, nor covert channels (exit
codes, timing, file sizes).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from stockade.secrets.encodings import (
    B64_CHARS,
    FOLD,
    LEFT,
    MIN_VARIANT,
    RIGHT,
    decode_add_mask,
    patterns,
    variants,
)

if TYPE_CHECKING:
    from ahocorasick_rs import BytesAhoCorasick

__all__ = [
    "ADD_MASK",
    "MASK",
    "MAX_JOB_MASKS",
    "MAX_JOB_MASK_BYTES",
    "MAX_JOB_MASK_TOTAL",
    "MIN_VARIANT",
    "Masker",
    "Redactor",
    "decode_add_mask",
    "variants",
]

MASK = b"***"
ADD_MASK = b"::add-mask::"
MAX_JOB_MASKS = 256  # values one job may register with ::add-mask::
MAX_JOB_MASK_BYTES = 4 * 1024  # each
MAX_JOB_MASK_TOTAL = 256 * 1024  # all of them together
DFA_MAX_BYTES = 64 * 1024  # larger automata are NFAs (a DFA costs ~500 bytes and 10x the
#                            build time per pattern byte, for a search at most twice as fast)

_SMALL, _FAN = 16 * 1024, 8  # job automata: one under 16 KiB, fewer than 8 per factor of 8
_DFA_AFTER = 1024  # a job's NFA becomes a DFA once it searched 1024 bytes per pattern byte
_KEYS = itertools.count()

_Span = tuple[int, int, bool]  # start, end, final
# --- the automata ---------------------------------------------------------------------------

_Table = dict[bytes, tuple[str, int]]  # pattern -> (the name of its secret, flags)


class _Usage:
    """How many bytes an automaton has searched (to decide when a DFA pays off)."""

    searched = 0


class _Segment:
    """One automaton over some of the patterns. ``key`` names the pattern set: a DFA built
    later for the same patterns keeps it (and finds the same matches). ``fold``: the patterns
    are folded with FOLD, and so must the text be."""

    __slots__ = ("automaton", "dfa", "flags", "fold", "key", "names", "patterns", "size",
                 "usage")

    def __init__(self, patterns: tuple[bytes, ...], names: tuple[str, ...],
                 flags: tuple[int, ...], size: int, fold: bool, dfa: bool,
                 automaton: BytesAhoCorasick, key: int | None = None) -> None:
        self.patterns, self.names, self.flags, self.size = patterns, names, flags, size
        self.fold, self.dfa, self.automaton = fold, dfa, automaton
        self.key = next(_KEYS) if key is None else key
        self.usage = _Usage()

    @classmethod
    def build(cls, table: _Table, fold: bool, dfa: bool) -> _Segment:
        """An automaton over ``table``: a DFA if asked for and small, else a contiguous NFA
        (a DFA is two to four times faster to search, ten times slower to build, and ~500
        bytes per pattern byte)."""
        patterns = tuple(table)
        size = sum(map(len, patterns))
        dfa = dfa and size <= DFA_MAX_BYTES
        return cls(patterns, tuple(table[p][0] for p in patterns),
                   tuple(table[p][1] for p in patterns), size, fold, dfa,
                   _automaton(patterns, dfa))

    def as_dfa(self) -> _Segment:
        """The same patterns (and key) in a DFA."""
        return _Segment(self.patterns, self.names, self.flags, self.size, self.fold, True,
                        _automaton(self.patterns, True), self.key)

    @property
    def ripe(self) -> bool:
        """An NFA that has searched enough for a DFA's build to cost a fraction of it."""
        return (not self.dfa and self.size <= DFA_MAX_BYTES and
                self.usage.searched >= _DFA_AFTER * self.size)

    @property
    def tier(self) -> int:
        """The size class: 0 under ``_SMALL`` bytes, then one per factor of ``_FAN``."""
        return 0 if self.size < _SMALL else \
            1 + ((self.size // _SMALL).bit_length() - 1) // (_FAN.bit_length() - 1)

    def table(self) -> _Table:
        return {p: (n, f) for p, n, f in zip(self.patterns, self.names, self.flags, strict=True)}

    def spans(self, text: bytes, start: int, safe: int) -> tuple[list[_Span], int]:
        """The matches in ``text`` (folded if :attr:`fold`) at or after ``start``,
        widened over partial base64 characters, and where the search resumes next time: after
        the last match that starts before ``safe`` (a final one: more data cannot change it),
        or at ``safe``."""
        out = []
        flags = self.flags
        resume = max(start, safe)
        self.usage.searched += len(text) - start
        for i, s, e in self.automaton.find_matches_as_indexes(memoryview(text)[start:]):
            s, e, fl = s + start, e + start, flags[i]
            final = s < safe
            if final:
                resume = max(e, safe)
            if fl & LEFT and s > 0 and text[s - 1] in B64_CHARS:
                s -= 1
            if fl & RIGHT and e < len(text) and text[e] in B64_CHARS:
                e += 1
            out.append((s, e, final))
        return out, resume


def _automaton(patterns: tuple[bytes, ...], dfa: bool) -> BytesAhoCorasick:
    from ahocorasick_rs import BytesAhoCorasick, Implementation, MatchKind  # (first secret)

    return BytesAhoCorasick(patterns, matchkind=MatchKind.LeftmostLongest,
                            implementation=Implementation.DFA if dfa else
                            Implementation.ContiguousNFA)


def _ripe(segments: list[_Segment]) -> bool:
    """Whether some of a job's NFAs have searched enough for DFAs to pay for their build."""
    total = sum(seg.size for seg in segments)
    busy = max((seg.usage.searched for seg in segments if not seg.dfa), default=0)
    return any(seg.ripe for seg in segments) or (
        len(segments) > 1 and total <= DFA_MAX_BYTES and busy >= _DFA_AFTER * total)


def _as_dfas(segments: list[_Segment]) -> list[_Segment]:
    """A job's automata, the busy ones as DFAs: all in one if they are small enough together
    (one search instead of several; matches of different automata could overlap, one
    leftmost-longest search chooses among them), else each one for itself (same matches)."""
    if len(segments) > 1 and sum(seg.size for seg in segments) <= DFA_MAX_BYTES:
        return [_Segment.build(_union(segments), fold=True, dfa=True)]
    return [seg.as_dfa() if seg.ripe else seg for seg in segments]


def _union(segments: list[_Segment]) -> _Table:
    table: _Table = {}
    for seg in segments:
        for pattern, (name, flags) in seg.table().items():
            known = table.get(pattern, (name, 0))
            table[pattern] = (known[0], known[1] | flags)
    return table


def _merge_tiers(segments: list[_Segment]) -> list[_Segment]:
    """Merge the newest automata so that there is at most one under ``_SMALL`` bytes and fewer
    than ``_FAN`` of each larger size class, the classes never growing towards the newest:
    O(log n) automata, each pattern rebuilt O(log n) times, however values are registered."""
    while len(segments) > 1:
        tier = segments[-1].tier
        same = next((i for i, seg in enumerate(reversed(segments)) if seg.tier != tier),
                    len(segments))
        if segments[-2].tier < tier or tier == 0 == segments[-2].tier:
            count = 2  # a larger newcomer absorbs the smaller ones; small ones are cheap
        elif same >= _FAN:
            count = same
        else:
            break
        segments[-count:] = [_Segment.build(_union(segments[-count:]), fold=True, dfa=False)]
    return segments


class _State(NamedTuple):
    segments: tuple[_Segment, ...] = ()
    longest: int = 0

    def texts(self, data: bytes) -> list[bytes]:
        """What each automaton searches: ``data``, or ``data`` folded (folded once)."""
        folded = data.translate(FOLD) if any(seg.fold for seg in self.segments) else data
        return [folded if seg.fold else data for seg in self.segments]


class _JobMasks:
    __slots__ = ("total", "values")

    def __init__(self) -> None:
        self.values: set[bytes] = set()
        self.total = 0


class Masker:
    """The automata over all registered values; thread-safe to extend.

    Values registered with :meth:`add` (the broker's secrets, the ID token) share one
    automaton, rebuilt when they change; values the job registers (:meth:`add_job_mask`) go
    into a few automata of their own (see :func:`_merge_tiers`), so that a job cannot make
    registration quadratic. Automata are built when next needed, so registering many values
    at once builds once."""

    def __init__(self, values: Iterable[bytes] = ()) -> None:
        self._static: _Table = {}  # the patterns of add()
        self._job_table: _Table = {}  # the patterns of add_job_mask(), folded
        self._static_segment: _Segment | None = None
        self._job_segments: list[_Segment] = []
        self._job_pending: _Table = {}  # the patterns of add_job_mask() not yet in an automaton
        self._job = _JobMasks()
        self._stale = False
        self._state = _State()
        self._lock = threading.Lock()
        self.add(*values)

    @property
    def longest(self) -> int:
        """The length of the longest pattern (at most :data:`PIECE`)."""
        return self._current().longest

    @property
    def job_masks(self) -> int:
        """How many values the job registered (:meth:`add_job_mask`)."""
        return len(self._job.values)

    def add(self, *values: bytes, name: str = "add-mask") -> None:
        """Register values (and all their variants) to be masked from now on."""
        with self._lock:
            new = _new(self._static, values, name, fold=False)
            if new:
                self._static.update(new)
                self._static_segment = None
                self._stale = True

    def add_job_mask(self, value: bytes) -> str | None:
        """Register a value the job chose (``::add-mask::``), within the per-job limits.

        Returns None when the value is masked from now on, or why it was refused (a short
        text without the value)."""
        if len(value) < MIN_VARIANT:
            return f"shorter than {MIN_VARIANT} bytes"
        if len(value) > MAX_JOB_MASK_BYTES:
            return f"longer than {MAX_JOB_MASK_BYTES} bytes"
        with self._lock:
            job = self._job
            if value in job.values:
                return None
            if len(job.values) >= MAX_JOB_MASKS:
                return f"the job already registered {MAX_JOB_MASKS} values"
            if job.total + len(value) > MAX_JOB_MASK_TOTAL:
                return f"the job's values would exceed {MAX_JOB_MASK_TOTAL} bytes in total"
            job.values.add(value)
            job.total += len(value)
            new = _new(self._job_table, (value,), "add-mask", fold=True)
            if new:
                self._job_table.update(new)
                self._job_pending.update(new)
                self._stale = True
        return None

    def _current(self) -> _State:
        """The automata, built now if values were registered since they were last built (and
        a job's NFA replaced by a DFA once it has searched enough for the DFA to pay)."""
        if not self._stale and not _ripe(self._job_segments):
            return self._state
        with self._lock:
            if self._static and self._static_segment is None:
                self._static_segment = _Segment.build(self._static, fold=False, dfa=True)
            if self._job_pending:
                self._job_segments = _merge_tiers(
                    [*self._job_segments,
                     _Segment.build(self._job_pending, fold=True, dfa=False)])
                self._job_pending = {}
            if _ripe(self._job_segments):
                self._job_segments = _as_dfas(self._job_segments)
            segments = (*([self._static_segment] if self._static_segment else []),
                        *self._job_segments)
            self._state = _State(segments, max((len(p) for seg in segments
                                                for p in seg.patterns), default=0))
            self._stale = False
            return self._state

    def __bool__(self) -> bool:
        return bool(self._static or self._job_table)

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """The ``(start, end)`` regions of ``data`` that :meth:`mask` replaces."""
        regions: list[tuple[int, int]] = []
        state = self._current()
        for s, e, _ in _merged([seg.spans(text, 0, len(data))[0] for seg, text in
                                zip(state.segments, state.texts(data), strict=True)]):
            if regions and s <= regions[-1][1]:
                regions[-1] = (regions[-1][0], max(regions[-1][1], e))
            else:
                regions.append((s, e))
        return regions

    def names_in(self, data: bytes) -> set[str]:
        """The names of the secrets whose variants occur in ``data``."""
        state = self._current()
        names: set[str] = set()
        for seg, text in zip(state.segments, state.texts(data), strict=True):
            seg.usage.searched += len(text)
            names.update(seg.names[i] for i, _, _ in seg.automaton.find_matches_as_indexes(text))
        return names

    def mask(self, data: bytes) -> bytes:
        """``data`` with every variant replaced (for complete, non-streaming buffers)."""
        return Redactor(self)._step(data, final=True) if self else data


def _new(known: _Table, values: Iterable[bytes], name: str, fold: bool) -> _Table:
    """The patterns of ``values`` not in ``known`` yet (or with new flags)."""
    new: _Table = {}
    for value in values:
        for pattern, flags in patterns(value, fold).items():
            old = new.get(pattern) or known.get(pattern)
            if old is None:
                new[pattern] = (name, flags)
            elif old[1] | flags != old[1]:
                new[pattern] = (old[0], old[1] | flags)
    return new


def _merged(lists: list[list[_Span]]) -> Iterator[_Span]:
    """The matches of every automaton by start (final ones first at a tie)."""
    return heapq.merge(*lists, key=lambda span: (span[0], not span[2]))


class Redactor:
    """Streaming masking of one output stream: the output is the same however it is chunked.

    Each automaton resumes where its last final match ended (so each one finds the same
    leftmost-longest matches as on the whole stream), and overlapping or adjacent matches
    merge into one ``***``. What is held back is the unfinished last line, at most
    ``longest + 2`` bytes of it; each byte is searched a bounded number of times."""

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self._buf = b""  # not yet emitted, or kept to resume a search (offsets below index it)
        self._emitted = 0  # _buf[:_emitted] has been emitted
        self._mask_end = -1  # the end of the mask just emitted (a later overlap extends it)
        self._resume: dict[int, int] = {}  # segment key -> where its search resumes

    def feed(self, chunk: bytes) -> bytes:
        """Masked output that is safe to emit now (a value may straddle the next chunk)."""
        if not self._buf and not self.masker:
            return chunk
        return self._step(self._buf + chunk, final=False)

    def flush(self) -> bytes:
        """Everything held back, masked (at the end of the stream)."""
        out = self._step(self._buf, final=True) if self._buf else b""
        self._buf, self._emitted, self._mask_end, self._resume = b"", 0, -1, {}
        return out

    def _step(self, data: bytes, final: bool) -> bytes:
        state = self.masker._current()
        end = len(data)
        if final:
            safe = upto = end
        else:
            # a match starting before `safe` cannot change with bytes still to come: it is far
            # enough from the end (one byte to spare for widening), or on a finished line (no
            # pattern spans a newline); plain text stops a byte earlier, unless at a newline,
            # so that a match widened to the left never reaches text already emitted
            newline = data.rfind(b"\n") + 1
            safe = max(end - state.longest, newline, 0)
            upto = safe if safe == newline else safe - 1
        out: list[bytes] = []
        pos, mask_end = self._emitted, self._mask_end
        resume: dict[int, int] = {}
        lists = []
        for seg, text in zip(state.segments, state.texts(data), strict=True):
            spans, resume[seg.key] = seg.spans(text, self._resume.get(seg.key, 0), safe)
            lists.append(spans)
        for s, e, is_final in _merged(lists):
            if e <= pos or (not is_final and s > mask_end):
                continue
            if s <= mask_end == pos:  # touches the mask just emitted: one ***
                pos = mask_end = e
                continue
            if s > pos:
                out.append(data[pos:s])
            out.append(MASK)
            pos = mask_end = e
        if upto > pos:
            out.append(data[pos:upto])
            pos = upto
        cut = max(0, min(pos, *resume.values()) - 1)  # keep a byte to widen a match over
        self._buf, self._emitted, self._mask_end = data[cut:], pos - cut, mask_end - cut
        self._resume = {key: r - cut for key, r in resume.items()}
        return b"".join(out)
