"""The package's shape: imports flow one way, the model is small and on top, nothing repeats.

The model is the top level of skipvision/ (MODEL below); checkpoint formats (io), fine-tuning
(training) and analysis sit in subpackages that import it, never the reverse.
"""
import ast
import re
from collections import defaultdict

import pytest

from helpers import ROOT

PKG = ROOT / "skipvision"
MODEL = ["config", "vision", "projector", "llama", "vlm", "kv_cache", "generate", "skip", "seam"]
BESIDE = ["errors", "anyres"]  # the error types; LLaVA-NeXT's tiling geometry


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """skipvision module -> the skipvision modules it imports (relative imports resolved)."""
    out = {}
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[:len(base) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                found.add(mod)
                found |= {f"{mod}.{a.name}" for a in node.names}  # `from . import skip`
        out[name] = found
    return {m: {i for i in found if i in out and i != m} for m, found in out.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle_inside_skipvision():
    graph = imports()
    modules = {m for m in graph if m != "skipvision"}  # the package __init__ re-exports all
    assert find_cycle({m: graph[m] & modules for m in modules}) is None


def test_the_model_imports_no_training_analysis_or_io_and_skip_stands_alone():
    graph = imports()
    for m in MODEL + BESIDE:
        below = {i for i in graph[f"skipvision.{m}"]
                 if i.startswith(("skipvision.training", "skipvision.analysis", "skipvision.io"))}
        assert not below, f"skipvision.{m} imports {below}"
    assert not graph["skipvision.skip"] & {"skipvision.vlm", "skipvision.llama"}


def test_the_cycle_check_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_model_is_small_and_every_file_is_short():
    top = {p.stem: len(p.read_text().splitlines()) for p in PKG.glob("*.py")}
    assert set(top) == set(MODEL + BESIDE) | {"__init__"}, "only the model lives at the top level"
    assert sum(top[m] for m in MODEL) <= 1300, top
    assert sum(top[m] for m in BESIDE) <= 150, top
    for folder in ("skipvision", "tests", "examples", "reference"):
        for path in (ROOT / folder).rglob("*.py"):
            n = len(path.read_text().splitlines())
            assert n <= 300, f"{path.relative_to(ROOT)} has {n} lines"


def test_skip_vision_enters_the_model_at_four_marked_lines():
    hook = re.compile("#.*skip-vision hook")
    marked = [(p.name, i) for p in PKG.glob("*.py") if p.stem != "skip"
              for i, line in enumerate(p.read_text().splitlines()) if hook.search(line)]
    assert 1 <= len(marked) <= 4, marked
    vlm = (PKG / "vlm.py").read_text().splitlines()
    for i, line in enumerate(vlm):  # every call into skip.py is on (or continues) a marked line
        if re.search(r"skip_vision\.\w+\(", line) and "skip-vision hook" not in line + vlm[i - 1]:
            pytest.fail(f"vlm.py:{i + 1} uses skip.py off the marked lines: {line.strip()}")


def code_lines(path):
    """(line number, normalised text) of the lines that carry code."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        s = " ".join(line.split("#")[0].split())
        if s and not re.fullmatch(r"[\[\](){}:,.]*|(from|import) .*|\"\"\"|@\w+", s):
            out.append((i, s))
    return out


def repeated_blocks(paths, root, n: int = 6) -> list[str]:
    """'a.py:L ~ b.py:L' for each run of n code lines that stands in two places."""
    places = defaultdict(list)  # block -> [(file, first line, last line)]
    for path in paths:
        lines = code_lines(path)
        for k in range(len(lines) - n + 1):
            block = tuple(s for _, s in lines[k:k + n])
            places[block].append((path.relative_to(root), lines[k][0], lines[k + n - 1][0]))
    found = []
    for (f, first, last), *others in places.values():
        again = [(g, line) for g, line, _ in others if g != f or line > last]
        if again:
            found.append(f"{f}:{first} ~ {again[0][0]}:{again[0][1]}")
    return found


def test_no_block_of_six_lines_is_repeated_in_skipvision():
    assert repeated_blocks(sorted(PKG.rglob("*.py")), ROOT) == []


def test_the_repetition_check_can_fail(tmp_path):
    body = "".join(f"x{i} = f({i})\n" for i in range(6))
    (tmp_path / "a.py").write_text(body)
    (tmp_path / "b.py").write_text("y = 1\n" + body + "# same lines again, in one file\n" + body)
    assert repeated_blocks([tmp_path / "a.py"], tmp_path) == []
    assert repeated_blocks([tmp_path / "a.py", tmp_path / "b.py"], tmp_path) == [
        "a.py:1 ~ b.py:2"]


def test_the_readme_layout_names_every_file():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Loading checkpoints")]
    files = [p for folder in ("skipvision", "examples") for p in (ROOT / folder).rglob("*.py")
             if p.name != "__init__.py"]
    missing = [str(p.relative_to(ROOT)) for p in files if p.name not in layout]
    assert not missing, f"README's layout table does not name {missing}"
