"""The config file and the embedded defaults."""

from __future__ import annotations

import typing
from pathlib import Path

import msgspec
import pytest
from chinwag.daemon import ConfigError, load_config
from chinwag.daemon._config import AgentConfig, DaemonConfig, ProviderConfig
from chinwag.daemon._tools import TOOL_NAMES

MISSING = Path("/nonexistent/chinwag/config.toml")


@pytest.fixture(autouse=True)
def no_openai_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHINWAG_CONFIG", str(MISSING))


def test_without_a_file_the_assistant_runs_on_echo() -> None:
    config = load_config(None, tool_names=TOOL_NAMES)
    assert list(config.agents) == ["assistant"]
    assert config.agents["assistant"].provider == "echo"


def test_without_a_file_an_openai_key_puts_the_assistant_on_openai(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    config = load_config(None, tool_names=TOOL_NAMES)
    agent = config.agents["assistant"]
    provider = config.providers[agent.provider]
    assert (provider.kind, provider.base_url, provider.resolve_api_key()) == (
        "openai",
        None,
        "sk-test",
    )
    assert agent.model == "gpt-4o-mini"


def test_a_local_openai_server_needs_no_key(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1")
    monkeypatch.setenv("OPENAI_MODEL", "qwen3:8b")
    config = load_config(None, tool_names=TOOL_NAMES)
    agent = config.agents["assistant"]
    provider = config.providers[agent.provider]
    assert provider.base_url == "http://127.0.0.1:11434/v1" and provider.resolve_api_key() is None
    assert agent.model == "qwen3:8b"


def test_config_mistakes_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    cases = {
        "[daemon]\nmax_open_request = 3\n": "max_open_request",
        '[agents.a]\nprovider = "nowhere"\n': "nowhere",
        '[agents.a]\nprovider = "echo"\ntools = ["rm_rf"]\n': "rm_rf",
        '[agents.a]\nprovider = "echo"\nmax_steps = 0\n': "max_steps",
        "not toml at all [": "not valid TOML",
    }
    for text, needle in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(path, tool_names=TOOL_NAMES)
        assert needle in str(err.value) and str(path) in str(err.value), text
    with pytest.raises(ConfigError, match=r"The config file .*absent\.toml does not exist\."):
        load_config(tmp_path / "absent.toml", tool_names=TOOL_NAMES)


def _float_keys(struct: type) -> list[str]:
    """The struct's keys that hold a float (alone or beside None)."""
    return [
        field.name
        for field in msgspec.structs.fields(struct)
        if float in (field.type, *typing.get_args(field.type))
    ]


def _refusal(path: Path, table: str, key: str, value: str) -> str:
    """Why a config whose ``table`` (daemon, a provider or an agent) sets ``key`` to
    ``value`` is refused; it must name the file and the key."""
    if table == "daemon":
        text = f"[daemon]\n{key} = {value}\n"
    elif table == "provider":
        local = 'kind = "openai"\nbase_url = "http://127.0.0.1:1/v1"'
        text = f"[providers.p]\n{local}\n{key} = {value}\n"
    else:
        text = f'[agents.a]\nprovider = "echo"\n{key} = {value}\n'
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, tool_names=TOOL_NAMES)
    message = str(err.value)
    assert str(path) in message and key in message, message
    return message


@pytest.mark.parametrize(
    ("table", "key"),
    [("daemon", key) for key in _float_keys(DaemonConfig)]
    + [("provider", key) for key in _float_keys(ProviderConfig)]
    + [("agent", key) for key in _float_keys(AgentConfig)],
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_number_that_is_not_finite_is_refused_naming_file_and_key(
    tmp_path: Path, table: str, key: str, value: str
) -> None:
    # idle_timeout_s = nan crashed the daemon on the first hello, shutdown_grace_s = nan at
    # shutdown: every float key, today's and tomorrow's, is checked.
    message = _refusal(tmp_path / "config.toml", table, key, value)
    assert "finite" in message, message


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("daemon", "shutdown_grace_s", "-1.0"),
        ("daemon", "ask_timeout_s", "0"),
        ("daemon", "ask_timeout_s", "-5"),
        ("daemon", "subscription_events", "0"),
        ("daemon", "delegate_depth", "-1"),
        ("daemon", "idle_conversations", "-1"),
        ("daemon", "allowed_uids", "[1000, -1]"),
        ("agent", "context_window", "0"),
    ],
)
def test_a_number_out_of_its_range_is_refused_naming_file_and_key(
    tmp_path: Path, table: str, key: str, value: str
) -> None:
    message = _refusal(tmp_path / "config.toml", table, key, value)
    assert "must" in message or "which no user has" in message, message


@pytest.mark.parametrize(
    ("key", "value"),
    [("shutdown_grace_s", "0"), ("delegate_depth", "0"), ("idle_conversations", "0")],
)
def test_zero_is_fine_where_it_means_none(tmp_path: Path, key: str, value: str) -> None:
    # No grace (cancel runs at once), no delegation, no idle conversation kept in memory.
    path = tmp_path / "config.toml"
    path.write_text(f"[daemon]\n{key} = {value}\n")
    assert getattr(load_config(path, tool_names=TOOL_NAMES).daemon, key) == 0
