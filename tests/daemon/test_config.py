"""The config file and the embedded defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from chinwag.daemon import ConfigError, load_config
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
    with pytest.raises(ConfigError):
        load_config(tmp_path / "absent.toml", tool_names=TOOL_NAMES)
