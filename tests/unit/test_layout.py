"""The package's layout is its architecture (docs/architecture.md): no import runs back up.

Read from the source with ``ast`` (imports under ``TYPE_CHECKING`` count too: a type that
has to come from a later stage is as much a cycle for the reader as a call).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "worker"

# The pipeline's stages in the order an event meets them, with the modules that serve only
# that stage; ``offsets`` and ``stats`` are shared bookkeeping, ``runner`` wires them all.
STAGES = [
    {"registry", "fetch"},
    {"formats", "media", "decode"},
    {"dedupe"},
    {"batch"},
    {"dualwrite", "dispatch"},
    {"write"},
    {"commit"},
]
SHARED = {"offsets", "stats", "__init__"}

# What each part of the package may not import (a prefix matches its submodules).
FORBIDDEN = {
    "worker.model": ["worker.pipeline", "worker.embedding", "worker.sinks", "worker.analysis"],
    "worker.events": ["worker.pipeline", "worker.embedding", "worker.sinks", "worker.analysis"],
    "worker.config": ["worker.pipeline", "worker.embedding", "worker.sinks", "worker.ops"],
    "worker.embedding": ["worker.pipeline", "worker.sinks", "worker.analysis", "worker.read"],
    "worker.analysis": ["worker.pipeline", "worker.embedding", "worker.read", "worker.side"],
    "worker.sinks": ["worker.pipeline", "worker.embedding", "worker.analysis", "worker.read"],
    "worker.ops": ["worker.pipeline.runner", "worker.embedding", "worker.sinks"],
    "worker.read": ["worker.pipeline", "worker.analysis", "worker.side.interactions"],
    "worker.side": ["worker.pipeline", "worker.read"],
}
# Only the entry points (and the tools that run a whole worker) may import the app or the CLI.
ENTRY = ("worker.cli", "worker.app", "worker.__main__", "worker.tools")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
            # ``from worker.sinks import postgres`` imports the module worker.sinks.postgres
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "worker" or name.startswith("worker.")}


MODULES = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_modules_are_found() -> None:
    assert "worker.pipeline.runner" in MODULES and "worker.model" in MODULES
    assert "worker.pipeline.decode" in MODULES["worker.pipeline.runner"]


@pytest.mark.parametrize("index", range(len(STAGES)))
def test_no_stage_imports_a_later_stage_or_the_runner(index: int) -> None:
    later = {m for stage in STAGES[index + 1 :] for m in stage} | {"runner"}
    for short in STAGES[index]:
        imported = MODULES[f"worker.pipeline.{short}"]
        wrong = sorted(m for m in imported if m.removeprefix("worker.pipeline.") in later)
        assert not wrong, f"worker.pipeline.{short} imports {wrong}"


def test_every_pipeline_module_has_a_place_in_the_order() -> None:
    placed = {m for stage in STAGES for m in stage} | SHARED | {"runner"}
    present = {
        name.removeprefix("worker.pipeline.")
        for name in MODULES
        if name.startswith("worker.pipeline.")
    }
    assert present <= placed, f"not in STAGES: {sorted(present - placed)}"


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_no_part_imports_what_comes_after_it(part: str) -> None:
    wrong = [
        f"{name} imports {target}"
        for name, imported in MODULES.items()
        if within(name, part)
        for target in sorted(imported)
        if any(within(target, banned) for banned in FORBIDDEN[part])
    ]
    assert not wrong, "\n".join(wrong)


def test_only_entry_points_import_the_app_or_the_cli() -> None:
    wrong = [
        f"{name} imports {target}"
        for name, imported in MODULES.items()
        if not any(within(name, entry) for entry in ENTRY)
        for target in sorted(imported)
        if within(target, "worker.app") or within(target, "worker.cli")
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_but_the_tools_imports_the_tools() -> None:
    wrong = [
        f"{name} imports {target}"
        for name, imported in MODULES.items()
        if not within(name, "worker.tools") and name != "worker.cli"
        for target in sorted(imported)
        if within(target, "worker.tools")
    ]
    assert not wrong, "\n".join(wrong)


def test_every_test_file_is_unit_or_integration() -> None:
    """A test file at the top of tests/ would be neither marked nor in the fast set."""
    stray = sorted(p.name for p in (PACKAGE.parent / "tests").glob("test_*.py"))
    assert not stray, f"move these into tests/unit or tests/integration: {stray}"


def test_a_worker_loads_the_http_client_only_with_an_http_provider() -> None:
    """The app and the whole pipeline import no HTTP client: a worker on the local model
    never loads aiohttp (about 7 MB and 0.1 s at start); the providers import it, and no
    part of the worker imports another client."""
    code = (
        "import sys, worker.app, worker.cli, worker.pipeline.runner\n"
        "assert 'aiohttp' not in sys.modules, 'aiohttp'\n"
        "import worker.embedding.providers.dashscope\n"
        "assert 'aiohttp' in sys.modules\n"
        # One HTTP client: httpx is the tests' and the benchmarks' only.
        "import worker.embedding.providers.batch, worker.tools.devstack.registry\n"
        "assert 'httpx' not in sys.modules, 'httpx'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
