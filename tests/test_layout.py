"""The layout's guard rail: l5dproxy's import graph, module sizes and reach-ins.

Issue 12 gives l5dproxy a layout in pipeline order (ARCH-PLAN.md §1, §2):
folders ``app/ accept/ detect/ tcp/ http/ route/ balance/ exchange/`` and the
leaves ``discovery.py config/ net/ telemetry.py``, each importing only what
``ALLOWED`` names. This module reads the AST of every ``l5dproxy/**/*.py``
(nothing is imported, so it runs in well under a second) and checks:

* no import cycle, counting ``if TYPE_CHECKING:`` and function-level imports
  (a cycle closed through ``TYPE_CHECKING`` is still a cycle of concepts);
* every import edge goes in an allowed direction (``ALLOWED``), judged by
  each module's *target* folder: a module not yet moved is placed by
  ``TARGET_FOLDER`` (ARCH-PLAN §1.1), a moved one by its path;
* no module over ``MAX_LINES`` (600) lines;
* no reach-in through a listener (``x.listener.attr``, ``listener.attr``,
  ``getattr(listener, ...)``) outside ``accept/`` and ``app/``: what a
  protocol needs is handed to it (ARCH-PLAN §4c);
* every package directory under ``l5dproxy/`` has an ``__init__.py`` and is
  listed in setup.cfg ``packages`` (the list is explicit: a package left out
  is missing from the wheel though the checkout's tests pass);
* every file path named in tests/test_library_internals.py exists (the one
  list of library-internals users must follow the code when it moves).
* README.rst's "Code map" names every module, and the docstring of
  ``l5dproxy/__init__.py`` every folder in ``FOLDERS`` order (the code maps a
  newcomer reads must not fall behind the tree).

**The allowlists are a ratchet.** ``KNOWN_CYCLE_EDGES``,
``KNOWN_ORDER_EDGES``, ``KNOWN_LARGE`` and ``KNOWN_REACH_INS`` hold the
violations present when this test landed. A violation not in its list fails;
so does an entry that is no longer a violation: whoever fixes one deletes it
(or lowers its count), so the lists only shrink, and end empty (step E1).
Entries are keyed by file path, never by line number, so an unrelated edit
does not disturb them. ``TARGET_FOLDER`` ratchets the same way: an entry whose
file is gone (it moved) fails until it is deleted.

**Moving a file** (phase B/C): ``git mv`` it, fix the imports, update
setup.cfg ``packages`` and the paths in tests/test_library_internals.py, then
delete its ``TARGET_FOLDER`` line and run this module. Entries of the moved
file now have a new key; print the lists the tree actually has with

    PYTHONPATH=$PWD /work/venv/bin/python -m tests.test_layout --print-allowlists

and paste them over the four lists, checking in the diff that each change is
a rename or a deletion, never a new violation (a new one is fixed instead).

Run: ``PYTHONPATH=$PWD python -m twisted.trial tests.test_layout``.
"""

from __future__ import annotations

import ast
import configparser
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "l5dproxy"
MAX_LINES = 600
THIS = "tests/test_layout.py"
LIBRARY_INTERNALS = "tests/test_library_internals.py"

# --- the target tree (ARCH-PLAN.md §1 and §2) -------------------------------

#: The leaves, lowest last: each may import the leaves after it (net imports
#: telemetry, config imports net for check_endpoint, discovery imports config).
#: tls/ (certificates, identities, termination, origination) is a leaf below
#: config: every folder that accepts or dials TLS may use it, config reads
#: certificate files with it (a broken one fails --check with file and
#: reason), and it imports only net and telemetry.
LEAVES = ("discovery", "config", "tls", "net", "telemetry")
#: Folders in pipeline order, then the leaves (the order of the code map).
FOLDERS = ("app", "accept", "detect", "tcp", "http", "route", "balance", "exchange", *LEAVES)

#: What each folder may import besides itself (ARCH-PLAN §2). Not simply
#: "everything below": http and route never import each other (each sees the
#: other through a Protocol in exchange/), and accept gets the tcp and http
#: handlers injected by app/.
ALLOWED: Mapping[str, frozenset[str]] = {
    "app": frozenset(FOLDERS) - {"app"},
    "accept": frozenset({"detect", "balance", *LEAVES}),
    "detect": frozenset({"tcp", "balance", *LEAVES}),
    "tcp": frozenset({"balance", *LEAVES}),
    "http": frozenset({"exchange", *LEAVES}),
    "route": frozenset({"balance", "exchange", *LEAVES}),
    "balance": frozenset(LEAVES),
    # exchange -> tls: as_proxy_error maps a client end's TlsError (tls/errors.py,
    # no OpenSSL import) to the status the client sees.
    "exchange": frozenset({"config", "tls", "net"}),
    "discovery": frozenset({"config", "tls", "net", "telemetry"}),
    "config": frozenset({"tls", "net", "telemetry"}),
    "tls": frozenset({"net", "telemetry"}),
    "net": frozenset({"telemetry"}),
    "telemetry": frozenset(),
    # l5dproxy/__init__.py: its docstring is the code map; it imports nothing.
    "": frozenset(),
}

