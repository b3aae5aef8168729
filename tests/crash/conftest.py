"""Knobs of the crash harness: how many kill -9 rounds per backend, and the seed.

    pytest tests/crash --crash-rounds 200 --crash-seed 1234
    CHINWAG_CRASH_ROUNDS=200 CHINWAG_CRASH_SEED=1234 pytest tests/crash

The options exist when pytest is pointed at tests/crash (or a file in it): pytest
reads a sub-folder's conftest only after parsing the command line, so a bare
``pytest`` from the root does not know them; the environment variables work
from anywhere. Without a seed each run draws a fresh one and prints it in every
failure message; passing it back replays the same schedule of messages and kill
delays (the daemon's own timing still varies from run to run).
"""

from __future__ import annotations

import os
import random

import pytest

DEFAULT_ROUNDS = 10


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chinwag crash harness")
    group.addoption(
        "--crash-rounds",
        type=int,
        default=None,
        help=f"kill -9 rounds per durable backend ($CHINWAG_CRASH_ROUNDS, else {DEFAULT_ROUNDS})",
    )
    group.addoption(
        "--crash-seed",
        type=int,
        default=None,
        help="seed of the crash harness's schedule ($CHINWAG_CRASH_SEED, else a fresh one)",
    )


def _option(config: pytest.Config, name: str) -> int | None:
    try:
        value = config.getoption(name)
    except ValueError:  # the option is unknown: this conftest was not read at start-up
        return None
    return value if isinstance(value, int) else None


@pytest.fixture(scope="session")
def crash_rounds(pytestconfig: pytest.Config) -> int:
    rounds = _option(pytestconfig, "--crash-rounds")
    if rounds is None:
        rounds = int(os.environ.get("CHINWAG_CRASH_ROUNDS", DEFAULT_ROUNDS))
    if rounds < 1:
        raise pytest.UsageError(f"The crash harness needs at least one round, not {rounds}.")
    return rounds


@pytest.fixture(scope="session")
def crash_seed(pytestconfig: pytest.Config) -> int:
    seed = _option(pytestconfig, "--crash-seed")
    if seed is None and (env := os.environ.get("CHINWAG_CRASH_SEED")):
        seed = int(env)
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    return seed
