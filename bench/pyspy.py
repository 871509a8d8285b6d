"""``--profile``: record l5dproxy with py-spy while a load tool runs, and summarise it.

py-spy (https://github.com/benfred/py-spy, ``pip install py-spy``: a binary wheel)
samples the Python stacks of a running process from outside it, through ptrace
(``process_vm_readv``). ``py-spy record --format raw`` writes *folded stacks*, one
line per distinct stack, root first, frames separated by ``;``, then a space and the
number of samples that stack had::

    <module> (/venv/bin/twistd:8);...;Connection.doRead (/venv/.../twisted/internet/tcp.py:278) 17

With ``--subprocesses`` each stack starts with a ``process PID:"command line"``
frame per process level. Idle threads (blocked in ``epoll_wait``) are not sampled
(no ``--idle``), so every sample is time spent running Python or in a C call made
from it; samples / rate = CPU seconds, roughly.

:func:`summarise` reads that text and gives where the samples are: *self* time (the
leaf frame) by module — l5dproxy by file (``l5dproxy/http/h1/client.py``), third-party
code by distribution package (``twisted``, ``h2``, ``hpack``, ``hyperframe``), the
standard library as ``stdlib:MODULE`` — and by function, and the l5dproxy functions
by *inclusive* time (the samples of stacks they are anywhere in, counted once per
stack even when recursive).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.tools import ParseError

RATE = 500  # samples per second (py-spy's default is 100)
OWN_PACKAGE = "l5dproxy"
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")
_STDLIB = re.compile(r"/lib/python3\.\d+/(?!site-packages/|dist-packages/)")
_THIRD_PARTY = ("/site-packages/", "/dist-packages/")


class ProfileError(RuntimeError):
    """py-spy cannot be used (missing, or not allowed to attach)."""


PTRACE_HELP = (
    "py-spy attaches with ptrace: as root it always may; as another user, only to that "
    "user's processes and, where the Yama LSM is on (kernel.yama.ptrace_scope = 1, "
    "Ubuntu's default), only to its own descendants, which the harness's targets are not "
    "(they are py-spy's siblings): `sysctl kernel.yama.ptrace_scope=0`, or run the harness "
    "as root; in a container, add CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE)"
)


def pyspy_path(bin_dir: Path | None = None, path_env: str | None = None) -> str | None:
    """py-spy next to the harness's python (the venv it was pip-installed into), else
    on ``PATH``. ``bin_dir``/``path_env`` default to the interpreter's directory and
    ``$PATH``."""
    local = (bin_dir or Path(sys.executable).parent) / "py-spy"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("py-spy", path=os.environ.get("PATH", "") if path_env is None
                        else path_env)


def require_pyspy(bin_dir: Path | None = None, path_env: str | None = None) -> str:
    """:func:`pyspy_path` or :class:`ProfileError` saying how to install it."""
    found = pyspy_path(bin_dir, path_env)
    if found is None:
        raise ProfileError(
            "--profile needs py-spy, found neither next to "
            f"{bin_dir or Path(sys.executable).parent} nor on PATH: install it into the "
            "harness's venv with `pip install py-spy` (a binary wheel; also in "
            "l5dproxy's test extras, `pip install -e .[test]`)")
    return found


def record_argv(pyspy: str, pid: int, seconds: float, out: Path,
                subprocesses: bool = False, rate: int = RATE) -> list[str]:
    """The ``py-spy record`` command line: raw folded stacks of ``pid`` into ``out`` for at
    most ``seconds`` (whole seconds, rounded up), full file names (so the standard library
    can be told from third-party packages), samples aggregated per function rather than
    per line (``--function``), and with ``subprocesses`` the processes ``pid`` forked
    (``l5dproxy --workers N``)."""
    argv = [pyspy, "record", "--rate", str(rate), "--format", "raw", "--full-filenames",
            "--function", "--output", str(out), "--pid", str(pid),
            "--duration", str(max(1, int(-(-seconds // 1))))]
    if subprocesses:
        argv.append("--subprocesses")
    return argv


# ------------------------------------------------------------------- summary


@dataclass(frozen=True)
class Frame:
    function: str  # "Class.method" as py-spy names it
    path: str  # the code object's file name, as recorded
    line: int | None = None

    @property
    def short_path(self) -> str:
        return short_path(self.path)

    @property
    def module(self) -> str:
        return module_key(self.path)

    @property
    def own(self) -> bool:
        return self.short_path.startswith(OWN_PACKAGE + "/")

    @property
    def name(self) -> str:
        """``function (short path)``: one function, whatever line it was on."""
        return f"{self.function} ({self.short_path})"


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text)
    if m is None:
        return Frame(text, "?")
    line = m.group("line")
    return Frame(m.group("function"), m.group("path"), int(line) if line else None)


def short_path(path: str) -> str:
    """A file name as its import path: after ``site-packages/``, from the last
    ``l5dproxy/`` package folder (an editable install runs from the checkout), or after
    ``lib/python3.X/`` for the standard library; else unchanged."""
    for marker in _THIRD_PARTY:
        if marker in path:
            return path.split(marker, 1)[1]
    own = f"/{OWN_PACKAGE}/"
    if own in path:
        return OWN_PACKAGE + "/" + path.rsplit(own, 1)[1]
    m = _STDLIB.search(path)
    if m is not None:
        return path[m.end():]
    return path


def module_key(path: str) -> str:
    """What self time is grouped by: ``l5dproxy/FILE`` for l5dproxy's own modules, the
    top-level package for third-party code (``twisted``, ``h2``), ``stdlib:MODULE`` for
    the standard library (``<frozen ...>`` modules included); else the file name."""
    short = short_path(path)
    if short.startswith(OWN_PACKAGE + "/"):
        return short
    top = short.split("/", 1)[0].removesuffix(".py")
    if any(marker in path for marker in _THIRD_PARTY):
        return top
    if _STDLIB.search(path) is not None:
        return f"stdlib:{top}"
    if path.startswith("<frozen "):
        return "stdlib:" + path[len("<frozen "):-1].split(".", 1)[0]
    if path.startswith("/"):
        return Path(path).name  # a script, e.g. the venv's bin/twistd
    return top  # py-spy's short file names (recorded without --full-filenames)


def parse_folded(text: str) -> list[tuple[list[Frame], int]]:
    """Folded stacks -> (frames root first, samples). ``process ...`` frames (from
    ``--subprocesses``) are dropped. Raises :class:`ParseError` on a line that does not
    end in a sample count."""
    stacks: list[tuple[list[Frame], int]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            raise ParseError(f"py-spy raw line {lineno}: no sample count at the end")
        frames = [parse_frame(f) for f in stack.split(";")
                  if not f.startswith("process ")]
        if frames:
            stacks.append((frames, int(count)))
    return stacks


@dataclass
class ProfileSummary:
    """Where the samples of one profiled run are. Counts are samples (1/RATE s each)."""

    scenario: str
    raw_path: str  # the folded stacks kept in bench/results/
    samples: int
    self_by_module: list[tuple[str, int]]
    self_by_function: list[tuple[str, int]]
    inclusive_own: list[tuple[str, int]]  # l5dproxy functions, inclusive
    run: dict[str, float] = field(default_factory=dict)  # the profiled run's figures
    error: str | None = None

    def pct(self, n: int) -> float:
        return 100.0 * n / self.samples if self.samples else 0.0

    def table(self, top: int = 15) -> str:
        head = f"profile of l5dproxy under {self.scenario} (py-spy, {RATE}/s): "
        if self.error:
            return head + f"FAILED -- {self.error}"
        shown = ", ".join(f"{k} {v:,.1f}" for k, v in sorted(self.run.items()))
        out = [head + f"{self.samples:,} samples" + (f"; the run: {shown}" if shown else ""),
               f"raw folded stacks: {self.raw_path}"]
        for title, rows in (("self time by module (l5dproxy by file, others by package)",
                             self.self_by_module),
                            ("self time by function", self.self_by_function),
                            ("l5dproxy functions, inclusive time", self.inclusive_own)):
            out.append(f"  {title}:")
            out += [f"    {self.pct(n):5.1f} %  {key}" for key, n in rows[:top]]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        def rows(pairs: list[tuple[str, int]]) -> list[dict[str, Any]]:
            return [{"name": k, "samples": n, "pct": round(self.pct(n), 2)} for k, n in pairs]

        return {"scenario": self.scenario, "raw_path": self.raw_path, "rate": RATE,
                "samples": self.samples, "run": self.run, "error": self.error,
                "self_by_module": rows(self.self_by_module),
                "self_by_function": rows(self.self_by_function[:50]),
                "inclusive_l5dproxy": rows(self.inclusive_own[:50])}


def summarise(stacks: Iterable[tuple[list[Frame], int]], scenario: str = "",
              raw_path: str = "") -> ProfileSummary:
    """Self time by module and by function, and l5dproxy functions by inclusive time,
    each sorted by samples (most first, ties by name)."""
    by_module: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for frames, n in stacks:
        total += n
        leaf = frames[-1]
        by_module[leaf.module] += n
        by_function[leaf.name] += n
        for name in {f.name for f in frames if f.own}:
            inclusive[name] += n

    def ranked(c: Counter[str]) -> list[tuple[str, int]]:
        return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))

    return ProfileSummary(scenario, raw_path, total, ranked(by_module), ranked(by_function),
                          ranked(inclusive))
