"""No import cycles: no module of the project imports, directly or through others, one that
imports it back.

``lint-imports`` checks the same with pyproject.toml's ``acyclic_siblings`` contract, between the
children of every package. That contract folds a package's ``__init__`` into the package, so a
cycle through it (``pkg -> pkg.sub.a -> pkg``) passes there; this test takes every module,
``__init__`` included, as a node of its own. Every import counts, as in the contract: one inside
a function and one under TYPE_CHECKING.
"""

from __future__ import annotations

import grimp

# pyproject.toml's [tool.importlinter] root_packages (tomllib is not in Python 3.10).
PACKAGES = ("pipeline", "pretrain", "tokenize_corpus", "shards", "engine")


def import_cycles(graph: grimp.ImportGraph) -> list[tuple[list[str], list[str]]]:
    """Each group of modules that import each other in a circle (a strongly connected component
    of more than one module), with one cycle through its first module: ``[a, b, ..., a]``."""
    upstream = {m: graph.find_upstream_modules(m) for m in graph.modules}
    seen: set[str] = set()
    cycles = []
    for module in sorted(graph.modules):
        if module in seen:
            continue
        group = {m for m in upstream[module] if module in upstream[m]}
        if not group:
            continue
        seen |= group | {module}
        first = min(group & graph.find_modules_directly_imported_by(module))
        back = graph.find_shortest_chain(importer=first, imported=module)
        cycles.append((sorted(group | {module}), [module, *back]))
    return cycles


def test_import_cycles_finds_a_cycle_through_an_init(tmp_path, monkeypatch):
    """The check itself: a cycle through a package's ``__init__`` and one between two modules."""
    pkg = tmp_path / "cyclepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from cyclepkg.sub import a\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("import cyclepkg\n")
    (pkg / "b.py").write_text("def f():\n    from cyclepkg import c\n")
    (pkg / "c.py").write_text("import cyclepkg.b\n")
    (pkg / "d.py").write_text("import cyclepkg.c\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyclepkg", cache_dir=None)
    assert import_cycles(graph) == [
        (["cyclepkg", "cyclepkg.sub.a"], ["cyclepkg", "cyclepkg.sub.a", "cyclepkg"]),
        (["cyclepkg.b", "cyclepkg.c"], ["cyclepkg.b", "cyclepkg.c", "cyclepkg.b"]),
    ]


def test_no_import_cycles():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    cycles = import_cycles(graph)
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(
        f"  {', '.join(group)}: {' -> '.join(cycle)}" for group, cycle in cycles
    )
