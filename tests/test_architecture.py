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
    assert callers <= {"starfish_fast/plan.py", "kernels/cosine_loss.py", "kernels/masked_adam.py",
                       "kernels/masked_linear.py"}, callers
    assert "starfish_fast/plan.py" in callers


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


def test_the_teacher_store_rule_lives_in_the_plan():
    assert not _calls("choose_store")
    assert set(_calls("_store_rule")) == {"starfish_fast/plan.py"}
