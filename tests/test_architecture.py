"""The layering docs/architecture.md draws, read from the source: every import of model/ and
services/ (module level and inside functions alike) as a graph of modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for top in ("model", "services") for p in sorted((ROOT / top).rglob("*.py"))}


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_module(name: str) -> str | None:
    """The project module an imported name lives in (`a.b.c` -> `a.b` when c is a symbol of it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


IMPORTS = {module: imported_names(path) for module, path in MODULES.items()}
GRAPH = {
    module: {m for m in map(project_module, names) if m is not None and m != module}
    for module, names in IMPORTS.items()
}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in GRAPH:
        if root in index:
            continue
        work = [(root, iter(sorted(GRAPH[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(GRAPH[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_walk_of_modules_is_known_and_the_cycle_finder_finds_a_planted_cycle():
    assert {"model.transformer", "services.attention.dispatch", "services.expert.shard", "services.wire"} <= set(MODULES)
    GRAPH["model.config"].add("model.transformer")  # transformer imports config: a cycle now
    try:
        assert any({"model.config", "model.transformer"} <= set(c) for c in cycles())
    finally:
        GRAPH["model.config"].discard("model.transformer")


def test_no_module_imports_its_way_back_to_itself():
    assert cycles() == []


@pytest.mark.parametrize(
    "package, forbidden",
    [
        # the model computes; where its pieces run is decided outside it
        ("model", ("services", "moe", "grpc", "redis", "prometheus_client")),
        # the shard depends on the wire contract, not on a way of moving bytes (its entry point
        # chooses the listeners)
        ("services.expert.shard", ("services.transport", "services.attention")),
        # the contract knows nothing of the transports or services around it
        ("services.wire", ("services.transport", "services.expert", "services.attention")),
        # the front door never loads weights
        ("services.gateway", ("model", "torch")),
        # shared plumbing sits below every service
        ("services.common", ("services.attention", "services.expert", "services.gateway", "services.router",
                             "services.autoscaler", "services.cli", "services.launcher", "services.transport")),
    ],
)
def test_a_lower_layer_imports_nothing_above_it(package, forbidden):
    offending = sorted(
        f"{module} imports {name}"
        for module, names in IMPORTS.items() if in_package(module, package)
        for name in names if any(in_package(name, f) for f in forbidden)
    )
    assert offending == []


def test_command_lines_are_parsed_only_by_the_cli_and_each_service_entry_point():
    parsers = sorted(
        module for module, path in MODULES.items()
        if "argparse" in IMPORTS[module]
        and not in_package(module, "services.cli")
        and not module.endswith(".__main__")
    )
    # shared flag helpers every entry point uses (settings, server flags, the healthcheck probe)
    assert parsers == ["services.common.healthcheck", "services.common.server", "services.common.settings"]
