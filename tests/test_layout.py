"""The package's folders are its architecture: imports only run downward, and never in a circle.

Every ``import`` of every module counts, also those inside functions (a lazy import is still a
dependency, and the circle this test was written against was one).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ablation"

#: Which role folders each role folder may import (besides itself). ``top`` is the package's
#: own top level: the entry points (run, memory, figures, ...) and the public names.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "data": {"core"},
    "report": set(),  # reads records; imports no runtime code
    "measure": {"data", "core", "report"},
    "reference": {"measure", "data", "core", "report"},
    "sweep": {"reference", "measure", "data", "core", "report"},
    "top": {"sweep", "reference", "measure", "data", "core", "report", "top"},
}
#: Roles that may use the models package (core is model-agnostic; report reads records only).
USES_MODELS = {"data", "measure", "reference", "sweep", "top"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def role(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else "top"


def imports_of(path: Path, all_modules: set[str]) -> set[str]:
    """Every module of the package (or ``models``) that ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from ablation.report import records`` imports the module ablation.report.records
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in all_modules:
                found.add(name)
            elif name.split(".")[0] == "models":
                found.add("models")
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p): p for p in paths}
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def test_every_role_folder_exists_and_nothing_is_left_flat():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(ALLOWED) - {"top"}
    flat = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    # The top level holds entry points (python -m ablation.X) and public names only.
    assert flat <= {"run", "memory", "audit", "check_ghost", "figures", "summary", "datasets",
                    "results", "analysis"}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    """Each import that leaves its role folder for one the rules do not allow."""
    wrong = []
    for module, deps in g.items():
        mine = role(module)
        for dep in deps:
            if dep == "models":
                if mine not in USES_MODELS:
                    wrong.append(f"{module} -> models")
                continue
            theirs = role(dep)
            if theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{module} ({mine}) -> {dep} ({theirs})")
    return sorted(wrong)


def find_cycles(g: dict[str, set[str]]) -> list[str]:
    """Import circles of ``g`` as ``a -> b -> a`` strings (depth-first search)."""
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(g.get(node, ())):
            if dep not in g:
                continue
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return cycles


def test_imports_only_run_downward():
    wrong = upward_imports(graph())
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def test_no_import_circles():
    cycles = find_cycles(graph())
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """On a toy graph: the old config <-> probe circle, an upward import, a lazy import."""
    toy = {"ablation.sweep.config": {"ablation.measure.probe"},
           "ablation.measure.probe": {"ablation.sweep.config"},
           "ablation.core.engines": {"ablation.report.records"},
           "ablation.report.figures": {"models"}}
    assert find_cycles(toy) == ["ablation.measure.probe -> ablation.sweep.config -> "
                                "ablation.measure.probe"]
    assert upward_imports(toy) == [
        "ablation.core.engines (core) -> ablation.report.records (report)",
        "ablation.measure.probe (measure) -> ablation.sweep.config (sweep)",
        "ablation.report.figures -> models"]
    lazy = tmp_path / "m.py"
    lazy.write_text("def f():\n    from ablation.sweep import jobs\n")
    assert imports_of(lazy, {"ablation.sweep.jobs"}) == {"ablation.sweep.jobs"}


def test_public_api_and_documented_names_still_import():
    import ablation
    import ablation.analysis
    import ablation.results
    for name in ("ENGINES", "Engine", "clipped_grad_sum", "make_step", "DPConfig"):
        assert hasattr(ablation, name)
    assert callable(ablation.results.load) and callable(ablation.analysis.load)


#: Modules that need an extra (PyTorch, TensorFlow, submitit) to import.
NEEDS_EXTRA = {"ablation.reference.opacus": "torch", "ablation.reference.backpack": "backpack",
               "ablation.reference.pyvacy": "torch", "ablation.reference.torch_nets": "torch",
               "ablation.reference.tfp": "tensorflow",
               "ablation.reference.jax_privacy": "jax_privacy"}


def test_every_module_imports():
    """Every module of the toolkit imports (those of an extra wherever it is installed)."""
    import importlib
    import importlib.util
    root = PACKAGE.parent
    for path in sorted([*PACKAGE.rglob("*.py"), *(root / "models").rglob("*.py")]):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        extra = NEEDS_EXTRA.get(name)
        if extra and importlib.util.find_spec(extra) is None:
            continue
        importlib.import_module(name)
