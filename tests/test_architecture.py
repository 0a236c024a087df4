"""The layering rules, read from the source with `ast` (run alone: `python -m pytest tests/test_architecture.py`):

- `ml/` imports no Dagster and nothing of grouplora outside `ml/`;
- an asset module imports only `ml/` and the asset-facing orchestration modules (the store, resources, settings,
  partitions, the MLflow registry, devices), never another asset module;
- only `orchestration/definitions.py` imports asset modules;
- no `.path(` / `storage.path(` call builds a stored artifact's path outside `orchestration/store.py`;
- no import cycle among grouplora modules (imports inside functions count too).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The package-dir remap of pyproject.toml: grouplora.<sub> lives in the folder <sub>/ at the repository root.
FOLDERS = {"grouplora.ml": "ml", "grouplora.assets": "assets", "grouplora.orchestration": "orchestration",
           "grouplora.dbt_like_sql": "dbt_like_sql", "grouplora": "grouplora"}
ASSET_FACING = {"grouplora.orchestration.store", "grouplora.orchestration.resources",
                "grouplora.orchestration.settings", "grouplora.orchestration.partitions",
                "grouplora.orchestration.registry", "grouplora.orchestration.globs", "grouplora.orchestration.devices"}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The grouplora modules a file imports (anywhere in it), `from grouplora.x import y` resolved to the module
    grouplora.x.y when that is a module, else grouplora.x."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("grouplora")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grouplora"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_imports_and_cycles():
    """Positive control: the checker finds a known import, and a cycle when one exists."""
    g = graph()
    assert "grouplora.orchestration.store" in g["grouplora.assets.datasets"]
    assert "grouplora.assets.ensemble" in g["grouplora.orchestration.definitions"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_there_is_no_import_cycle():
    assert cycles(graph()) == []


def test_ml_imports_no_dagster_and_nothing_outside_ml():
    for m, path in modules().items():
        if m.startswith("grouplora.ml"):
            text = path.read_text(encoding="utf-8")
            assert "import dagster" not in text and "from dagster" not in text, m
            assert all(d.startswith("grouplora.ml") for d in graph()[m]), (m, graph()[m])


def test_asset_modules_import_only_ml_and_the_asset_facing_modules():
    g = graph()
    for m, deps in g.items():
        if m.startswith("grouplora.assets."):
            wrong = {d for d in deps if not d.startswith("grouplora.ml") and d not in ASSET_FACING}
            assert not wrong, f"{m} imports {sorted(wrong)}"
        elif not m.startswith("grouplora.assets") and m != "grouplora.orchestration.definitions":
            assert not {d for d in deps if d.startswith("grouplora.assets")}, f"{m} imports an asset module"
    # and the asset-facing modules themselves stay below the assets and the rest of orchestration
    for m in ASSET_FACING:
        assert all(d.startswith("grouplora.ml") or d in ASSET_FACING for d in g[m]), (m, g[m])


def test_only_the_store_builds_artifact_paths():
    offenders = []
    for m, path in modules().items():
        if m == "grouplora.orchestration.store":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "path"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("storage", "store")):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
    assert "StorageResource" not in "".join(p.read_text(encoding="utf-8") for p in modules().values())
