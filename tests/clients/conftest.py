"""Client tests run every async test body on both anyio backends, asyncio and trio.

Each test is a plain function that calls ``run(fn)``, which drives ``fn`` with
``anyio.run`` on the parametrized backend: pytest-trio (in trio_mode) leaves
sync tests alone, so the two event loops never meet in one plugin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

Runner = Callable[[Callable[[], Awaitable[Any]]], Any]
BODY_S = 30.0


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(backend: str) -> Runner:
    def run_on_backend(fn: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            # A hung test fails instead of stalling the suite.
            with anyio.fail_after(BODY_S):
                return await fn()

        try:
            return anyio.run(bounded, backend=backend)
        except TimeoutError:
            raise AssertionError(
                f"the test's body did not finish within {BODY_S:g} s on {backend}: a wait in it"
                " (a frame, a run's end, the fake daemon's reply) never ended"
            ) from None

    return run_on_backend