#: Files not yet where ARCH-PLAN §1.1 puts them -> their target folder. A file
#: at its target path (``l5dproxy/<folder>/...`` or a leaf) needs no line here;
#: a line whose file is gone fails: delete it when you move the file.
TARGET_FOLDER: Mapping[str, str] = {
    "l5dproxy/__main__.py": "app",  # stays: python -m l5dproxy (runs app/command.py)
}

#: Folders whose code may reach through a listener: the listener itself, and
#: app/, which builds listeners and drains them.
REACH_IN_ALLOWED = frozenset({"accept", "app"})

# --- the allowlists: today's violations; they only shrink --------------------
# Regenerate with `python -m tests.test_layout --print-allowlists`.

#: Import edges (importer, imported) inside an import cycle.
KNOWN_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset({
})

#: Import edges (importer, imported) against ALLOWED (comment: folders [kinds]).
KNOWN_ORDER_EDGES: frozenset[tuple[str, str]] = frozenset({
})

#: Files over MAX_LINES lines.
KNOWN_LARGE: frozenset[str] = frozenset({
})

#: (file, reach-in expression) -> how many times the file has it.
KNOWN_REACH_INS: Mapping[tuple[str, str], int] = {
}


# --- reading the tree --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Import:
    """One import of one l5dproxy module by another.

    ``importer``/``imported`` are file paths relative to the root
    (``l5dproxy/http/h1/server.py``); ``kind`` is ``"run"`` (module level),
    ``"tc"`` (under ``if TYPE_CHECKING:``) or ``"late"`` (inside a function).
    """

    importer: str
    imported: str
    line: int
    kind: str

    def where(self) -> str:
        return f"{self.importer}:{self.line} [{self.kind}]"


@dataclass(frozen=True, slots=True)
class ReachIn:
    """One reach through a listener: ``path:line``, the expression as written."""

    path: str
    line: int
    expression: str


@dataclass(frozen=True, slots=True)
class Layout:
    """What the checks read of a tree: files, line counts, imports, reach-ins."""

    root: Path
    modules: Mapping[str, str]  # dotted module name -> file path
    lines: Mapping[str, int]  # file path -> line count
    imports: tuple[Import, ...]
    reach_ins: tuple[ReachIn, ...]
    unplaced: tuple[str, ...]  # files in no target folder (see folder_of)
    shadowed: tuple[str, ...]  # x.py beside a package x/: Python imports the package


def folder_of(path: str) -> str | None:
    """Target folder of ``l5dproxy/...`` file ``path`` (``""`` for the package root).

    ``TARGET_FOLDER`` first (a file not yet moved), then the path:
    ``l5dproxy/<folder>/...`` or a leaf ``l5dproxy/<leaf>.py``. None when the
    file is in no folder of the target tree.
    """
    if path in TARGET_FOLDER:
        return TARGET_FOLDER[path]
    parts = Path(path).parts[1:]
    if parts == ("__init__.py",):
        return ""
    if len(parts) == 1 and parts[0].removesuffix(".py") in LEAVES:
        return parts[0].removesuffix(".py")
    if len(parts) > 1 and parts[0] in FOLDERS:
        return parts[0]
    return None


def shown(folder: str) -> str:
    """How messages name a folder: ``http/``, ``config.py``, the package root."""
    if folder == "":
        return "l5dproxy/__init__.py"
    packages = ("net", "config", "tls")
    return f"{folder}.py" if folder in LEAVES and folder not in packages else f"{folder}/"


def _module_name(path: Path) -> str:
    name = ".".join(path.with_suffix("").parts)
    return name.removesuffix(".__init__")


def _is_type_checking(test: ast.expr) -> bool:
    return any((isinstance(n, ast.Name) and n.id == "TYPE_CHECKING")
               or (isinstance(n, ast.Attribute) and n.attr == "TYPE_CHECKING")
               for n in ast.walk(test))


