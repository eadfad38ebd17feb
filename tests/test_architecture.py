"""The package's shape: every import of a rankcut module sits at the top of its file, and no
import circle exists, read from the source (ast), not from what happens to import at run time.

Only the optional extras may be imported inside a function (so `import rankcut` works without
them); they are listed here by name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import rankcut

PACKAGE = Path(rankcut.__file__).parent
OPTIONAL_EXTRAS = {"tensorly", "matplotlib", "ray", "lm_eval"}
# the rooms, lowest first: a module may import from its own room and from rooms below it
ROOMS = ["core", "data", "io", "calibration", "methods", "speed", "compress", "evaluate", "train", "study", "cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def rankcut_imports(path: Path) -> list[tuple[str, ast.AST, bool]]:
    """(imported module, node, at top level) for every rankcut import in `path`."""
    module, tree = module_name(path), ast.parse(path.read_text())
    top = set(map(id, tree.body))
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = absolute(module, path.name == "__init__.py", node)
            if not target.startswith("rankcut"):
                continue
            for alias in node.names:  # `from . import hub` imports a module
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in known else target, node, id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rankcut"):
                    out.append((alias.name, node, id(node) in top))
    return out


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        edges.setdefault(module_name(path), set()).update(t for t, _, _ in rankcut_imports(path))
    return edges


def test_no_rankcut_import_hides_inside_a_function():
    hidden = [f"{p.relative_to(PACKAGE)}:{n.lineno} imports {t}"
              for p in PACKAGE.rglob("*.py") for t, n, top in rankcut_imports(p) if not top]
    assert hidden == []


def test_there_is_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(edges):
        if state.get(start) is None and visit(start, [start]):
            break
    assert cycle == [], " → ".join(cycle)


def test_every_arrow_points_down():
    """A room imports only from itself and the rooms below it (the package's `__init__`, which
    re-exports the public names, stands above them all)."""
    def room(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None

    upward = []
    for source, targets in graph().items():
        here = room(source)
        if here is None:
            continue
        for target in targets:
            there = room(target)
            if target == "rankcut" or (there is not None and ROOMS.index(there) > ROOMS.index(here)):
                upward.append(f"{source} → {target}")
    assert upward == []


def test_every_module_is_in_a_room():
    loose = [module_name(p) for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == []
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(ROOMS)


def test_the_optional_extras_stay_optional():
    """The extras may be imported only inside functions, never at the top of a module."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & OPTIONAL_EXTRAS, f"{path}: {names}"


def test_no_source_comment_cites_a_session_an_issue_or_the_results_page():
    """A comment or docstring says the reason; the measurement lives in benchmarks/."""
    citation = re.compile(r"\bsession \d+|\bissue #?\d+|RESULTS\.md", re.I)
    cited = [f"{p.relative_to(PACKAGE)}:{n}" for p in PACKAGE.rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if citation.search(line)]
    assert cited == []
