"""The daemon's configuration: `config.toml` (DESIGN.md), or embedded defaults."""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import math
import os
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import msgspec
import platformdirs
import standardwebhooks
from chinwag.protocol import APP_NAME, DEFAULT_MAX_FRAME_BYTES, is_loopback

from ._addresses import NAME, participant_name
from ._command import env_problem, sandbox_problem
from ._errors import RequestError
from ._tokens import server_tls
from ._tracing import tracing_problem
from ._workspace import workdir_problem


class ConfigError(Exception):
    """The configuration file is missing a key, mistyped, or inconsistent."""


class DaemonConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    socket: str | None = None
    storage: str | None = None
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_open_requests: int = 256
    # Clients connected at once; one more is refused (503) and closed.
    max_connections: int = 1024
    # The longest text a request may carry (a stream's content, an answer, compact
    # instructions, a memory query), in UTF-8 bytes; longer is refused (413).
    max_content_bytes: int = 1024 * 1024
    # A connection that has not said `hello` this long after connecting is closed (408).
    hello_timeout_s: float = 10.0
    # A connection with no open request that sends nothing for this long is closed
    # (408); None keeps idle connections open for as long as their clients like.
    idle_timeout_s: float | None = None
    # Frames waiting to be written to one client; a client that lets more pile
    # up is too slow and is disconnected (its runs go on).
    outgoing_frames: int = 16384
    # Bytes waiting to be written to one client, the same way. Past a quarter of it,
    # the daemon reads no more of that client's requests until the client catches up.
    outgoing_bytes: int = 8 * 1024 * 1024
    # Events buffered for one subscription before it is dropped as too slow.
    subscription_events: int = 4096
    shutdown_grace_s: float = 10.0
    ask_timeout_s: float | None = None
    # How many agents deep `delegate` may go (A asks B asks C: 2).
    delegate_depth: int = 3
    allowed_uids: list[int] = msgspec.field(default_factory=list)
    # Serve the daemon's own descendants (a run_command's processes) on its socket;
    # refused by default (401), since they could read every conversation.
    allow_descendants: bool = False
    # Idle conversations kept in memory; older idle ones are dropped and reload lazily.
    idle_conversations: int = 1024
    # Directories a conversation's cwd must lie under (None: the user's home).
    allowed_roots: list[str] | None = None
    # The longest a run_command may run, whatever timeout_s the call asks for.
    command_timeout_s: float = 600.0
    # "HOST:PORT" to serve Prometheus metrics on, at /metrics; None (the default): no
    # metrics, nothing listens. /metrics has no authentication: keep it on loopback
    # ("127.0.0.1:9464", "[::1]:9464"); any other host (0.0.0.0, a LAN address) shows
    # the daemon's counters to whoever can reach it, and is served only because this
    # key names it.
    metrics: str | None = None
    # "HOST:PORT" to serve clients on over TCP besides the Unix socket (None: only the
    # socket). With tls_cert and tls_key (PEM files) the connections are TLS; plain TCP
    # is served only on a loopback host. On TCP every client names a token of [tokens].
    # Port 0: the system picks a free one, which the `daemon_started` log line names.
    listen_tcp: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """``listen_tcp`` as (host, port); None when unset."""
        return None if self.listen_tcp is None else listen_address(self.listen_tcp, any_port=True)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``metrics`` as (host, port), brackets off an IPv6 host; None when unset."""
        return None if self.metrics is None else listen_address(self.metrics)

    @property
    def roots(self) -> list[str]:
        """``allowed_roots`` with ``~`` expanded; the user's home when unset."""
        if self.allowed_roots is None:
            return [os.path.expanduser("~")]
        return [os.path.expanduser(root) for root in self.allowed_roots]


class ProviderConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    kind: Literal["echo", "openai", "anthropic"]
    base_url: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None  # the name of the variable that holds the key
    extra_headers: dict[str, str] = msgspec.field(default_factory=dict)
    timeout_s: float = 600.0  # the longest wait for the provider's next byte
    max_retries: int = 2
    max_tokens: int = 4096  # the longest answer asked for, where the API needs a bound
    # anthropic only. Thinking: "adaptive" lets the model decide when and how much
    # to think (current models); thinking_budget asks for extended thinking of at
    # most this many tokens a step, counted in max_tokens (older models, and the
    # only way they think). Neither set (the default): no thinking is asked for.
    thinking: Literal["adaptive"] | None = None
    thinking_budget: int | None = None
    # How much a reasoning model spends on an answer, thinking included: anthropic's
    # output_config.effort ("low", "medium", "high", "max"), openai's reasoning_effort
    # ("minimal", "low", "medium", "high"). Unset, the API's default.
    effort: str | None = None

    def resolve_api_key(self) -> str | None:
        """``api_key``, else the value of ``api_key_env``; None when neither is set."""
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


class AgentConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    provider: str
    model: str = ""
    description: str = ""
    system_prompt: str = "You are a helpful assistant."
    tools: list[str] = msgspec.field(default_factory=list)
    max_steps: int = 16
    context_window: int = 32768
    compact_at: float | None = None
    # What memory_search searches besides the agent's notes: the archives of all
    # its conversations ("agent"), or only of the one it is in ("conversation":
    # for an agent many people talk to, who must not read each other's past).
    memory_scope: Literal["agent", "conversation"] = "agent"
    cwd: str | None = None
    # run_command: variables a command gets besides the allowlisted ones (PATH, HOME,
    # the locale...); and "bwrap" to run it in bubblewrap (cwd writable, system
    # read-only, no network unless sandbox_network; sandbox_read: more readable paths).
    env: dict[str, str] = msgspec.field(default_factory=dict)
    sandbox: Literal["none", "bwrap"] = "none"
    sandbox_network: bool = False
    sandbox_read: list[str] = msgspec.field(default_factory=list)
    # Which mail starts a run of this agent: mail whose `to` names it or that
    # @-mentions it ("direct"), only @-mentions ("mentions"), or none ("never").
    # @role and @everyone never do.
    mail: Literal["direct", "mentions", "never"] = "direct"
    # Limits on each of this agent's conversations, counted over its live history
    # (from its latest compaction on, so compacting lifts them); a stream that would
    # start a run past one ends `error` 409. None: no limit.
    max_messages: int | None = None  # user and assistant entries
    max_tokens: int | None = None  # the entries' text, estimated as compaction does
    expires_after: str | None = None  # a duration since the live history began: "12h", "7d"

    @property
    def expiry(self) -> timedelta | None:
        """``expires_after`` as a timedelta; None when unset."""
        return None if self.expires_after is None else parse_duration(self.expires_after)

    @property
    def limited(self) -> bool:
        """Whether any limit is set on this agent's conversations."""
        return (self.max_messages, self.max_tokens, self.expires_after) != (None, None, None)


WebhookEvent = Literal["dm", "mention", "space", "critical"]


class WebhookConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A `[[webhooks]]` table: which mail to POST where (daemon/_webhooks.py)."""

    url: str  # http or https
    # dm: to a participant by name, in no space; mention: @name or @role of a recipient;
    # space: posted to a space; critical: priority 3.
    events: list[WebhookEvent]
    to: str | None = None  # only mail this participant receives
    # Signs each delivery the Standard Webhooks way: "whsec_" and base64 of 24 to 64
    # random bytes. Never logged or shown.
    secret: str | None = None
    # Names the webhook's outbox, so a changed url, events or to keep its place in the
    # mail; without it the name is derived from those three.
    name: str | None = None

    def __repr__(self) -> str:
        secret = "None" if self.secret is None else "'<hidden>'"
        return (
            f"WebhookConfig(url={self.url!r}, events={self.events!r}, to={self.to!r}, "
            f"secret={secret}, name={self.name!r})"
        )

    @property
    def id(self) -> str:
        """``name``, else one derived from the url, events and to."""
        if self.name is not None:
            return self.name
        key = "\n".join([self.url, ",".join(sorted(set(self.events))), self.to or ""])
        return f"webhook-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    providers: dict[str, ProviderConfig] = msgspec.field(default_factory=dict)
    agents: dict[str, AgentConfig] = msgspec.field(default_factory=dict)
    webhooks: list[WebhookConfig] = msgspec.field(default_factory=list)
    # Who a TCP client is: "sha256:<hex of the token's SHA-256>" = the name it speaks as
    # (a sender or participant; "PREFIX*" for every name starting PREFIX; "*" for any).
    tokens: dict[str, str] = msgspec.field(default_factory=dict)


BUILTIN_PROVIDERS = {"echo": ProviderConfig(kind="echo")}
#: The smallest ``thinking_budget`` the Anthropic API accepts.
MIN_THINKING_BUDGET = 1024
#: The longest ``expires_after``: a century, which any conversation's date can add.
MAX_EXPIRY = timedelta(days=36500)
TOKEN_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta | None:
    """A duration such as ``30s``, ``30m``, ``2h``, ``1d`` or ``1w``; None when ``text`` is none."""
    if (match := _DURATION.fullmatch(text.strip())) is None:
        return None
    try:
        return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    except OverflowError:  # more days than timedelta holds
        return None


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")


def listen_address(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets) as (host, port); ``ValueError`` when not one.
    With ``any_port``, port 0 is one: the system's pick of a free port."""
    host, colon, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    elif not (colon and _HOST_NAME.fullmatch(host)):
        host = ""
    if not host or not port.isdigit() or not (0 if any_port else 1) <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host, int(port)


def default_config_path() -> Path:
    """`$CHINWAG_CONFIG`, else `config.toml` in the user config directory."""
    if explicit := os.environ.get("CHINWAG_CONFIG"):
        return Path(explicit)
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def default_storage_url() -> str:
    data_dir = Path(platformdirs.user_data_dir(APP_NAME))
    return f"sqlite:///{data_dir / 'chinwag.db'}"


DEFAULT_OPENAI_MODEL = "gpt-4o-mini"


def embedded_defaults() -> Config:
    """What `chinwag serve` runs on with no config file: one agent, `assistant`.

    On `openai` when `OPENAI_BASE_URL` or `OPENAI_API_KEY` is set (the model from
    `OPENAI_MODEL`, else gpt-4o-mini), else on the built-in `echo`.
    """
    tools = ["set_title", "ask_user"]
    if os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_KEY"):
        provider = ProviderConfig(
            kind="openai",
            base_url=os.environ.get("OPENAI_BASE_URL") or None,
            # A local server (a base URL) may need no key at all.
            api_key_env="OPENAI_API_KEY" if os.environ.get("OPENAI_API_KEY") else None,
        )
        assistant = AgentConfig(
            provider="openai",
            model=os.environ.get("OPENAI_MODEL") or DEFAULT_OPENAI_MODEL,
            description="General helper",
            tools=tools,
        )
        return Config(providers={"openai": provider}, agents={"assistant": assistant})
    assistant = AgentConfig(
        provider="echo", model="echo", description="General helper", tools=tools
    )
    return Config(agents={"assistant": assistant})


def load_config(path: Path | None, *, tool_names: frozenset[str]) -> Config:
    """Read and check the config file; the embedded defaults when there is none.

    ``path`` None means the default location, where a missing file is fine;
    an explicitly named file must exist.
    """
    explicit = path is not None
    path = path or default_config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"The config file {path} does not exist.") from None
        config = embedded_defaults()
        _check(config, "the embedded defaults", tool_names)
        return config
    except OSError as exc:
        raise ConfigError(f"The config file {path} cannot be read: {exc.strerror}.") from exc
    try:
        config = msgspec.convert(tomllib.loads(raw.decode()), Config)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from exc
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}.") from exc
    if not config.agents:
        defaults = embedded_defaults()
        config.agents = defaults.agents
        config.providers = defaults.providers | config.providers
    _check(config, path, tool_names)
    return config


