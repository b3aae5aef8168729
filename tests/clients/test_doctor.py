"""`chinwag doctor`, run as a subprocess: against a real daemon, none, a broken config,
and providers that list other models, refuse, or are not there at all."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import trio
from test_cli import CHINWAG

# The fake provider servers live with the provider tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "providers"))
from fake_anthropic import FakeAnthropic
from fake_openai import Status, open_fake_openai

START_HINT = (
    '→ start one with "chinwag serve", or enable the systemd socket: '
    "systemctl --user enable --now chinwag.socket"
)


def clean_env() -> dict[str, str]:
    """Our environment without the variables that would pick another config or socket."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CHINWAG_", "OPENAI_"))}


async def doctor(socket_path: Path, *args: str) -> tuple[int, list[str]]:
    """Run `chinwag doctor` without blocking the trio loop (the fake servers run in it)."""
    done = await trio.run_process(
        [CHINWAG, "--socket", str(socket_path), "doctor", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=clean_env(),
    )
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    return done.returncode, done.stdout.decode().splitlines()


def line(lines: list[str], start: str) -> str:
    found = [text for text in lines if text.startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


def hint_after(lines: list[str], start: str) -> str:
    """The hint printed under the line that starts with ``start``."""
    index = lines.index(line(lines, start))
    assert lines[index + 1].startswith("    → "), lines
    return lines[index + 1].strip()


def echo_config(root: Path, storage: str) -> str:
    return f"""
[daemon]
socket = "{root / "chinwag.sock"}"
storage = "{storage}"
shutdown_grace_s = 2.0

[agents.assistant]
provider = "echo"

[agents.helper]
provider = "echo"
"""


async def test_everything_passes_against_a_running_echo_daemon(daemon_factory, short_tmp) -> None:
    storage = f"sqlite:///{short_tmp / 'd' / 'chinwag.db'}"
    d = daemon_factory(echo_config(short_tmp / "d", storage), storage_url=storage)
    status, lines = await doctor(d.socket_path, "--config", str(d.config_path))
    assert status == 0, lines
    assert lines[-1] == "all checks passed"
    assert all(text.startswith("✓ ") for text in lines[:-1]), lines
    assert line(lines, "✓ config: ").startswith(f"✓ config: {d.config_path} (from --config) loads")
    assert line(lines, "✓ config socket: ") == (
        f"✓ config socket: {d.socket_path}, the one this command uses"
    )
    assert line(lines, "✓ socket: ") == f"✓ socket: {d.socket_path} (from --socket)"
    assert line(lines, "✓ daemon: ").startswith("✓ daemon: chinwag/0.1.0, up ")
    assert line(lines, "✓ storage: ") == f"✓ storage: {storage}: in use by the running daemon"
    for agent in ("assistant", "helper"):
        assert "echo (built in)" in line(lines, f"✓ agent {agent}: ")


async def test_a_jsonl_store_the_daemon_holds_is_in_use_not_broken(
    daemon_factory, short_tmp
) -> None:
    storage = f"jsonl:///{short_tmp / 'd' / 'store'}"
    d = daemon_factory(echo_config(short_tmp / "d", storage), storage_url=storage)
    status, lines = await doctor(d.socket_path, "--config", str(d.config_path))
    assert status == 0, lines
    assert line(lines, "✓ storage: ") == f"✓ storage: {storage}: in use by the running daemon"
    # Seen from a CLI that looks at another socket, the lock is someone else's.
    status, lines = await doctor(short_tmp / "other.sock", "--config", str(d.config_path))
    assert status == 1, lines
    assert "no daemon answers" in line(lines, "✗ storage: ")
    assert line(lines, "! config socket: ").startswith(
        f"! config socket: the config names {d.socket_path}, but this command uses "
        f"{short_tmp / 'other.sock'} (from --socket)"
    )


async def test_no_daemon_fails_the_socket_with_how_to_start_one(short_tmp) -> None:
    config = short_tmp / "config.toml"
    config.write_text('[agents.assistant]\nprovider = "echo"\n')
    socket_path = short_tmp / "none.sock"
    status, lines = await doctor(socket_path, "--config", str(config), "--storage", "memory:")
    assert status == 1, lines
    assert line(lines, "✗ socket: ") == (
        f"✗ socket: {socket_path} (from --socket): does not exist: no daemon is listening"
    )
    assert hint_after(lines, "✗ socket: ") == START_HINT
    assert line(lines, "✓ storage: ") == "✓ storage: memory:: opens"
    assert lines[-1] == "1 check failed"

    # A socket file nobody listens on (a daemon killed with -9 leaves one) is no better.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(socket_path))
    status, lines = await doctor(socket_path, "--config", str(config), "--storage", "memory:")
    assert status == 1, lines
    assert "nothing listens on it" in line(lines, "✗ socket: ")
    assert hint_after(lines, "✗ socket: ") == START_HINT


async def test_an_invalid_config_names_the_file_and_the_key(short_tmp) -> None:
    config = short_tmp / "config.toml"
    config.write_text('[agents.assistant]\nprovider = "echo"\nmodle = "typo"\n')
    status, lines = await doctor(short_tmp / "none.sock", "--config", str(config))
    assert status == 1, lines
    failed = line(lines, "✗ config: ")
    assert str(config) in failed and "`modle`" in failed, failed
    assert "refuses to start" in hint_after(lines, "✗ config: ")


def provider_config(openai_url: str, anthropic_url: str) -> str:
    return f"""
[providers.local]
kind = "openai"
base_url = "{openai_url}"
api_key = "test"

[providers.claude]
kind = "anthropic"
base_url = "{anthropic_url}"
api_key = "test"

[agents.listed]
provider = "local"
model = "fake-model"

[agents.unlisted]
provider = "local"
model = "gpt-absent"

[agents.coder]
provider = "claude"
model = "claude-sonnet-4-5"

[agents.plain]
provider = "echo"
"""


async def test_provider_models_listed_or_not(short_tmp) -> None:
    anthropic = FakeAnthropic(models=["claude-haiku-4-5-20251001", "claude-sonnet-4-5-20250929"])
    async with open_fake_openai() as openai, trio.open_nursery() as nursery:
        await nursery.start(anthropic.serve)
        openai.models = ["fake-model", "other-model"]
        config = short_tmp / "config.toml"
        config.write_text(provider_config(openai.base_url, anthropic.base_url))
        args = ("--config", str(config), "--storage", "memory:")
        status, lines = await doctor(short_tmp / "none.sock", *args)
        assert status == 1, lines
        assert line(lines, "✓ agent listed: ") == (
            f"✓ agent listed: local (openai at {openai.base_url}): model fake-model is listed"
        )
        assert line(lines, "✗ agent unlisted: ") == (
            f"✗ agent unlisted: local (openai at {openai.base_url}): model gpt-absent is not "
            "among the 2 models it lists"
        )
        assert hint_after(lines, "✗ agent unlisted: ") == (
            "→ set model in [agents.unlisted] to one it lists: fake-model, other-model"
        )
        assert line(lines, "✓ agent coder: ") == (
            f"✓ agent coder: claude (anthropic at {anthropic.base_url}): model claude-sonnet-4-5 "
            "is listed (as claude-sonnet-4-5-20250929)"
        )
        assert "echo" in line(lines, "✓ agent plain: ")
        # Agents on one provider share one listing.
        assert openai.model_listings == 1
        assert [r.path for r in anthropic.model_listings] == ["/v1/models?limit=1000"]

        # A key the endpoint refuses is a failure with its status, and a hint about keys.
        openai.models_status = Status(401, "Incorrect API key provided.")
        status, lines = await doctor(short_tmp / "none.sock", *args)
        assert status == 1, lines
        for agent in ("listed", "unlisted"):
            assert line(lines, f"✗ agent {agent}: ") == (
                f"✗ agent {agent}: local (openai at {openai.base_url}): The model provider "
                "answered 401: Incorrect API key provided."
            )
            assert hint_after(lines, f"✗ agent {agent}: ") == (
                "→ check the key of [providers.local] (api_key or api_key_env)"
            )
        nursery.cancel_scope.cancel()


async def test_an_unreachable_provider_fails_with_a_hint(short_tmp) -> None:
    # A bound TCP socket that does not listen: connecting to it is refused, and the
    # port stays ours for the test.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        openai_url = f"http://127.0.0.1:{port}/v1"
        anthropic_url = f"http://127.0.0.1:{port}"
        config = short_tmp / "config.toml"
        config.write_text(provider_config(openai_url, anthropic_url))
        status, lines = await doctor(
            short_tmp / "none.sock", "--config", str(config), "--storage", "memory:"
        )
    assert status == 1, lines
    refused = line(lines, "✗ agent listed: ")
    assert refused.startswith(
        f"✗ agent listed: local (openai at {openai_url}): The connection to the model "
        f"provider at {openai_url} failed: "
    ), refused
    assert hint_after(lines, "✗ agent listed: ") == (
        f"→ is the server at {openai_url} running? check base_url of [providers.local]"
    )
    assert line(lines, "✗ agent coder: ").startswith(
        f"✗ agent coder: claude (anthropic at {anthropic_url}): The Anthropic API cannot be "
        "reached: "
    )
    assert hint_after(lines, "✗ agent coder: ") == (
        f"→ is the server at {anthropic_url} running? check base_url of [providers.claude]"
    )
