"""Knobs of the crash harness: its seeds, and how many kill -9 rounds each seed runs.

    pytest tests/crash --crash-rounds 200 --crash-seed 1234
    CHINWAG_CRASH_ROUNDS=200 CHINWAG_CRASH_SEED=1234 pytest tests/crash
    CHINWAG_CRASH_SEED=random pytest tests/crash       # a fresh seed per test
    CHINWAG_CRASH_SEED=1,2,3 pytest tests/crash        # several, one test each

By default every backend runs the fixed seeds of ``DEFAULT_SEEDS``, one test
each, so that CI replays the same schedules of messages and kill delays on
every run (the daemon's own timing still varies). ``random`` draws a fresh one
for each test. The seed is in the test's id for a fixed one, and in every
failure's report (``crash seed`` section, with the command that replays it)
either way.

The options exist when pytest is pointed at tests/crash (or a file in it): pytest
reads a sub-folder's conftest only after parsing the command line, so a bare
``pytest`` from the root does not know them; the environment variables work
from anywhere.
"""

from __future__ import annotations

import os
import random
from collections.abc import Generator

import pytest

DEFAULT_ROUNDS = 5  # per seed: two seeds make the ten rounds a backend ran before
DEFAULT_SEEDS = (20240501, 1729)
ROUND_BUDGET_S = 30  # a round's own deadline (test_crash.ROUND_TIMEOUT_S)
RANDOM = "random"

SEED_KEY = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chinwag crash harness")
    group.addoption(
        "--crash-rounds",
        type=int,
        default=None,
        help=f"kill -9 rounds per seed ($CHINWAG_CRASH_ROUNDS, else {DEFAULT_ROUNDS})",
    )
    group.addoption(
        "--crash-seed",
        default=None,
        help="seeds of the crash harness's schedules, comma-separated, or 'random'"
        f" ($CHINWAG_CRASH_SEED, else {','.join(map(str, DEFAULT_SEEDS))})",
    )


def _option(config: pytest.Config, name: str) -> object:
    try:
        return config.getoption(name)
    except ValueError:  # the option is unknown: this conftest was not read at start-up
        return None


def rounds_of(config: pytest.Config) -> int:
    rounds = _option(config, "--crash-rounds")
    if not isinstance(rounds, int):
        rounds = int(os.environ.get("CHINWAG_CRASH_ROUNDS", DEFAULT_ROUNDS))
    if rounds < 1:
        raise pytest.UsageError(f"The crash harness needs at least one round, not {rounds}.")
    return rounds


def seeds_of(config: pytest.Config) -> list[int | str]:
    """The seeds asked for: fixed numbers, or ``random`` (drawn when the test runs)."""
    given = _option(config, "--crash-seed")
    text = given if isinstance(given, str) else os.environ.get("CHINWAG_CRASH_SEED", "")
    if not text.strip():
        return list(DEFAULT_SEEDS)
    if text.strip() == RANDOM:
        # Drawn in the test, not here: xdist's workers must collect the same tests.
        return [RANDOM]
    try:
        return [int(word) for word in text.split(",")]
    except ValueError:
        raise pytest.UsageError(
            f"CHINWAG_CRASH_SEED (--crash-seed) takes numbers, comma-separated, or 'random',"
            f" not {text!r}."
        ) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "crash_seed" in metafunc.fixturenames:
        seeds = seeds_of(metafunc.config)
        metafunc.parametrize(
            "crash_seed", seeds, indirect=True, ids=[f"seed={seed}" for seed in seeds]
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Each round has its own deadline; past the suite's default, the test's whole budget.
    budget = ROUND_BUDGET_S * rounds_of(config) + 120
    for item in items:
        if "crash_rounds" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(budget))


@pytest.fixture(scope="session")
def crash_rounds(pytestconfig: pytest.Config) -> int:
    return rounds_of(pytestconfig)


@pytest.fixture
def crash_seed(request: pytest.FixtureRequest) -> int:
    chosen = request.param
    seed = random.SystemRandom().randrange(2**32) if chosen == RANDOM else int(chosen)
    request.node.stash[SEED_KEY] = seed
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    seed = item.stash.get(SEED_KEY, None)
    if seed is not None and report.failed:
        nodeid = item.nodeid.replace(f"seed={RANDOM}", f"seed={seed}")
        replay = f"seed {seed}; replay: CHINWAG_CRASH_SEED={seed} pytest '{nodeid}'"
        report.sections.append(("crash seed", replay))
    return report