def _check(config: Config, path: Path | str, tool_names: frozenset[str]) -> None:
    # First, so that no range check below compares a NaN (every comparison is False).
    tables: list[tuple[str, msgspec.Struct]] = [("[daemon]", config.daemon)]
    tables += [(f"[providers.{name}]", table) for name, table in config.providers.items()]
    tables += [(f"[agents.{name}]", table) for name, table in config.agents.items()]
    for where, table in tables:
        _check_finite(table, f"{path}: {where}")
    for name, provider in config.providers.items():
        _check_provider(provider, f"{path}: [providers.{name}]")
    providers = BUILTIN_PROVIDERS | config.providers
    roots = config.daemon.roots
    if relative := [root for root in roots if not os.path.isabs(root)]:
        raise ConfigError(f"{path}: [daemon] allowed_roots must be absolute paths, not {relative}.")
    if config.daemon.command_timeout_s <= 0:
        raise ConfigError(f"{path}: [daemon] command_timeout_s must be positive.")
    for name, agent in config.agents.items():
        where = f"{path}: [agents.{name}]"
        if agent.provider not in providers:
            raise ConfigError(
                f"{where} names provider {agent.provider!r}, which is neither built in "
                f"nor a [providers.*] table (known: {', '.join(sorted(providers))})."
            )
        unknown = sorted(set(agent.tools) - tool_names)
        if unknown:
            raise ConfigError(
                f"{where} names unknown tools {unknown} (available: {sorted(tool_names)})."
            )
        if agent.max_steps < 1:
            raise ConfigError(f"{where} max_steps must be at least 1.")
        if agent.context_window < 1:
            raise ConfigError(f"{where} context_window must be at least 1.")
        if agent.compact_at is not None and not 0 < agent.compact_at <= 1:
            raise ConfigError(f"{where} compact_at must be a fraction in (0, 1].")
        for key in ("max_messages", "max_tokens"):
            if (limit := getattr(agent, key)) is not None and limit < 1:
                raise ConfigError(f"{where} {key} must be at least 1.")
        if agent.expires_after is not None and not (
            (expiry := agent.expiry) is not None and timedelta(0) < expiry <= MAX_EXPIRY
        ):
            raise ConfigError(
                f'{where} expires_after must be a duration such as "12h" or "7d" (a number'
                f" of s, m, h, d or w) from 1s to 36500d, not {agent.expires_after!r}."
            )
        if agent.cwd is not None and (problem := workdir_problem(agent.cwd, roots)):
            raise ConfigError(f"{where}: {problem}")
        _check_commands(agent, where, providers)
    daemon = config.daemon
    if daemon.max_frame_bytes < 1024:
        raise ConfigError(f"{path}: [daemon] max_frame_bytes must be at least 1024.")
    for key in (
        "max_open_requests",
        "max_connections",
        "max_content_bytes",
        "outgoing_frames",
        "outgoing_bytes",
        "subscription_events",
    ):
        if getattr(daemon, key) < 1:
            raise ConfigError(f"{path}: [daemon] {key} must be at least 1.")
    for key in ("hello_timeout_s", "idle_timeout_s", "ask_timeout_s"):
        if (value := getattr(daemon, key)) is not None and value <= 0:
            raise ConfigError(f"{path}: [daemon] {key} must be positive.")
    # 0 means none: no grace, no delegation, no idle conversation kept in memory.
    for key in ("shutdown_grace_s", "delegate_depth", "idle_conversations"):
        if getattr(daemon, key) < 0:
            raise ConfigError(f"{path}: [daemon] {key} must not be negative.")
    if negative := [uid for uid in daemon.allowed_uids if uid < 0]:
        raise ConfigError(f"{path}: [daemon] allowed_uids holds {negative}, which no user has.")
    if daemon.metrics is not None:
        try:
            listen_address(daemon.metrics)
        except ValueError:
            raise ConfigError(
                f'{path}: [daemon] metrics must be "HOST:PORT", such as "127.0.0.1:9464", '
                f"not {daemon.metrics!r}."
            ) from None
    _check_network(config, path)
    if problem := tracing_problem(os.environ):
        raise ConfigError(f"{problem} (from the daemon's environment).")
    _check_webhooks(config.webhooks, path)