class _ModuleReader:
    """One pass over a module's statements: its l5dproxy imports and reach-ins.

    Only statements are walked (imports are statements); an expression is
    walked for reach-ins only when its lines contain ``listener``, which keeps
    the whole tree's scan to a few tens of milliseconds after parsing.
    """

    def __init__(self, module: str, path: str, is_package: bool,
                 modules: Mapping[str, str], source: str, reach_ins: bool) -> None:
        self.module = module
        self.path = path
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.listener_lines = ({n for n, text in enumerate(source.splitlines(), 1)
                                if "listener" in text} if reach_ins else set())
        self.imports: list[Import] = []
        self.reach_ins: list[ReachIn] = []

    def statements(self, body: Iterable[ast.AST], kind: str) -> None:
        for stmt in body:
            if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
                self.statements(stmt.body, "tc")
                self.statements(stmt.orelse, kind)
                continue
            if isinstance(stmt, ast.Import):
                self._add({alias.name for alias in stmt.names}, stmt.lineno, kind)
                continue
            if isinstance(stmt, ast.ImportFrom):
                base = self._absolute(stmt)
                if base is not None:
                    subs = (f"{base}.{alias.name}" for alias in stmt.names)
                    self._add({s if s in self.modules else base for s in subs},
                              stmt.lineno, kind)
                continue
            inner = kind
            if kind == "run" and isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = "late"
            for _, value in ast.iter_fields(stmt):
                for item in value if isinstance(value, list) else (value,):
                    if isinstance(item, ast.stmt):
                        self.statements((item,), inner)
                    elif isinstance(item, (ast.excepthandler, ast.match_case)):
                        self.statements(item.body, inner)
                        self.expression(item)
                    elif isinstance(item, ast.AST):
                        self.expression(item)

    def expression(self, node: ast.AST) -> None:
        """Record reach-ins through a listener in ``node`` (not in nested statements)."""
        if not self.listener_lines:
            return
        first = getattr(node, "lineno", None)
        if first is not None and self.listener_lines.isdisjoint(
                range(first, (getattr(node, "end_lineno", None) or first) + 1)):
            return
        stack = [node]
        while stack:
            n = stack.pop()
            if _is_reach_in(n):
                self.reach_ins.append(ReachIn(self.path, n.lineno, ast.unparse(n)))
            stack.extend(ast.iter_child_nodes(n))

    def _absolute(self, node: ast.ImportFrom) -> str | None:
        if node.level == 0:
            return node.module
        parts = self.package.split(".")
        if node.level - 1 >= len(parts):
            return None
        base = ".".join(parts[:len(parts) - (node.level - 1)])
        return f"{base}.{node.module}" if node.module else base

    def _add(self, names: set[str], line: int, kind: str) -> None:
        """One Import per l5dproxy module one statement names (its deepest existing one)."""
        targets = set()
        for name in names:
            if not (name == PACKAGE or name.startswith(PACKAGE + ".")):
                continue
            while name and name not in self.modules:
                name = name.rpartition(".")[0]
            if name and name != PACKAGE and name != self.module:
                targets.add(self.modules[name])
        self.imports.extend(Import(self.path, t, line, kind) for t in sorted(targets))


def _is_listener(node: ast.AST) -> bool:
    return ((isinstance(node, ast.Attribute) and node.attr == "listener")
            or (isinstance(node, ast.Name) and node.id == "listener"))


def _is_reach_in(node: ast.AST) -> bool:
    """``x.listener.attr``, ``listener.attr``, ``getattr(listener, ...)``."""
    if isinstance(node, ast.Attribute):
        return _is_listener(node.value)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr") and bool(node.args)
            and _is_listener(node.args[0]))


def scan(root: Path) -> Layout:
    """Read every ``l5dproxy/**/*.py`` under ``root`` (AST only, nothing imported)."""
    files = sorted(p.relative_to(root) for p in (root / PACKAGE).rglob("*.py")
                   if "__pycache__" not in p.parts)
    modules = {_module_name(p): p.as_posix() for p in files}
    shadowed = tuple(p.as_posix() for p in files
                     if p.name != "__init__.py" and (root / p.with_suffix("")).is_dir())
    lines: dict[str, int] = {}
    imports: list[Import] = []
    reach_ins: list[ReachIn] = []
    unplaced: list[str] = []
    for rel in files:
        path = rel.as_posix()
        source = (root / rel).read_text(encoding="utf-8")
        lines[path] = len(source.splitlines())
        folder = folder_of(path)
        if folder is None:
            unplaced.append(path)
        reader = _ModuleReader(_module_name(rel), path, rel.name == "__init__.py", modules,
                               source, folder is not None and folder not in REACH_IN_ALLOWED)
        reader.statements(ast.parse(source, filename=path).body, "run")
        imports.extend(reader.imports)
        reach_ins.extend(reader.reach_ins)
    return Layout(root, modules, lines, tuple(imports), tuple(reach_ins), tuple(unplaced),
                  shadowed)


@cache
def layout() -> Layout:
    """This checkout's layout (read once per process)."""
    return scan(ROOT)


# --- the checks: each returns what it found, keyed as its allowlist is ------


def _edges(imports: Iterable[Import]) -> dict[tuple[str, str], list[Import]]:
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in imports:
        edges[(imp.importer, imp.imported)].append(imp)
    return edges


