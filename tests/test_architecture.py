"""The rules of docs/ARCHITECTURE.md that the source itself can show: each decision made in one place,
what ran recorded through one method, no import of a higher floor's concern from below."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "starfish_fast").rglob("*.py"), *(ROOT / "kernels").glob("*.py")])


def _calls(name: str) -> dict[str, int]:
    """Files calling ``name(...)`` or ``x.name(...)``, with how often."""
    found = {}
    for path in SOURCES:
        count = sum(1 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Name) and node.func.id == name) or
            (isinstance(node.func, ast.Attribute) and node.func.attr == name)))
        if count:
            found[str(path.relative_to(ROOT))] = count
    return found


def test_the_kernel_choice_is_made_by_the_plan_and_the_kernels_dispatch_only():
    callers = set(_calls("choose"))
    assert callers <= {"starfish_fast/rules.py", "kernels/cosine_loss.py", "kernels/masked_adam.py",
                       "kernels/masked_linear.py"}, callers
    assert "starfish_fast/rules.py" in callers


def test_what_ran_is_written_only_through_run_record():
    writers = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute) \
                        and target.value.attr == "ran":
                    writers.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("update", "setdefault", "__setitem__") \
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "ran":
                writers.append(f"{path.name}:{node.lineno}")
    assert writers == ["run.py:" + str(_record_line())], writers


def _record_line() -> int:
    tree = ast.parse((ROOT / "starfish_fast" / "run.py").read_text())
    record = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "record")
    return next(node.lineno for node in ast.walk(record) if isinstance(node, ast.Call))


def test_the_teacher_store_rule_lives_in_the_rules_and_only_the_plan_applies_it():
    assert not _calls("choose_store")
    assert set(_calls("store_rule")) == {"starfish_fast/plan.py"}


def _private_imports(path: Path) -> list[str]:
    """``from <our module> import _name`` and ``<our module>._name`` in ``path``: a private name of one of
    the package's modules used from another (third-party private names are the libraries' business)."""
    tree = ast.parse(path.read_text())
    ours = {}                       # local name -> our module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("starfish_fast")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} imports {alias.name} from {node.module}")
                ours[alias.asname or alias.name] = node.module
        elif isinstance(node, ast.Import):
            ours.update({alias.asname or alias.name: alias.name for alias in node.names
                         if alias.name.startswith("starfish_fast")})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ours \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_used_across_modules():
    found = [line for path in SOURCES for line in _private_imports(path)]
    assert not found, found


def test_the_private_import_scan_finds_one(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from starfish_fast.prune.makers import _hidden, public\nfrom starfish_fast import masks\n"
                      "from torch import _C\nmasks._helper(public)\n")
    assert _private_imports(sample) == ["sample.py:1 imports _hidden from starfish_fast.prune.makers",
                                        "sample.py:4 uses masks._helper"]


def test_module_file_names_are_distinct():
    names = [path.name for path in SOURCES if path.name != "__init__.py"]
    assert sorted(names) == sorted(set(names)), sorted(name for name in set(names) if names.count(name) > 1)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, and every ``module.name`` it imports from one."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update({node.module, *(f"{node.module}.{alias.name}" for alias in node.names)})
    return names


def test_the_plan_and_its_rules_reach_no_side_effect():
    """Process groups, forwards, timings and device queries are the probe's: the plan and the rules import
    none of the modules (or names) that do them."""
    effects = {"starfish_fast.distributed", "starfish_fast.timing", "starfish_fast.calibration",
               "starfish_fast.teacher", "starfish_fast.compile_cache", "starfish_fast.probe_sparse24",
               "starfish_fast.probe.process_device", "starfish_fast.probe.machine_facts", "torch.distributed"}
    for name in ("plan.py", "rules.py"):
        assert not _imports(ROOT / "starfish_fast" / name) & effects, name