def _check_network(config: Config, path: Path | str) -> None:
    daemon = config.daemon
    for digest in config.tokens:
        if not TOKEN_DIGEST.fullmatch(digest):
            raise ConfigError(
                f'{path}: [tokens] keys are "sha256:" and the 64 hex digits of a token\'s '
                f"SHA-256 (`chinwag token NAME` prints one), not {digest[:16]!r}..."
            )
    for name in config.tokens.values():
        if not name or len(name.encode()) > 256 or any(ord(ch) < 32 for ch in name):
            raise ConfigError(f"{path}: [tokens] names are 1 to 256 bytes, not {name!r}.")
    if daemon.listen_tcp is None:
        return
    try:
        host, _ = listen_address(daemon.listen_tcp, any_port=True)
    except ValueError:
        raise ConfigError(
            f'{path}: [daemon] listen_tcp must be "HOST:PORT", such as "0.0.0.0:7433", '
            f"not {daemon.listen_tcp!r}."
        ) from None
    if (daemon.tls_cert is None) != (daemon.tls_key is None):
        raise ConfigError(f"{path}: [daemon] tls_cert and tls_key go together: set both or none.")
    if daemon.tls_cert is None and not is_loopback(host):
        raise ConfigError(
            f"{path}: [daemon] listen_tcp on {host} needs tls_cert and tls_key: plain TCP is "
            "served only on a loopback address (127.0.0.1, ::1, localhost)."
        )
    if daemon.tls_cert is not None and daemon.tls_key is not None:
        try:
            server_tls(daemon.tls_cert, daemon.tls_key)  # read now: a bad file fails the start
        except ValueError as exc:
            raise ConfigError(f"{path}: [daemon] {exc}.") from exc
    if not config.tokens:
        raise ConfigError(
            f"{path}: [daemon] listen_tcp needs a [tokens] table: every TCP client names one "
            "(`chinwag token NAME` makes one)."
        )


def _check_finite(table: msgspec.Struct, where: str) -> None:
    """Refuse NaN and infinities in any float key of ``table``, today's and those to come.

    TOML reads ``nan`` and ``inf`` as floats, and the daemon would take them for
    durations: a NaN deadline crashes trio where it is first used.
    """
    for key, value in msgspec.structs.asdict(table).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where} {key} must be a finite number, not {value}.")


def _check_commands(agent: AgentConfig, where: str, providers: dict[str, ProviderConfig]) -> None:
    """An agent's run_command keys: an env that gives away nothing, a sandbox that works here."""
    key_names = {p.api_key_env for p in providers.values() if p.api_key_env}
    keys = {key for p in providers.values() if (key := p.resolve_api_key())}
    for name, value in agent.env.items():
        if problem := env_problem(name, key_names):
            raise ConfigError(f"{where} env sets {name}, {problem}.")
        if value in keys:
            raise ConfigError(
                f"{where} env sets {name} to a provider's key, which commands never see."
            )
    if agent.sandbox == "none":
        for key in ("sandbox_network", "sandbox_read"):
            if getattr(agent, key):
                raise ConfigError(f'{where} sets {key}, which only sandbox = "bwrap" takes.')
    elif problem := sandbox_problem(agent.sandbox):
        raise ConfigError(f'{where} sets sandbox = "{agent.sandbox}", but {problem}.')
    if relative := [p for p in agent.sandbox_read if not os.path.isabs(os.path.expanduser(p))]:
        raise ConfigError(f"{where} sandbox_read must list absolute paths, not {relative}.")


