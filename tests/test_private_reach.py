"""No test or benchmark reaches a private name of the project's code.

A private name (one leading underscore, not a dunder) may change in any commit: a test that
reaches one pins the inside of a module instead of what it does, and breaks on an honest
refactor. Tests and benchmarks go through public seams (a parameter, an injected clock, a
public helper). This scan reads every file under ``tests/`` and ``benchmarks/`` (no import,
no run) and reports each place that reaches one:

- ``x._name`` where ``x`` is not ``self`` or ``cls`` (``super()._name`` counts: overriding a
  private hook is reaching it), unless ``_name`` is the file's own (a fake defined there);
- ``from lightning_drift... import _name`` and a ``lightning_drift`` module path with a private
  part;
- ``setattr``/``getattr``/``hasattr``/``delattr`` (``monkeypatch``'s too) naming ``"_name"``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Private names that are not the project's: reaching them is the point of the test or is
# the owner's documented API. Each says whose it is.
ALLOWED: dict[str, str] = {
    # iroh's binding: the converter _iroh_patch replaces; its test checks the patch took
    "_UniffiFfiConverterBytes": "iroh.iroh_ffi",
    # the standard library's documented API, underscore or not
    "_exit": "os._exit",
    "_getframe": "sys._getframe",
    "_replace": "namedtuple._replace",
    "_asdict": "namedtuple._asdict",
    "_fields": "namedtuple._fields",
}

# A private module is reached by its own tests: (file, module) pairs.
OWN_TESTS: set[tuple[str, str]] = {
    ("tests/test_iroh_patch.py", "_iroh_patch"),
}

# Reaches tolerated for now: (file, name). Empty: every test and benchmark goes through a
# public seam; an entry here must say which seam is missing and why.
KNOWN: set[tuple[str, str]] = set()

_REFLECTION = {"setattr", "getattr", "hasattr", "delattr"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _files() -> list[Path]:
    return sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


def _own_names(tree: ast.Module) -> set[str]:
    """Names the file defines itself (functions, classes, ``self._x = ...``): its own fakes."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Name):
                own.add(t.id)
            elif (
                isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name)
                and t.value.id in ("self", "cls")
            ):
                own.add(t.attr)
    return own


def _is_super(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"
    )


def _module_reach(module: str) -> Iterator[str]:
    parts = module.split(".")
    if parts[0] == "lightning_drift":
        yield from (p for p in parts if _private(p))


def reaches(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, private name, how) for each place ``path`` reaches a private name."""
    tree = ast.parse(path.read_text(), str(path))
    own = _own_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr in own and not _is_super(base):
                continue
            yield node.lineno, node.attr, ast.unparse(node)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for name in _module_reach(node.module):
                yield node.lineno, name, f"from {node.module} import ..."
            if node.module.split(".")[0] == "lightning_drift":
                for alias in node.names:
                    if _private(alias.name):
                        yield node.lineno, alias.name, f"from {node.module} import {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                for name in _module_reach(alias.name):
                    yield node.lineno, name, f"import {alias.name}"
        elif isinstance(node, ast.Call):
            yield from _reflection(node)


def _reflection(call: ast.Call) -> Iterator[tuple[int, str, str]]:
    """``setattr(x, "_name", ...)``, ``monkeypatch.setattr(x, "_name", ...)`` and the string
    form ``monkeypatch.setattr("lightning_drift.m._name", ...)``."""
    func = call.func
    fname = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
    if fname not in _REFLECTION or not call.args:
        return
    consts = [a.value for a in call.args[:2] if isinstance(a, ast.Constant)]
    for value in consts:
        if not isinstance(value, str):
            continue
        if _private(value):
            yield call.lineno, value, ast.unparse(call.func) + f"(..., {value!r})"
        elif "." in value:
            for name in _module_reach(value):
                yield call.lineno, name, ast.unparse(call.func) + f"({value!r})"


def all_reaches() -> dict[tuple[str, str], list[str]]:
    """(file, name) -> ["line: how", ...] for every reach, the allowed ones left out."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in _files():
        rel = path.relative_to(ROOT).as_posix()
        for line, name, how in reaches(path):
            if name in ALLOWED or (rel, name) in OWN_TESTS:
                continue
            found.setdefault((rel, name), []).append(f"{line}: {how}")
    return found


def test_no_test_or_benchmark_reaches_a_private_name() -> None:
    found = all_reaches()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    assert not new, "private names reached (use or add a public seam):\n" + "\n".join(
        f"  {f} {n}: {', '.join(where)}" for (f, n), where in sorted(new.items())
    )


def test_the_known_list_only_holds_reaches_that_still_exist() -> None:
    stale = KNOWN - set(all_reaches())
    assert not stale, f"these reaches are gone: take them off KNOWN: {sorted(stale)}"


def test_the_scan_sees_each_kind_of_reach(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from lightning_drift.codec import _bad\n"
        "import lightning_drift._iroh_patch\n"
        "class Fake:\n"
        "    def __init__(self):\n"
        "        self._mine = 1\n"
        "    def _hook(self):\n"
        "        return super()._hook(), self._other\n"
        "def t(coord, monkeypatch, f):\n"
        "    monkeypatch.setattr(coord, '_clock', None)\n"
        "    monkeypatch.setattr('lightning_drift.auth._now', None)\n"
        "    return coord._uploading, f._mine, os._exit\n"
    )
    got = {name for _, name, _ in reaches(probe)}
    assert got == {"_bad", "_iroh_patch", "_hook", "_clock", "_now", "_uploading", "_exit"}