def strongly_connected(edges: Iterable[tuple[str, str]]) -> list[frozenset[str]]:
    """Tarjan's strongly connected components with more than one node."""
    graph: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        graph[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in list(graph):
        if v not in index:
            connect(v)
    return found


def cycle_edges(lay: Layout) -> dict[tuple[str, str], list[Import]]:
    """Every import edge whose two ends are in one import cycle."""
    edges = _edges(lay.imports)
    component = {m: c for c in strongly_connected(edges) for m in c}
    return {e: imps for e, imps in edges.items()
            if e[0] in component and component[e[0]] is component.get(e[1])}


def cycle_through(edge: tuple[str, str], edges: Iterable[tuple[str, str]]) -> list[str]:
    """A shortest cycle closed by ``edge``: [a, b, ..., a] (BFS from b to a)."""
    graph: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        graph[a].append(b)
    start, goal = edge[1], edge[0]
    came: dict[str, str | None] = {start: None}
    queue = [start]
    for node in queue:
        if node == goal:
            break
        for nxt in sorted(graph[node]):
            if nxt not in came:
                came[nxt] = node
                queue.append(nxt)
    path: list[str] = []
    node: str | None = goal
    while node is not None:
        path.append(node)
        node = came.get(node)
    return [goal, *path[::-1]] if goal in came else list(edge)


def order_edges(lay: Layout) -> dict[tuple[str, str], list[Import]]:
    """Every import edge between two folders that ALLOWED does not permit."""
    bad = {}
    for edge, imps in _edges(lay.imports).items():
        src, dst = folder_of(edge[0]), folder_of(edge[1])
        if src is None or dst is None or src == dst:
            continue  # unplaced files fail test_every_file_has_a_target_folder
        if dst not in ALLOWED[src]:
            bad[edge] = imps
    return bad


def large_files(lay: Layout) -> dict[str, int]:
    """Every file over MAX_LINES lines -> its line count."""
    return {p: n for p, n in lay.lines.items() if n > MAX_LINES}


def reach_in_counts(lay: Layout) -> dict[tuple[str, str], int]:
    """(file, expression) -> occurrences, for reach-ins outside accept/ and app/."""
    return dict(Counter((r.path, r.expression) for r in lay.reach_ins))


def setup_packages(root: Path) -> list[str]:
    """The ``[options] packages`` of ``root/setup.cfg``."""
    parser = configparser.ConfigParser()
    parser.read(root / "setup.cfg", encoding="utf-8")
    return [p.strip() for p in parser.get("options", "packages").splitlines() if p.strip()]


def package_problems(root: Path) -> list[str]:
    """Package directories without __init__.py or missing from setup.cfg, and stale entries."""
    problems = []
    listed = set(setup_packages(root))
    dirs = {p.parent for p in (root / PACKAGE).rglob("*.py") if "__pycache__" not in p.parts}
    for d in sorted(dirs):
        rel = d.relative_to(root)
        name = ".".join(rel.parts)
        if not (d / "__init__.py").exists():
            problems.append(f"{rel.as_posix()}/ holds Python files but no __init__.py: add "
                            f"one (a docstring, no imports) and list {name} in setup.cfg "
                            f"[options] packages")
        elif name not in listed:
            problems.append(f"{rel.as_posix()}/ is a package missing from setup.cfg [options] "
                            f"packages: add the line `{name}` (the wheel would leave it out)")
    for name in sorted(listed):
        if name.split(".")[0] != PACKAGE:
            continue
        if not (root.joinpath(*name.split(".")) / "__init__.py").exists():
            problems.append(f"setup.cfg [options] packages lists {name}, which is no package "
                            f"(no {name.replace('.', '/')}/__init__.py): delete or rename the line")
    return problems


def code_map_problems(root: Path) -> list[str]:
    r"""Where the two code maps disagree with the tree.

    README.rst's "Code map" section (up to the next section or the end) must
    name every ``l5dproxy/**/*.py`` but the package ``__init__`` modules, as
    ``\`\`l5dproxy/.../x.py\`\```, and name no file that is gone; the docstring
    of ``l5dproxy/__init__.py`` must name every folder of ``FOLDERS`` (as
    ``\`\`x/\`\``` or, for a leaf module, ``\`\`x.py\`\```), in that order.
    """
    problems = []
    readme = (root / "README.rst").read_text(encoding="utf-8")
    start = readme.find("\nCode map\n--------\n")
    if start < 0:
        return ["README.rst has no 'Code map' section (a title underlined with '-')"]
    body = readme[start + len("\nCode map\n--------\n"):]
    following = re.search(r"\n[^\n]+\n[-=~^]{3,}\n", body)
    body = body[:following.start()] if following else body
    named = set(re.findall(r"``(l5dproxy/[\w/]+\.py)``", body))
    modules = {p.relative_to(root).as_posix() for p in (root / PACKAGE).rglob("*.py")
               if "__pycache__" not in p.parts and p.name != "__init__.py"}
    problems += [f"README.rst Code map does not name {m}: add a line for it where a "
                 f"connection meets it" for m in sorted(modules - named)]
    problems += [f"README.rst Code map names {m}, which does not exist: rename or delete it"
                 for m in sorted(named - modules) if not (root / m).is_file()]
    init = root / PACKAGE / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    names = [f"``{f}.py``" if (root / PACKAGE / f"{f}.py").exists() else f"``{f}/``"
             for f in FOLDERS]
    problems += [f"l5dproxy/__init__.py's docstring (the code map) does not name {name}"
                 for name in names if name not in doc]
    present = [name for name in names if name in doc]
    seen = sorted(present, key=doc.index)
    if seen != present:
        problems.append(f"l5dproxy/__init__.py's docstring (the code map) names "
                        f"{', '.join(seen)}: put them in the order of FOLDERS, "
                        f"{', '.join(present)}")
    return problems


_PATH = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.py)\b")
_TOP = ("l5dproxy", "tests", "bench", "twisted", "conf")