def _check_provider(provider: ProviderConfig, where: str) -> None:
    if provider.api_key and provider.api_key_env:
        raise ConfigError(f"{where} sets both api_key and api_key_env; keep one.")
    if provider.api_key_env and not provider.resolve_api_key():
        raise ConfigError(
            f"{where} takes its key from ${provider.api_key_env}, which is not set "
            "in the daemon's environment."
        )
    if provider.kind == "openai" and provider.base_url is None and not provider.resolve_api_key():
        # Only local servers (a base_url) go without a key; api.openai.com needs one.
        raise ConfigError(f"{where} talks to api.openai.com, which needs api_key or api_key_env.")
    if provider.timeout_s <= 0:
        raise ConfigError(f"{where} timeout_s must be positive.")
    if provider.max_retries < 0:
        raise ConfigError(f"{where} max_retries must not be negative.")
    if provider.max_tokens < 1:
        raise ConfigError(f"{where} max_tokens must be at least 1.")
    for key in ("thinking", "thinking_budget"):
        if getattr(provider, key) is not None and provider.kind != "anthropic":
            raise ConfigError(f'{where} sets {key}, which only kind = "anthropic" takes.')
    if provider.thinking is not None and provider.thinking_budget is not None:
        raise ConfigError(
            f'{where} sets both thinking = "{provider.thinking}" and thinking_budget; keep'
            " thinking for a model that thinks adaptively, thinking_budget for one that does not."
        )
    if provider.effort is not None and provider.kind == "echo":
        raise ConfigError(f'{where} sets effort, which kind = "echo" does not take.')
    if provider.effort is not None and not provider.effort.strip():
        raise ConfigError(f'{where} effort is empty; give a level, such as "medium", or none.')
    if (budget := provider.thinking_budget) is not None:
        if budget < MIN_THINKING_BUDGET:
            raise ConfigError(
                f"{where} thinking_budget must be at least {MIN_THINKING_BUDGET} "
                "(the Anthropic API's minimum)."
            )
        if budget >= provider.max_tokens:
            # The API refuses it: the thinking is part of the answer max_tokens bounds.
            raise ConfigError(
                f"{where} thinking_budget ({budget}) must be less than max_tokens "
                f"({provider.max_tokens}), which bounds thinking and answer together; "
                "raise max_tokens or lower thinking_budget."
            )


#: How to make a webhook secret, for the message that refuses one.
_NEW_SECRET = (
    "python -c 'import base64, os; print(\"whsec_\" + base64.b64encode(os.urandom(32)).decode())'"
)


def _check_webhooks(webhooks: list[WebhookConfig], path: Path | str) -> None:
    """Each `[[webhooks]]` table: an http(s) url, known events, a participant's name in
    ``to`` (case-folded here), a secret the Standard Webhooks library takes, and an id of
    its own. No message shows a secret."""
    seen: dict[str, int] = {}
    for number, webhook in enumerate(webhooks, 1):
        where = f"{path}: [[webhooks]] number {number}"
        parts = urlsplit(webhook.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where} url must be an http:// or https:// URL with a host.")
        if not webhook.events:
            raise ConfigError(
                f'{where} events must name at least one of "dm", "mention", "space", "critical".'
            )
        if webhook.to is not None:
            try:
                webhook.to = participant_name(webhook.to, "to")
            except RequestError as exc:
                raise ConfigError(f"{where} {exc.message}") from None
        if webhook.name is not None and not NAME.fullmatch(webhook.name):
            raise ConfigError(
                f"{where} name must be 1-64 characters of a-z, 0-9, _ . : -, starting with a"
                " letter or digit."
            )
        if webhook.secret is not None and (problem := _secret_problem(webhook.secret)):
            raise ConfigError(f"{where} secret {problem}; make one with {_NEW_SECRET}")
        if (earlier := seen.setdefault(webhook.id, number)) != number:
            raise ConfigError(
                f"{where} is the same webhook as number {earlier} (url, events and to); give"
                " each a different name."
            )


def _secret_problem(secret: str) -> str | None:
    """Why ``secret`` cannot sign deliveries, without showing it; None when it can."""
    encoded = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        return 'must be "whsec_" and base64 (or base64 alone)'
    if not 24 <= len(key) <= 64:
        return f"must hold 24 to 64 bytes once base64-decoded, not {len(key)}"
    standardwebhooks.Webhook(secret)  # what the deliveries are signed with takes it
    return None
