"""`python -m chinwag.daemon --check`: what `chinwag doctor` asks of the daemon's side.

The CLI never imports the daemon, so the checks that need its code run here, in
a process of their own, and print one JSON ``CheckReport`` on stdout for the
CLI to render: which config file is used and whether it loads, whether the
storage URL opens, and whether each agent's provider answers and lists its
model, and whether each webhook's receiver accepts a connection. The socket
and the running daemon are the CLI's to check, through the client library.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import trio
from chinwag.protocol import (
    CheckFinding,
    CheckReport,
    ConfigSource,
    FindingStatus,
    default_socket_path,
    without_credentials,
)
from chinwag.storage import StorageError, open_store

from ._config import (
    BUILTIN_PROVIDERS,
    Config,
    ConfigError,
    ProviderConfig,
    WebhookConfig,
    default_config_path,
    default_storage_url,
    load_config,
)
from ._provider_kinds import make_provider
from ._providers import LIST_MODELS_TIMEOUT_S, ProviderError
from ._tools import TOOL_NAMES

#: The longest the storage check may take (a PostgreSQL server that does not answer).
STORAGE_TIMEOUT_S = 15.0
#: How long a webhook's receiver may take to accept a connection.
WEBHOOK_CONNECT_TIMEOUT_S = 3.0
# How many of an endpoint's models a hint names.
_MODELS_NAMED = 8


def run_check(
    config_arg: Path | None, storage_arg: str | None, *, store_in_use: bool = False
) -> CheckReport:
    """Every check: the config here, then storage and the providers concurrently, on trio."""
    source, path = _config_location(config_arg)
    config_path = str(path) if source != "embedded defaults" else None
    try:
        config = load_config(config_arg, tool_names=TOOL_NAMES)
    except ConfigError as exc:
        failed = CheckFinding(
            check="config",
            subject=str(path),
            status="fail",
            detail=str(exc),
            hint="fix it: `chinwag serve` refuses to start until the config loads",
        )
        return CheckReport(
            config_path=config_path,
            config_source=source,
            socket=None,
            socket_configured=False,
            findings=_shown([failed]),
        )
    if source == "embedded defaults":
        findings = [_defaults_finding(path)]
    else:
        detail = f"{path} (from {source}) loads: agents {', '.join(config.agents)}"
        findings = [CheckFinding(check="config", subject=str(path), status="ok", detail=detail)]
    storage_url = storage_arg or config.daemon.storage or default_storage_url()
    # Looked at before trio runs: these are blocking file system calls.
    storage = (
        _storage_finding(storage_url, "in_use", "served by the running daemon")
        if store_in_use
        else _check_local_store(storage_url)
    )
    findings += trio.run(_check_services, config, storage_url, storage)
    socket = config.daemon.socket
    return CheckReport(
        config_path=config_path,
        config_source=source,
        socket=str(Path(socket).expanduser()) if socket else str(default_socket_path()),
        socket_configured=socket is not None,
        findings=_shown(findings),
    )


def _shown(findings: list[CheckFinding]) -> list[CheckFinding]:
    """The findings as the report shows them: no URL with its credentials (a provider's
    `base_url`, a PostgreSQL store's URL), whichever check wrote it and wherever."""
    return [
        msgspec.structs.replace(
            finding,
            subject=without_credentials(finding.subject),
            detail=without_credentials(finding.detail),
            hint=without_credentials(finding.hint),
        )
        for finding in findings
    ]


async def _check_services(
    config: Config, storage_url: str, storage: list[CheckFinding] | None
) -> list[CheckFinding]:
    """The storage (unless already judged), every provider and every webhook, concurrently."""
    opened: list[CheckFinding] = []
    agents: list[CheckFinding] = []
    webhooks: list[CheckFinding] = []
    async with trio.open_nursery() as nursery:
        if storage is None:
            nursery.start_soon(_into, opened, partial(_open_store, storage_url))
        for provider in sorted({agent.provider for agent in config.agents.values()}):
            nursery.start_soon(_into, agents, partial(_check_provider, config, provider))
        for webhook in config.webhooks:
            nursery.start_soon(_into, webhooks, partial(_check_webhook, webhook))
    order = [webhook.id for webhook in config.webhooks]
    return [
        *(storage or opened),
        *sorted(agents, key=lambda finding: finding.subject),
        *sorted(webhooks, key=lambda finding: order.index(finding.subject)),
    ]


async def _into(
    out: list[CheckFinding], checking: Callable[[], Awaitable[list[CheckFinding]]]
) -> None:
    out.extend(await checking())


def _config_location(config_arg: Path | None) -> tuple[ConfigSource, Path]:
    """Which file the daemon would read, and why; `load_config`'s own order."""
    if config_arg is not None:
        return "--config", config_arg.absolute()
    path = default_config_path()
    if os.environ.get("CHINWAG_CONFIG"):
        return ("$CHINWAG_CONFIG" if path.exists() else "embedded defaults"), path
    return ("default" if path.exists() else "embedded defaults"), path


def _defaults_finding(path: Path) -> CheckFinding:
    if os.environ.get("CHINWAG_CONFIG"):
        return CheckFinding(
            check="config",
            subject=str(path),
            status="warn",
            detail=f"$CHINWAG_CONFIG names {path}, which does not exist: "
            "the daemon runs on the embedded defaults",
            hint="create that file, or unset CHINWAG_CONFIG",
        )
    return CheckFinding(
        check="config",
        subject=str(path),
        status="ok",
        detail=f"no file at {path}: the embedded defaults (agent assistant)",
    )


# --- storage -------------------------------------------------------------------------


_STORAGE_HINT = "fix storage in [daemon] of the config, or pass --storage URL"


def _storage_finding(
    url: str, status: FindingStatus, detail: str, hint: str = ""
) -> list[CheckFinding]:
    return [CheckFinding(check="storage", subject=url, status=status, detail=detail, hint=hint)]


def _check_local_store(url: str) -> list[CheckFinding] | None:
    """A sqlite or jsonl store that does not exist yet, or is locked; None: open it to see."""
    path = _local_path(url)
    if path is None:
        return None
    if not path.exists():
        ancestor = _existing_ancestor(path.parent)
        if not os.access(ancestor, os.W_OK | os.X_OK):
            detail = f"does not exist yet, and {ancestor} is not writable"
            return _storage_finding(url, "fail", detail, _STORAGE_HINT)
        return _storage_finding(url, "ok", "does not exist yet: the daemon creates it")
    if url.startswith("jsonl:") and _jsonl_locked(path):
        return _storage_finding(url, "in_use", "locked by another process")
    return None


async def _open_store(url: str) -> list[CheckFinding]:
    try:
        with trio.fail_after(STORAGE_TIMEOUT_S):
            async with open_store(url):
                pass
    except trio.TooSlowError:
        detail = f"it did not open within {STORAGE_TIMEOUT_S:g} s"
        return _storage_finding(url, "fail", detail, _STORAGE_HINT)
    except (ValueError, StorageError) as exc:
        return _storage_finding(url, "fail", str(exc), _STORAGE_HINT)
    except Exception as exc:  # a backend's driver error (psycopg) that escaped as itself
        return _storage_finding(url, "fail", f"{type(exc).__name__}: {exc}", _STORAGE_HINT)
    return _storage_finding(url, "ok", "opens")


def _local_path(url: str) -> Path | None:
    """The file or directory a sqlite or jsonl URL names (SQLAlchemy's slashes), else None."""
    parts = urlsplit(url, allow_fragments=False)
    if parts.scheme not in ("sqlite", "jsonl") or parts.netloc or not parts.path.startswith("/"):
        return None  # not a local store, or malformed: opening it says why
    name = parts.path[1:]
    return Path(name) if name.strip("/") else None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _jsonl_locked(directory: Path) -> bool:
    """True when another process holds the store's lock (storage/_jsonl.py: ``DIR/lock``)."""
    try:
        fd = os.open(directory / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # no lock file yet: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the lock, if we took it
    return False


# --- providers ---------------------------------------------------------------------------


async def _check_provider(config: Config, name: str) -> list[CheckFinding]:
    """List the provider's models once, then judge each agent on it."""
    table = (BUILTIN_PROVIDERS | config.providers)[name]
    agents = {agent: c for agent, c in config.agents.items() if c.provider == name}
    where = _where(name, table)
    provider = make_provider(table)
    models: list[str] | None = None
    failure: ProviderError | None = None
    try:
        # The provider's own timeout bounds the request; this bounds the rest.
        with trio.move_on_after(LIST_MODELS_TIMEOUT_S + 5) as scope:
            models = await provider.list_models()
        if scope.cancelled_caught:
            failure = ProviderError(f"It did not answer within {LIST_MODELS_TIMEOUT_S:g} s.")
    except ProviderError as exc:
        failure = exc
    finally:
        await provider.aclose()
    findings = []
    for agent, agent_config in agents.items():
        model = agent_config.model

        def found(status: FindingStatus, detail: str, hint: str = "", agent: str = agent) -> None:
            findings.append(
                CheckFinding(check="agent", subject=agent, status=status, detail=detail, hint=hint)
            )

        if table.kind == "echo":
            found("ok", "echo (built in): answers whatever the model is called")
        elif failure is not None:
            found("fail", f"{where}: {failure.message}", _failure_hint(name, table, failure))
        elif not model:
            found("fail", f"{where}: no model set", f"set model in [agents.{agent}]")
        elif models is None:
            found("ok", f"{where}: model {model} (the endpoint takes any name)")
        elif (listed := _listed(model, models)) is not None:
            also = f" (as {listed})" if listed != model else ""
            found("ok", f"{where}: model {model} is listed{also}")
        else:
            named = ", ".join(models[:_MODELS_NAMED]) + ("…" if len(models) > _MODELS_NAMED else "")
            found(
                "fail",
                f"{where}: model {model} is not among the {len(models)} models it lists",
                f"set model in [agents.{agent}] to one it lists: {named or 'none'}",
            )
    return findings


def _where(name: str, table: ProviderConfig) -> str:
    default_host = {"openai": "api.openai.com", "anthropic": "api.anthropic.com"}
    host = table.base_url or default_host.get(table.kind, "")
    return f"{name} ({table.kind}{f' at {host}' if host else ''})"


def _failure_hint(name: str, table: ProviderConfig, failure: ProviderError) -> str:
    if failure.status in (401, 403):
        return f"check the key of [providers.{name}] (api_key or api_key_env)"
    if failure.status == 404:
        return (
            f"check base_url of [providers.{name}] (an OpenAI-compatible one ends in /v1), "
            "or the server does not list its models"
        )
    if failure.status is None:
        where = table.base_url or "the API"
        return f"is the server at {where} running? check base_url of [providers.{name}]"
    return f"see what the server at {table.base_url or 'the API'} says; retry later"


def _listed(model: str, models: list[str]) -> str | None:
    """The listed id ``model`` names: itself, Ollama's ``:latest``, or a dated alias."""
    if model in models:
        return model
    if f"{model}:latest" in models:
        return f"{model}:latest"
    # Anthropic lists dated ids (claude-sonnet-4-5-20250929) and takes the alias.
    dated = sorted(m for m in models if m.startswith(f"{model}-") and m[len(model) + 1 :].isdigit())
    return dated[-1] if dated else None


# --- webhooks ----------------------------------------------------------------------------


async def _check_webhook(webhook: WebhookConfig) -> list[CheckFinding]:
    """Whether the receiver's host resolves here and accepts a TCP connection. No request
    is sent: any POST would be a delivery, and a HEAD is one a receiver may refuse."""
    parts = urlsplit(webhook.url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    # Shown without credentials or query (a token may sit there), and never the secret.
    where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    hint = (
        "deliveries wait in the outbox, retried for 24 h: start the receiver, or fix url"
        " in [[webhooks]]"
    )

    def found(status: FindingStatus, detail: str) -> list[CheckFinding]:
        return [
            CheckFinding(
                check="webhook",
                subject=webhook.id,
                status=status,
                detail=f"{where}: {detail}",
                hint=hint if status != "ok" else "",
            )
        ]

    try:
        with trio.fail_after(WEBHOOK_CONNECT_TIMEOUT_S):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        return found("warn", f"no connection within {WEBHOOK_CONNECT_TIMEOUT_S:g} s")
    except socket.gaierror as exc:
        return found("warn", f"{host} does not resolve from here ({exc.strerror})")
    except OSError as exc:
        return found("warn", f"nothing accepts connections at {host}:{port} ({_why(exc)})")
    await stream.aclose()
    return found("ok", f"accepts connections at {host}:{port}")


def _why(exc: OSError) -> str:
    """Why a connection failed: each address's reason (trio's own error only sums them)."""
    cause = exc.__cause__
    tried = cause.exceptions if isinstance(cause, BaseExceptionGroup) else [exc]
    reasons = [
        os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e) for e in tried
    ]
    return "; ".join(dict.fromkeys(reasons))