def named_paths(source: str) -> list[tuple[int, str]]:
    """(line, path) for each ``*.py`` path in a module's string constants.

    A path whose first part is a top directory (l5dproxy/, tests/, bench/,
    twisted/, conf/) is relative to the root; any other (``detect.py``,
    ``http/h2.py``) is relative to ``l5dproxy/``.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for m in _PATH.finditer(node.value):
                name = m.group(1)
                if name.split("/")[0] not in _TOP:
                    name = f"{PACKAGE}/{name}"
                line = node.lineno + node.value.count("\n", 0, m.start())
                found.append((line, name))
    return found


# --- the ratchet -------------------------------------------------------------


def _fmt_edge(edge: tuple[str, str]) -> str:
    return f'("{edge[0]}", "{edge[1]}")'


def ratchet(found: Mapping, known: Mapping) -> tuple[list, list]:
    """(keys new or grown, keys gone or shrunk) of ``found`` against allowlist ``known``."""
    new = [k for k in sorted(found) if k not in known or found[k] > known[k]]
    gone = [k for k in sorted(known) if k not in found or found[k] < known[k]]
    return new, gone


def _as_counts(keys: Iterable) -> dict:
    return {k: 1 for k in keys}


class LayoutTests(unittest.TestCase):
    """l5dproxy/ against the target tree; the allowlists hold today's exceptions."""

    def fail_with(self, headline: str, items: list[str], advice: str) -> None:
        if items:
            self.fail(f"{headline}\n  " + "\n  ".join(items) + f"\n{advice}")

    def test_every_file_has_a_target_folder(self) -> None:
        lay = layout()
        self.fail_with(
            f"files in no folder of the target tree ({', '.join(FOLDERS)}):",
            list(lay.unplaced),
            f"Put each in its folder (ARCH-PLAN §1), or, until it moves, map it in "
            f"TARGET_FOLDER in {THIS}.")

    def test_no_module_beside_its_namesake_package(self) -> None:
        self.fail_with(
            "modules beside a package of the same name (Python imports the package; the "
            "module is unreachable):",
            list(layout().shadowed),
            "Move the module into the package in the same commit that creates the package "
            "(`git mv l5dproxy/tcp/relay.py l5dproxy/tcp/relay.py`).")

    def test_target_folder_table_current(self) -> None:
        lay = layout()
        stale = [f'"{p}": "{f}"' for p, f in TARGET_FOLDER.items() if p not in lay.lines]
        self.fail_with(
            "TARGET_FOLDER maps files that no longer exist (moved?):", stale,
            f"Delete these lines from TARGET_FOLDER in {THIS}: a file at its target path "
            f"is placed by its path.")
        wrong = [f'"{p}": "{f}"' for p, f in TARGET_FOLDER.items() if f not in ALLOWED]
        self.fail_with("TARGET_FOLDER names unknown folders:", wrong,
                       f"Use one of {', '.join(FOLDERS)}.")

    def test_no_import_cycle(self) -> None:
        found = cycle_edges(layout())
        new, _ = ratchet(_as_counts(found), _as_counts(KNOWN_CYCLE_EDGES))
        items = []
        for edge in new:
            cycle = " -> ".join(cycle_through(edge, found))
            where = ", ".join(i.where() for i in found[edge])
            items.append(f"{edge[0]} imports {edge[1]} at {where}\n    closing {cycle}")
        self.fail_with(
            "import cycles (TYPE_CHECKING [tc] and function-level [late] imports count):",
            items,
            "Break each: move the shared name down to the folder both may import, or type "
            "the other side with a typing.Protocol declared in the importing module "
            "(ARCH-PLAN §2). Do not add to KNOWN_CYCLE_EDGES; if a known edge only changed "
            f"its key because a file moved, rename its entry in {THIS}.")

    def test_known_cycle_edges_still_exist(self) -> None:
        found = cycle_edges(layout())
        _, gone = ratchet(_as_counts(found), _as_counts(KNOWN_CYCLE_EDGES))
        self.fail_with(
            "KNOWN_CYCLE_EDGES lists edges that are no longer in an import cycle:",
            [_fmt_edge(e) for e in gone],
            f"Delete these entries from KNOWN_CYCLE_EDGES in {THIS} (the list only shrinks). "
            f"If a file moved, `python -m tests.test_layout --print-allowlists` prints the "
            f"current list.")

    def test_imports_follow_pipeline_order(self) -> None:
        found = order_edges(layout())
        new, _ = ratchet(_as_counts(found), _as_counts(KNOWN_ORDER_EDGES))
        items = []
        for edge in new:
            src, dst = folder_of(edge[0]), folder_of(edge[1])
            allowed = ", ".join(shown(f) for f in FOLDERS if f in ALLOWED[src]) or "nothing"
            where = ", ".join(i.where() for i in found[edge])
            items.append(f"{where} imports {edge[1]}: {shown(src)} may import {allowed}; "
                         f"not {shown(dst)}")
        self.fail_with(
            "imports against the pipeline order (ARCH-PLAN §2; a file not yet moved is "
            "judged by its TARGET_FOLDER):",
            items,
            "Move the name to a folder both may import, or let the importer receive it "
            "(a typing.Protocol in the importer, the object injected by app/). Do not add "
            "to KNOWN_ORDER_EDGES; if a known edge only changed its key because a file "
            f"moved, rename its entry in {THIS}.")

    def test_known_order_edges_still_exist(self) -> None:
        found = order_edges(layout())
        _, gone = ratchet(_as_counts(found), _as_counts(KNOWN_ORDER_EDGES))
        self.fail_with(
            "KNOWN_ORDER_EDGES lists edges that are gone or now allowed:",
            [_fmt_edge(e) for e in gone],
            f"Delete these entries from KNOWN_ORDER_EDGES in {THIS} (the list only shrinks).")

    def test_no_large_module(self) -> None:
        found = large_files(layout())
        new, _ = ratchet(found, _as_counts(KNOWN_LARGE))
        new = [p for p in new if p not in KNOWN_LARGE]
        self.fail_with(
            f"modules over {MAX_LINES} lines:",
            [f"{p}: {found[p]} lines" for p in new],
            "Split each, one concept per module (ARCH-PLAN §1.2). Do not add to KNOWN_LARGE.")

    def test_known_large_still_large(self) -> None:
        lay = layout()
        gone = [p for p in sorted(KNOWN_LARGE) if lay.lines.get(p, 0) <= MAX_LINES]
        self.fail_with(
            f"KNOWN_LARGE lists files that are gone or no longer over {MAX_LINES} lines:",
            [f'"{p}" ({lay.lines[p]} lines)' if p in lay.lines else f'"{p}" (gone)'
             for p in gone],
            f"Delete these entries from KNOWN_LARGE in {THIS} (the list only shrinks).")

    def test_no_reach_in_through_a_listener(self) -> None:
        lay = layout()
        found = reach_in_counts(lay)
        new, _ = ratchet(found, KNOWN_REACH_INS)
        items = []
        for key in new:
            lines = ", ".join(str(r.line) for r in lay.reach_ins
                              if (r.path, r.expression) == key)
            items.append(f"{key[0]}:{lines}: `{key[1]}` x{found[key]}"
                         f" (KNOWN_REACH_INS allows {KNOWN_REACH_INS.get(key, 0)})")
        self.fail_with(
            "reach-ins through a listener outside accept/ and app/:",
            items,
            "Pass what the code needs explicitly (a site record or a callable built by "
            "app/, ARCH-PLAN §4c) instead of reaching through the listener. Do not add to "
            "KNOWN_REACH_INS; if a known one only changed its key because a file moved, "
            f"rename its entry in {THIS}.")

    def test_known_reach_ins_still_exist(self) -> None:
        found = reach_in_counts(layout())
        _, gone = ratchet(found, KNOWN_REACH_INS)
        self.fail_with(
            "KNOWN_REACH_INS lists more reach-ins than the code has:",
            [f'("{k[0]}", "{k[1]}"): {found.get(k, 0)} (listed: {KNOWN_REACH_INS[k]})'
             for k in gone],
            f"Lower each count to the number shown in KNOWN_REACH_INS in {THIS}, deleting "
            f"entries that reach 0 (the list only shrinks).")

    def test_packages_listed_in_setup_cfg(self) -> None:
        self.fail_with("setup.cfg [options] packages does not match l5dproxy/:",
                       package_problems(ROOT), "")

    def test_code_maps_current(self) -> None:
        self.fail_with("the code maps do not match l5dproxy/:", code_map_problems(ROOT),
                       "README.rst's Code map names every module (one line: what it is); the "
                       "l5dproxy/__init__.py docstring names every folder in pipeline order.")

    def test_library_internals_paths_exist(self) -> None:
        source = (ROOT / LIBRARY_INTERNALS).read_text(encoding="utf-8")
        named = named_paths(source)
        self.assertTrue(any(p.startswith(PACKAGE + "/") for _, p in named),
                        f"{LIBRARY_INTERNALS} names no l5dproxy file: is named_paths broken?")
        missing = [f"{LIBRARY_INTERNALS}:{line}: {path}" for line, path in named
                   if not (ROOT / path).is_file()]
        self.fail_with(
            "tests/test_library_internals.py names files that do not exist:", missing,
            "Update each to the file's new path (a bare name like `detect.py` is read "
            "relative to l5dproxy/): that module is the one list of library-internals users.")


