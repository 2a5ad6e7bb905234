"""The layering the README's design section describes, checked on the source with `ast`.

- `data/` imports nothing above it (train/, eval/, ship/, runs/, estimate/, iterate/, ...): only
  itself, the config, errors, io, console and models/ (a data check counts tokens with the model's
  tokenizer).
- No import cycle between tunekit's modules, counting imports inside functions too (a lazy import
  hides a cycle from Python, not from a reader).
- No task name is compared as a string outside the task files and the task table.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "tunekit"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The tunekit modules `path` imports (`from tunekit.x import y` counts y when it is a module)."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {  # `if TYPE_CHECKING:` imports never run
        id(n)
        for t in ast.walk(tree)
        if isinstance(t, ast.If) and "TYPE_CHECKING" in ast.unparse(t.test)
        for s in t.body
        for n in ast.walk(s)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tunekit")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if not base.startswith("tunekit"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m != module}


FILES = sorted(PKG.rglob("*.py"))
MODULES = {_module(p) for p in FILES}
GRAPH = {_module(p): _imports(p) for p in FILES}


def _resolve(name: str) -> str:
    """A module imported by name, or the package that holds it."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def test_data_imports_nothing_above_it():
    allowed = (
        "tunekit.data",
        "tunekit.errors",
        "tunekit.io",
        "tunekit.console",
        "tunekit.config",
        "tunekit.models",
    )
    bad = [
        f"{m} imports {dep}"
        for m, deps in GRAPH.items()
        if m == "tunekit.data" or m.startswith("tunekit.data.")
        for dep in deps
        if not any(dep == a or dep.startswith(a + ".") for a in allowed)
    ]
    assert not bad, "data/ must not import upward:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each a cycle."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _module_graph() -> dict[str, set[str]]:
    # A package's __init__ runs before any of its modules: importing tunekit.a.b imports tunekit.a.
    # That edge is Python's, not the code's, so the graph keeps only what the files import.
    return {m: {_resolve(d) for d in deps} - {m} for m, deps in GRAPH.items()}


def test_no_import_cycle():
    cycles = _cycles(_module_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_task_name_is_compared_outside_the_task_files():
    from tunekit.tasks import ROWS

    names = "|".join(ROWS)
    compare = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    owners = {PKG / "tasks.py"} | {SRC / (m.replace(".", "/") + ".py") for m in ROWS.values()}
    bad = [
        f"{p.relative_to(SRC)}:{i}: {line.strip()}"
        for p in FILES
        if p not in owners
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if compare.search(line)
    ]
    assert not bad, "ask the task table (tunekit.tasks.get_task) instead:\n" + "\n".join(bad)
