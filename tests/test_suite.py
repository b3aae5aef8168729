"""What the suite promises about itself: no test hangs, CI runs the README's command,
and every expected exception is named by its code or its message."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_test_has_a_time_limit(pytestconfig: pytest.Config) -> None:
    configured = _pyproject()["tool"]["pytest"]["ini_options"]["timeout"]
    assert isinstance(configured, int | float) and 0 < configured <= 120, configured
    # The plugin is there to read it (an unknown ini key raises), and the limit holds here.
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert float(pytestconfig.getini("timeout")) == configured
    extra = " ".join(_pyproject()["project"]["optional-dependencies"]["test"])
    assert "pytest-timeout" in extra and "pytest-xdist" in extra


HANGS = """
import time

import pytest
import trio


@pytest.mark.timeout(0.5)
def test_sleeps():
    time.sleep(30)


@pytest.mark.timeout(0.5)
@pytest.mark.trio
async def test_awaits_forever():
    await trio.sleep_forever()
"""


def test_a_hang_fails_its_test_at_the_limit(tmp_path: Path) -> None:
    # The limit in action, in a pytest of its own: a blocking call and a trio wait.
    (tmp_path / "test_hang.py").write_text(HANGS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_hang.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    for name in ("test_sleeps", "test_awaits_forever"):
        assert f"FAILED test_hang.py::{name} - Failed: Timeout" in result.stdout, result.stdout
    assert "2 failed" in result.stdout, result.stdout


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"run the whole suite[^`]*```sh\n(.+?)\n```", readme, re.S)
    assert found, "the README shows how to run the suite"
    return found.group(1).strip()


def test_ci_runs_the_readme_test_command_in_parallel() -> None:
    command = _readme_test_command()
    assert "-n auto" in command or "-n" in _pyproject()["tool"]["pytest"]["ini_options"].get(
        "addopts", ""
    ), command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, f"{command!r} is not a line of .ci/run"
    assert shlex.split(command)[-3:] == ["pytest", "-n", "auto"]


def _raises_without_a_name(path: Path) -> list[str]:
    """Each ``pytest.raises`` in ``path`` with no ``match=`` whose exception is never read."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[int] = set()
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        read = {
            node.id
            for node in ast.walk(func)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
        }
        for node in ast.walk(func):
            if not isinstance(node, ast.With | ast.AsyncWith):
                continue
            for item in node.items:
                call = item.context_expr
                if not (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "raises"
                    and isinstance(call.func.value, ast.Name)
                    and call.func.value.id == "pytest"
                ):
                    continue
                if any(keyword.arg == "match" for keyword in call.keywords):
                    continue
                name = item.optional_vars
                if isinstance(name, ast.Name) and name.id in read:
                    continue  # `as err`, then err.value.code or its message is checked
                found.add(call.lineno)
    return [f"{path.relative_to(ROOT)}:{line}" for line in sorted(found)]


def test_every_pytest_raises_names_the_errors_code_or_message() -> None:
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 50
    unnamed = [where for path in files for where in _raises_without_a_name(path)]
    assert unnamed == [], (
        "pytest.raises with neither match= nor a check of the caught error: " + ", ".join(unnamed)
    )


def test_every_mutation_of_the_mutation_check_still_applies() -> None:
    # Its edits are text: code that moved would make the check fail to run, not pass.
    from mutation_check import MUTATIONS

    assert len(MUTATIONS) == 9
    for mutation in MUTATIONS:
        source = (ROOT / mutation.path).read_text()
        assert source.count(mutation.old) == 1, f"{mutation.key}: {mutation.path} changed"
        for test in mutation.tests:
            assert (ROOT / test).is_file(), f"{mutation.key}: no {test}"
