"""The floor plan holds: stage packages sit on shared modules and never on each other, nothing
outside ``rlhf/ppo`` imports PPO except where a stage is chosen, and ``rlhf`` has no import
cycle (module-level or function-level imports)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhf"
STAGES = ("sft", "rm", "ppo", "dpo", "rejection")
# Where a stage is chosen by name: the CLI resolves class paths from configs at run time, and
# nothing else may name a stage package.
MAY_IMPORT_STAGES: set[str] = {"rlhf.fit", "rlhf.pipeline"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (type-only imports)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def rlhf_imports(path: Path) -> set[str]:
    """The ``rlhf`` modules ``path`` imports at run time anywhere in its body (absolute imports)."""
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("rlhf"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("rlhf"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # "from rlhf.x import y" names module rlhf.x.y only when it is one; keep real modules.
        graph[name] = {m for m in rlhf_imports(path) if m in modules and m != name}
    return graph


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_stage_packages_do_not_import_each_other_and_only_stage_choosers_import_them():
    wrong = []
    for module, imports in import_graph().items():
        for target in imports:
            target_stage = stage_of(target)
            if target_stage is None or target_stage == stage_of(module):
                continue
            if module not in MAY_IMPORT_STAGES:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph = import_graph()
    # Package __init__ files re-export their modules; importing a package's module from inside
    # it is not a cycle, so edges into a package's own __init__ from below are dropped.
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