class CheckerTests(unittest.TestCase):
    """The checks themselves, on a small tree written for each test.

    The trees are the layout before the moves, so they are judged by a fixed
    table of their own rather than by ``TARGET_FOLDER``, which shrinks as
    files move."""

    #: The unmoved files the trees below use, and their target folders.
    TREE_TARGET_FOLDER: Mapping[str, str] = {
        "l5dproxy/batchsend.py": "net",
        "l5dproxy/detect.py": "detect",
        "l5dproxy/listener.py": "accept",
        "l5dproxy/service.py": "app",
        "l5dproxy/tcp.py": "tcp",
        "l5dproxy/http/exchange.py": "exchange",
        "l5dproxy/http/h1.py": "http",
        "l5dproxy/http/proxy.py": "route",
    }

    def setUp(self) -> None:
        global TARGET_FOLDER
        saved = TARGET_FOLDER
        TARGET_FOLDER = self.TREE_TARGET_FOLDER

        def restore() -> None:
            global TARGET_FOLDER
            TARGET_FOLDER = saved
        self.addCleanup(restore)

    def tree(self, files: Mapping[str, str]) -> Layout:
        root = Path(self.mktemp())
        for rel, text in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        return scan(root)

    def test_cycle_through_type_checking_and_function(self) -> None:
        """A cycle closed by a TYPE_CHECKING and a function-level import is a cycle."""
        lay = self.tree({
            "l5dproxy/__init__.py": "",
            "l5dproxy/net/__init__.py": "",
            "l5dproxy/net/a.py": "from typing import TYPE_CHECKING\n"
                                 "if TYPE_CHECKING:\n    from l5dproxy.net.b import B\n",
            "l5dproxy/net/b.py": "def f():\n    from . import c\n",
            "l5dproxy/net/c.py": "import l5dproxy.net.a\n",
        })
        kinds = {(i.importer, i.imported): i.kind for i in lay.imports}
        self.assertEqual(kinds, {
            ("l5dproxy/net/a.py", "l5dproxy/net/b.py"): "tc",
            ("l5dproxy/net/b.py", "l5dproxy/net/c.py"): "late",
            ("l5dproxy/net/c.py", "l5dproxy/net/a.py"): "run",
        })
        self.assertEqual(set(cycle_edges(lay)), set(kinds))
        self.assertEqual(
            cycle_through(("l5dproxy/net/c.py", "l5dproxy/net/a.py"), kinds),
            ["l5dproxy/net/c.py", "l5dproxy/net/a.py", "l5dproxy/net/b.py",
             "l5dproxy/net/c.py"])

    def test_relative_and_from_package_imports(self) -> None:
        """``from .. import x``, ``from ..pkg import mod``: edges to the modules named."""
        lay = self.tree({
            "l5dproxy/__init__.py": "",
            "l5dproxy/config.py": "",
            "l5dproxy/http/__init__.py": "",
            "l5dproxy/http/h1/__init__.py": "",
            "l5dproxy/http/h1/server.py": "from .. import headers\n"
                                          "from ...config import X\n"
                                          "from l5dproxy.http.h1 import framing\n"
                                          "from l5dproxy import config\n",
            "l5dproxy/http/headers.py": "",
            "l5dproxy/http/h1/framing.py": "",
        })
        self.assertEqual(sorted(i.imported for i in lay.imports), [
            "l5dproxy/config.py", "l5dproxy/config.py", "l5dproxy/http/h1/framing.py",
            "l5dproxy/http/headers.py"])

    def test_order_uses_target_folder_of_unmoved_files(self) -> None:
        """http/h1.py importing http/proxy.py is http -> route (proxy.py's target)."""
        lay = self.tree({
            "l5dproxy/__init__.py": "",
            "l5dproxy/http/__init__.py": "",
            "l5dproxy/http/h1.py": "from l5dproxy.http.proxy import reason_phrase\n"
                                   "from l5dproxy.http.exchange import Request\n",
            "l5dproxy/http/proxy.py": "from l5dproxy.http.h1 import H1Server\n",
            "l5dproxy/http/exchange.py": "from l5dproxy.telemetry import M\n",
            "l5dproxy/telemetry.py": "import l5dproxy.exchange.x\n",
            "l5dproxy/exchange/__init__.py": "",
            "l5dproxy/exchange/x.py": "",
        })
        self.assertEqual(set(order_edges(lay)), {
            ("l5dproxy/http/h1.py", "l5dproxy/http/proxy.py"),  # http -> route
            ("l5dproxy/http/proxy.py", "l5dproxy/http/h1.py"),  # route -> http
            ("l5dproxy/telemetry.py", "l5dproxy/exchange/x.py"),  # leaf -> exchange
            ("l5dproxy/http/exchange.py", "l5dproxy/telemetry.py"),  # exchange: config, net
        })

    def test_unplaced_and_shadowed_files(self) -> None:
        lay = self.tree({"l5dproxy/__init__.py": "", "l5dproxy/gadget.py": "",
                         "l5dproxy/tcp.py": "", "l5dproxy/tcp/__init__.py": ""})
        self.assertEqual(lay.unplaced, ("l5dproxy/gadget.py",))
        self.assertEqual(lay.shadowed, ("l5dproxy/tcp.py",))

    def test_reach_ins_counted_outside_accept_and_app(self) -> None:
        code = ("def f(conn, listener):\n"
                "    conn.listener.clock.seconds()\n"
                "    conn.listener.clock\n"
                "    listener.metrics\n"
                "    getattr(listener, 'server_first', None)\n")
        lay = self.tree({
            "l5dproxy/__init__.py": "",
            "l5dproxy/tcp/__init__.py": "",
            "l5dproxy/tcp/relay.py": code,
            "l5dproxy/accept/__init__.py": "",
            "l5dproxy/accept/listener.py": code,
            "l5dproxy/service.py": code,  # app/ by TARGET_FOLDER
        })
        self.assertEqual(reach_in_counts(lay), {
            ("l5dproxy/tcp/relay.py", "conn.listener.clock"): 2,
            ("l5dproxy/tcp/relay.py", "listener.metrics"): 1,
            ("l5dproxy/tcp/relay.py", "getattr(listener, 'server_first', None)"): 1,
        })

    def test_large(self) -> None:
        lay = self.tree({"l5dproxy/__init__.py": "",
                         "l5dproxy/config.py": "x = 1\n" * (MAX_LINES + 1),
                         "l5dproxy/telemetry.py": "x = 1\n" * MAX_LINES})
        self.assertEqual(large_files(lay), {"l5dproxy/config.py": MAX_LINES + 1})

    def test_ratchet_both_ways(self) -> None:
        """New or grown entries fail one way; gone or shrunk ones the other."""
        new, gone = ratchet({"a": 2, "b": 1, "c": 1}, {"a": 1, "c": 2, "d": 1})
        self.assertEqual((new, gone), (["a", "b"], ["c", "d"]))
        self.assertEqual(ratchet({"a": 1}, {"a": 1}), ([], []))

    def test_packages(self) -> None:
        root = Path(self.mktemp())
        for d in ("l5dproxy", "l5dproxy/http", "l5dproxy/net", "l5dproxy/tcp"):
            (root / d).mkdir(parents=True)
        for f in ("l5dproxy/__init__.py", "l5dproxy/http/__init__.py",
                  "l5dproxy/net/__init__.py", "l5dproxy/tcp/relay.py"):
            (root / f).write_text("")
        (root / "setup.cfg").write_text(
            "[options]\npackages =\n    l5dproxy\n# a comment\n    l5dproxy.http\n"
            "    l5dproxy.route\n    twisted.plugins\n")
        problems = package_problems(root)
        self.assertEqual(len(problems), 3, problems)
        self.assertIn("l5dproxy/net/ is a package missing", problems[0])
        self.assertIn("l5dproxy/tcp/ holds Python files but no __init__.py", problems[1])
        self.assertIn("lists l5dproxy.route, which is no package", problems[2])

    def test_code_maps(self) -> None:
        """A module missing from README's Code map, one named there that is gone,
        and a folder missing from (or out of order in) the package docstring."""
        root = Path(self.mktemp())
        files = {
            "l5dproxy/__init__.py": '"""Map.\n\n``app/`` runs; ``tcp/`` relays; ``accept/``."""\n',
            "l5dproxy/app/__init__.py": "", "l5dproxy/app/cli.py": "",
            "l5dproxy/tcp/__init__.py": "", "l5dproxy/tcp/relay.py": "",
            "l5dproxy/telemetry.py": "",
            "README.rst": "Intro\n=====\n\n* ``l5dproxy/tcp/relay.py`` outside the map\n\n"
                          "Code map\n--------\n\n* ``l5dproxy/app/cli.py``: options.\n"
                          "* ``l5dproxy/tcp/splice.py``: gone.\n",
        }
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        problems = code_map_problems(root)
        self.assertIn("README.rst Code map does not name l5dproxy/tcp/relay.py: add a line for "
                      "it where a connection meets it", problems)
        self.assertIn("README.rst Code map names l5dproxy/tcp/splice.py, which does not exist: "
                      "rename or delete it", problems)
        self.assertIn("l5dproxy/__init__.py's docstring (the code map) does not name "
                      "``telemetry.py``", problems)
        self.assertIn("l5dproxy/__init__.py's docstring (the code map) names ``app/``, "
                      "``tcp/``, ``accept/``: put them in the order of FOLDERS, ``app/``, "
                      "``accept/``, ``tcp/``", problems)
        self.assertNotIn("l5dproxy/app/cli.py", " ".join(problems))

    def test_named_paths(self) -> None:
        source = ('"""Users: ``l5dproxy/batchsend.py``, ``detect.py``/``listener.py``."""\n'
                  'user = "l5dproxy/http/h2.py (falls back)"\n'
                  'q = "twisted.internet.tcp.Connection"\n')
        self.assertEqual(named_paths(source), [
            (1, "l5dproxy/batchsend.py"), (1, "l5dproxy/detect.py"),
            (1, "l5dproxy/listener.py"), (2, "l5dproxy/http/h2.py")])


