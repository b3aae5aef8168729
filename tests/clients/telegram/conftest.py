"""The bridge tests' fixtures: one daemon they share, PTB_TIMEDELTA."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def retry_after_as_timedelta(monkeypatch: pytest.MonkeyPatch) -> None:
    # As `chinwag telegram` sets it: python-telegram-bot's coming type for
    # durations, instead of a deprecation warning on each RetryAfter.
    monkeypatch.setenv("PTB_TIMEDELTA", "true")


def _root_conftest() -> ModuleType:
    # pytest imports every conftest.py as a module named `conftest`, so
    # tests/conftest.py's DaemonProcess cannot be imported by name from here.
    path = Path(__file__).resolve().parents[2] / "conftest.py"
    spec = importlib.util.spec_from_file_location("chinwag_tests_root_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_daemon() -> Iterator[Any]:
    """A `chinwag serve` (tests/conftest.py's config) shared by the bridge tests.

    Starting one costs a second or more on a busy machine; the bridge tests
    would spend most of their time on it.
    """
    root = _root_conftest()
    with tempfile.TemporaryDirectory(prefix="cw-tg-", dir="/tmp") as directory:
        daemon = root.DaemonProcess(Path(directory), root.DEFAULT_CONFIG)
        daemon.start()
        try:
            yield daemon
        finally:
            daemon.stop()
