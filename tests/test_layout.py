"""The layout holds: dependencies point one way and no module imports itself in a circle.

Read from the source with ``ast`` (imports inside functions count: a circle broken only by a
late import is still a circle), so the check costs no imports and cannot be fooled by import
order.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "coprocessor", "registry", "training", "inference", "webhooks")


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules():
    return {
        module_name(path): path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "migrations" not in path.parts
    }


def imports_of(name, path, known):
    """The project modules ``name`` imports (``from . import x`` resolved to the module x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph):
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_module_imports_itself_through_others(graph):
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def app_of(module):
    return module.split(".")[0]


def top_level_imports(path):
    """The first names of every absolute import in a file (``django``, ``torch``, ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_the_method_library_imports_no_django_and_no_app(graph):
    for name, path in project_modules().items():
        if app_of(name) == "coprocessor":
            assert {app_of(m) for m in graph[name]} <= {"coprocessor"}, name
            assert "django" not in top_level_imports(path), name


def test_the_registry_uses_only_the_file_formats_of_the_method(graph):
    """The expert file (artifact), its Hub-style folders (hub), bounded JSON and the probe."""
    allowed = {
        "coprocessor.artifact",
        "coprocessor.hub",
        "coprocessor.bounded_json",
        "coprocessor.probe",
    }
    for name, imported in graph.items():
        if app_of(name) == "registry":
            used = {m for m in imported if app_of(m) == "coprocessor"}
            assert used <= {"coprocessor", *allowed}, name
            assert not {app_of(m) for m in imported} & {"training", "inference"}, name


def test_the_expert_file_format_stands_without_the_hub(graph):
    """hub builds on artifact, never the reverse, and the Hub's libraries stay out of the file
    format: what validates every upload does not change with the Hub's conventions."""
    assert graph["coprocessor.artifact"] <= {"coprocessor.bounded_json"}
    hub_libraries = {"huggingface_hub", "peft", "yaml"}
    assert not top_level_imports(ROOT / "coprocessor" / "artifact.py") & hub_libraries


def test_training_and_inference_do_not_use_each_other(graph):
    for name, imported in graph.items():
        apps = {app_of(m) for m in imported}
        if app_of(name) == "training":
            assert "inference" not in apps, name
        if app_of(name) == "inference":
            assert "training" not in apps, name


def test_webhooks_use_only_the_registry_and_only_config_uses_them(graph):
    for name, path in project_modules().items():
        apps = {app_of(m) for m in graph[name]}
        if app_of(name) == "webhooks":
            assert apps <= {"webhooks", "registry"}, name
            assert not top_level_imports(path) & {"torch", "transformers", "coprocessor"}, name
        elif app_of(name) != "config":
            assert "webhooks" not in apps, name


def test_no_app_imports_another_apps_views(graph):
    """(The project's urls in config/ wire every app's views; that is their job.)"""
    for name, imported in graph.items():
        if app_of(name) == "config":
            continue
        for module in imported:
            if module.rpartition(".")[2] in ("views", "pages") and app_of(module) != app_of(name):
                pytest.fail(f"{name} imports {module}")


def test_only_pages_use_the_pages_toolkit(graph):
    """registry.page_tools is what the pages of every app share (config's urls too: the log-in
    page, the 404); the API and everything under it keep off it."""
    users = {name for name, imported in graph.items() if "registry.page_tools" in imported}
    assert {"training.pages", "inference.pages"} <= users  # other apps' pages may, and do
    for name in users:
        assert name.rpartition(".")[2] == "pages" or app_of(name) == "config", name


def connects_receivers(path):
    """Whether a file connects Django signal receivers (``@receiver`` or the model signals)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        names = {alias.name for alias in node.names}
        if node.module == "django.db.models.signals" or (
            node.module == "django.dispatch" and "receiver" in names
        ):
            return True
    return False


def test_receivers_live_apart_from_models_and_their_app_config_connects_them(graph):
    """A save that sets something off elsewhere shows in a module of its own, which the app's
    ready() imports, instead of hiding in models.py behind an import that shows nothing."""
    listeners = {name for name, path in project_modules().items() if connects_receivers(path)}
    assert "training.listeners" in listeners
    for name in listeners:
        assert name.rpartition(".")[2] != "models", name
        assert name in graph[f"{app_of(name)}.apps"], f"{app_of(name)}.apps does not import {name}"


# --- bench/ -----------------------------------------------------------------------------------

BENCH = ROOT / "bench"


def bench_scripts():
    """Every bench: each script in bench/ but the shared helpers' module."""
    return sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")


def test_every_bench_has_a_smoke_run():
    from tests.test_benches import BENCHES

    assert bench_scripts() == sorted({script for script, _, _ in BENCHES})


def test_a_bench_imports_no_other_bench():
    """What benches share lives in bench/common.py, one signature each."""
    benches = {name.removesuffix(".py") for name in bench_scripts()}
    for name in bench_scripts():
        imported = {m.removeprefix("bench.") for m in top_level_imports(BENCH / name)}
        imported |= {
            f"{node.module}".removeprefix("bench.")
            for node in ast.walk(ast.parse((BENCH / name).read_text()))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bench.")
        }
        assert not imported & benches, f"{name} imports {imported & benches}"


APPS = ("coprocessor", "registry", "training", "inference", "webhooks")


def test_every_module_of_the_apps_is_named_in_the_layout_docs():
    """A reader finds every module in docs/architecture.md's layout: Django's usual modules
    in the paragraph that names them, every other one in its package's row."""
    parts = (ROOT / "docs" / "architecture.md").read_text().split("## The parts")[1]
    usual, table = parts.split("| folder |")[0], parts.split("| folder |")[1]
    rows = {line.split("`")[1].rstrip("/"): line for line in table.splitlines()
            if line.startswith("| `") and line.split("`")[1].rstrip("/") in APPS}  # fmt: skip
    unnamed = [
        f"{package}/{path.name}"
        for package in APPS
        for path in sorted((ROOT / package).glob("*.py"))
        if path.name != "__init__.py"
        and f"`{path.name}`" not in rows[package]
        and (package == "coprocessor" or f"`{path.name}`" not in usual)
    ]
    assert not unnamed, f"not named in docs/architecture.md: {unnamed}"


def test_no_module_of_the_method_outgrows_one_reading():
    """The method's modules stay small enough to hold in one's head (600 lines)."""
    long = {
        path.name: lines
        for path in (ROOT / "coprocessor").glob("*.py")
        if (lines := len(path.read_text().splitlines())) > 600
    }
    assert not long, long
