"""How the project is built: no import cycles among its modules (lazy imports included), no module writes another
module's private globals, and no module branches on a compression method's name outside the module that defines
it. The same checks from a shell: `python tests/test_structure.py`."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_modules() -> dict[str, Path]:
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in ("evals", "kernels"):
        mods.update({f"{pkg}.{p.stem}": p for p in (ROOT / pkg).glob("*.py") if p.stem != "__init__"})
        mods[pkg] = ROOT / pkg / "__init__.py"
    return mods


def imports_of(path: Path, mods) -> dict[str, str]:
    """{alias in this file: project module it names}, from every import statement, at any depth."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in mods:
                    out[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in mods:
                    out[a.asname or a.name] = sub
                elif node.module in mods:
                    out.setdefault(f"<from {node.module}>", node.module)
    return out


def import_cycles() -> list[list[str]]:
    mods = project_modules()
    graph = {m: sorted(set(imports_of(p, mods).values()) - {m}) for m, p in mods.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def private_writes() -> list[str]:
    """`module._name = ...` (or +=, `del`, `module._name[...] = ...`, or a call of one of its methods such as
    `module._name.pop(...)`) where `module` is another project module."""
    mods, found = project_modules(), []
    for name, path in mods.items():
        aliases = imports_of(path, mods)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
                [node.target] if isinstance(node, ast.AugAssign) else \
                [node.func.value] if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else []
            for t in targets:
                if isinstance(t, ast.Subscript):
                    t = t.value
                if isinstance(t, ast.Attribute) and t.attr.startswith("_") and isinstance(t.value, ast.Name) \
                        and aliases.get(t.value.id, name) != name:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} writes {t.value.id}.{t.attr}")
    return found


# where the methods are defined; api_models' "atskv" is the API mode's own prompt compression (API_METHODS), which
# uses ATSKV's predictor on text
METHOD_HOMES = {"cache_framework", "atskv", "baselines", "api_models"}


def method_name_branches() -> list[str]:
    """Comparisons of a value with a compression method's name (`m == "h2o"`, `m in ("snapkv", ...)`) outside the
    methods' own modules. "full" (the uncompressed cache) is the framework's, not a method's."""
    import sys
    sys.path.insert(0, str(ROOT))
    from sparse_kv_cache import METHODS
    names = set(METHODS) - {"full"}
    found = []
    for name, path in project_modules().items():
        if name in METHOD_HOMES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                hit = [c.value for c in consts if isinstance(c, ast.Constant) and c.value in names]
                if hit:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} compares with {', '.join(hit)}")
    return found


def test_no_module_branches_on_a_methods_name_outside_the_methods_own_modules():
    assert method_name_branches() == []


def test_the_projects_modules_import_each_other_without_cycles():
    assert import_cycles() == []


def test_no_module_writes_another_modules_private_globals():
    assert private_writes() == []


if __name__ == "__main__":
    print("import cycles:", import_cycles() or "none")
    print("private writes:", private_writes() or "none")
    print("method-name branches:", method_name_branches() or "none")
