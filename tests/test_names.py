"""One meaning per word: the glossary's banned synonyms stay out of ``lightning_drift/``, and
CONTRIBUTING's map names every module.

CONTRIBUTING's glossary says what each word means; :data:`BANNED` is the other half, the
words that once meant the same thing (or two things at once), each with the glossary word
that replaces it. The scan reads identifiers (names, attributes, parameters, definitions,
keywords), not comments or prose, so the code's own vocabulary is what is checked.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "lightning_drift"


@dataclass(frozen=True)
class Banned:
    word: str  # how the report and KNOWN name it
    pattern: str  # matched against each identifier
    use: str  # the glossary's word for what it meant


# THE table of banned synonyms: one row per word, with the glossary meaning that replaces it.
BANNED: tuple[Banned, ...] = (
    Banned(
        "held_round", r"(^|_)held_round($|_)", "base round: the verified weights a node trains from"
    ),
    Banned("measured_rate", r"(^|_)measured_rate($|_)", "measured pace"),
    Banned("vouch", r"(^|_)vouch(ed|es|ing)?($|_)", "measured pace (reported pace, when a claim)"),
    Banned("rate", r"(?i)(^|_)rates?($|_)", "pace: samples/s a node trains"),
    Banned("score", r"(?i)(^|_)scores?($|_)", "pace (calibrated pace, before any measurement)"),
    Banned("rnd", r"(?i)(^|_)rnd($|_)", "completed_round / open_round / base_round / upload_round"),
    Banned("round_", r"^round_$", "completed_round / open_round / base_round / upload_round"),
    Banned(
        "closing", r"(?i)(^|_)closing($|_)", "aggregating round; an upload then is a late upload"
    ),
    Banned("excluded", r"(?i)(^|_)exclude[ds]?($|_)", "left out (one round) or banned (for good)"),
    Banned("_short", r"^_short(_id)?$", "text.short_id"),
)

# Identifiers that match a pattern but mean something the glossary does not cover.
NOT_SYNONYMS: dict[str, str] = {
    "min_rate": "bytes/s a blob's sender must keep (streams, server): not a node's pace",
    "min_upload_rate": "the setting behind min_rate: bytes/s, not a node's pace",
}

# ``x[:8]``: a node id cut by hand (use ``text.short_id``). These cut bytes, not ids.
CUT_BYTES: set[str] = {"digest", "raw"}

# Definitions banned in one module: (module, name) -> the glossary name.
DEFINITIONS: dict[tuple[str, str], str] = {
    # "stop" ends a session early; the server going down is its shutdown
    ("lightning_drift/coordinator/server.py", "stop"): "shutdown",
}

# Hits tolerated for now: (file, word). Empty: every module speaks the
# glossary; a new hit is renamed, not listed here.
KNOWN: set[tuple[str, str]] = set()


def _identifiers(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.lineno, node.name
        elif isinstance(node, ast.arg) or isinstance(node, ast.keyword) and node.arg:
            yield node.lineno, node.arg
        elif isinstance(node, ast.alias):
            yield 0, node.asname or node.name.rsplit(".", 1)[-1]


def _cut_ids(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """``x[:8]`` where ``x`` is not one of :data:`CUT_BYTES`."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice)):
            continue
        s = node.slice
        cut8 = isinstance(s.upper, ast.Constant) and s.upper.value == 8
        whole = s.lower is None and s.step is None
        if cut8 and whole and ast.unparse(node.value) not in CUT_BYTES:
            yield node.lineno, ast.unparse(node)


def hits(path: Path) -> Iterator[tuple[str, int, str]]:
    """(word, line, what) for each banned synonym in one module."""
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), rel)
    for line, ident in _identifiers(tree):
        if ident in NOT_SYNONYMS:
            continue
        for b in BANNED:
            if re.search(b.pattern, ident):
                yield b.word, line, f"{ident} (say: {b.use})"
    for line, text in _cut_ids(tree):
        yield "[:8]", line, f"{text} (say: text.short_id)"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            use = DEFINITIONS.get((rel, node.name))
            if use:
                yield f"def {node.name}", node.lineno, f"def {node.name} (say: {use})"


def all_hits() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for word, line, what in hits(path):
            found.setdefault((rel, word), []).append(f"{line}: {what}")
    return found


def test_no_banned_synonym_in_the_library() -> None:
    new = {k: v for k, v in all_hits().items() if k not in KNOWN}
    assert not new, "banned synonyms (see CONTRIBUTING's glossary):\n" + "\n".join(
        f"  {f} {w}: {'; '.join(sorted(set(where)))}" for (f, w), where in sorted(new.items())
    )


def test_the_known_list_only_holds_hits_that_still_exist() -> None:
    stale = KNOWN - set(all_hits())
    assert not stale, f"these names are gone: take them off KNOWN: {sorted(stale)}"


def test_the_scan_sees_each_banned_form(tmp_path: Path) -> None:
    lib = tmp_path / "lightning_drift"
    lib.mkdir()
    probe = lib / "probe.py"
    probe.write_text(
        "def f(held_round, rnd, min_rate, node, digest):\n"
        "    vouched = measured_rate = Verdict.EXCLUDED\n"
        "    return node[:8], digest[:8], session.closing, _short(node), rate\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        words = {w for w, _, _ in hits(probe)}
    finally:
        ROOT = saved
    assert words == {
        "held_round",
        "rnd",
        "vouch",
        "measured_rate",
        "excluded",
        "[:8]",
        "closing",
        "_short",
        "rate",
    }


# ---- CONTRIBUTING's map -------------------------------------------------------------------

# Modules the map may not name yet because they do not exist yet on this branch: none.
# (A module that is planned but not written belongs in the map's placeholders, not here.)
KNOWN_MISSING: set[str] = set()


def mapped_modules(text: str) -> set[str]:
    """The library modules CONTRIBUTING's "Where things live" block names, as paths below
    ``lightning_drift/``: a name at two spaces is top level, at four it is in the package
    named last at two (``coordinator/``); at six it is a part of the module above it, in the
    same package."""
    block = text.split("## Where things live", 1)[1].split("```", 2)[1]
    found: set[str] = set()
    package = ""
    for line in block.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if not stripped or indent not in (0, 2, 4, 6):
            continue  # blank, or a description carried onto the next line
        if indent == 0:
            if stripped.startswith("lightning_drift/"):
                continue
            break  # past the library (cli/, examples/, ...)
        names = stripped.split("  ", 1)[0].split()
        if indent == 2:
            package = names[0] if names[0].endswith("/") else ""
        found.update(package + n for n in names if n.endswith(".py"))
    return found


def test_contributing_maps_every_module() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    mapped = mapped_modules(text)
    modules = {
        p.relative_to(LIBRARY).as_posix() for p in LIBRARY.rglob("*.py") if p.name != "__init__.py"
    }
    missing = modules - mapped - KNOWN_MISSING
    assert not missing, f"CONTRIBUTING's map does not name: {sorted(missing)}"
    gone = mapped - modules
    assert not gone, f"CONTRIBUTING's map names modules that do not exist: {sorted(gone)}"