# --- printing the allowlists -------------------------------------------------


def format_allowlists(lay: Layout) -> str:
    """The four allowlists as this tree has them: Python source that replaces
    everything from ``KNOWN_CYCLE_EDGES`` to the end of ``KNOWN_REACH_INS``."""
    out = ["#: Import edges (importer, imported) inside an import cycle.",
           "KNOWN_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset({"]
    out += [f"    {_fmt_edge(e)}," for e in sorted(cycle_edges(lay))]
    out += ["})", "", "#: Import edges (importer, imported) against ALLOWED (comment: folders "
            "[kinds]).",
            "KNOWN_ORDER_EDGES: frozenset[tuple[str, str]] = frozenset({"]
    for e, imps in sorted(order_edges(lay).items()):
        kinds = ", ".join(sorted({i.kind for i in imps}))
        out.append(f"    {_fmt_edge(e)},  # {folder_of(e[0])} -> {folder_of(e[1])} [{kinds}]")
    out += ["})", "", "#: Files over MAX_LINES lines.",
            "KNOWN_LARGE: frozenset[str] = frozenset({"]
    out += [f'    "{p}",' for p in sorted(large_files(lay))]
    out += ["})", "", "#: (file, reach-in expression) -> how many times the file has it.",
            "KNOWN_REACH_INS: Mapping[tuple[str, str], int] = {"]
    out += [f'    ("{p}", "{x}"): {n},' for (p, x), n in sorted(reach_in_counts(lay).items())]
    out += ["}"]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv[1:] != ["--print-allowlists"]:
        print("usage: python -m tests.test_layout --print-allowlists", file=sys.stderr)
        return 2
    print(format_allowlists(layout()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
