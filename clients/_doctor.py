"""`chinwag doctor`: the socket and the daemon checked from here, through the
client library; the config, the storage, the providers and the webhooks'
receivers by the daemon's own code, `python -m chinwag.daemon --check`, whose
`CheckReport` it reads. Each webhook's outbox comes from the running daemon's
`stats`.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import anyio
import click
import msgspec
from chinwag.protocol import CheckFinding, CheckReport, DaemonInfo, WebhookBacklog
from rich.console import Console
from rich.text import Text

from ._client import ChinwagError, connect
from ._render import line_console
from ._settings import CLIENT_NAME, Settings, describe

#: How long the doctor waits for the daemon's answers on the socket.
DOCTOR_SOCKET_TIMEOUT_S = 5.0
#: How long the daemon-side checks (`python -m chinwag.daemon --check`) may take.
DOCTOR_CHECK_TIMEOUT_S = 60.0

_START_HINT = (
    'start one with "chinwag serve", or enable the systemd socket: '
    "systemctl --user enable --now chinwag.socket"
)

CheckStatus = Literal["ok", "warn", "fail"]


@dataclass
class Check:
    """One line of the report, with what to do about it when it is not ok."""

    status: CheckStatus
    label: str
    detail: str
    hint: str = ""


@dataclass
class _DaemonSeen:
    """What the socket check learnt: whether a daemon answers, and the checks to print."""

    answers: bool
    checks: list[Check]
    webhooks: dict[str, WebhookBacklog] = field(default_factory=dict)  # the outboxes, by name


def _socket_source(settings: Settings) -> str:
    if settings.socket_given:
        return "--socket"
    if os.environ.get("CHINWAG_SOCKET"):
        return "$CHINWAG_SOCKET"
    return "the default"


def _uptime(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{seconds:.1f} s" if seconds < 10 else f"{secs} s"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


async def _check_socket(settings: Settings) -> _DaemonSeen:
    """Is there a socket (or the daemons the URLs name), and does a daemon answer on it?
    Its version and uptime if so, and the daemons it shares its store with."""
    path = settings.socket
    where = f"{path} (from {_socket_source(settings)})"
    if settings.url:
        where = f"{settings.url} (from --url or $CHINWAG_URL)"

    def failed(detail: str, hint: str = _START_HINT) -> _DaemonSeen:
        return _DaemonSeen(False, [Check("fail", "socket", f"{where}: {detail}", hint)])

    try:
        target = settings.target
    except click.BadParameter as exc:
        return failed(exc.message, "fix --url or $CHINWAG_URL")
    if not settings.url:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            return failed("does not exist: no daemon is listening")
        except OSError as exc:
            return failed(
                f"cannot be looked at: {exc.strerror}", "check the directory's permissions"
            )
        if not stat.S_ISSOCK(mode):
            hint = "point --socket or $CHINWAG_SOCKET at the daemon's socket"
            return failed("is not a socket", hint)
    try:
        with anyio.fail_after(DOCTOR_SOCKET_TIMEOUT_S):
            async with connect(target, client=CLIENT_NAME) as client:
                server = client.welcome.server
                stats = await client.stats()
    except TimeoutError:
        return failed(
            f"the daemon did not answer within {DOCTOR_SOCKET_TIMEOUT_S:g} s",
            "the daemon may be stuck: see its log, and restart it",
        )
    except (FileNotFoundError, ConnectionRefusedError):
        return failed("nothing listens on it (a socket file left behind)")
    except OSError as exc:
        return failed(
            f"cannot connect: {exc.strerror or exc}",
            "is it another user's daemon? use your own socket, or ask to be in its allowed_uids",
        )
    except ChinwagError as exc:
        return failed(f"the daemon refused the connection: {describe(exc)}", "see the daemon's log")
    daemon = (
        f"{server}, up {_uptime(stats.uptime_s)}, {_plural(stats.connections, 'connection')}, "
        f"{_plural(stats.runs_in_flight, 'run')} in flight"
    )
    checks = [Check("ok", "socket", where), Check("ok", "daemon", daemon)]
    checks += [_daemon_line(info) for info in stats.daemons]
    return _DaemonSeen(True, checks, {backlog.name: backlog for backlog in stats.webhooks})


def _daemon_line(info: DaemonInfo) -> Check:
    """One of the daemons sharing the store, as its row of liveness says."""
    beat = (datetime.now(UTC) - info.beat_at).total_seconds()
    detail = (
        f"{info.host} pid {info.pid} at {info.address}, up "
        f"{_uptime((datetime.now(UTC) - info.started_at).total_seconds())}, beat "
        f"{max(beat, 0):.1f} s ago, {_plural(info.runs_in_flight, 'run')} in flight"
    )
    if info.this:
        detail += " (this one)"
    return Check("ok", f"daemon {info.id}", detail)


async def _daemon_checks(
    config: Path | None, storage: str | None, *, daemon_runs: bool
) -> tuple[CheckReport | None, str]:
    """Run `python -m chinwag.daemon --check`: its report, or None and why not.

    With a daemon running, the store is left closed: opening it could migrate
    or lock what that daemon uses.
    """
    argv = [sys.executable, "-m", "chinwag.daemon", "--check"]
    if daemon_runs:
        argv.append("--store-in-use")
    if config is not None:
        argv += ["--config", str(config)]
    if storage is not None:
        argv += ["--storage", storage]
    try:
        with anyio.fail_after(DOCTOR_CHECK_TIMEOUT_S):
            done = await anyio.run_process(argv, stdin=subprocess.DEVNULL, check=False)
    except TimeoutError:
        return None, f"the checks did not finish within {DOCTOR_CHECK_TIMEOUT_S:g} s"
    try:
        return msgspec.json.decode(done.stdout, type=CheckReport), ""
    except msgspec.DecodeError:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        why = said[-1] if said else f"it exited with status {done.returncode}"
        return None, f"the checks could not run: {why}"


def _config_checks(report: CheckReport, settings: Settings, seen: _DaemonSeen) -> list[Check]:
    """The report's findings as lines, with the socket comparison and the storage lock judged."""
    checks: list[Check] = []
    for finding in report.findings:
        if finding.check == "webhook":
            checks.append(_webhook_check(finding, seen))
            continue
        label = finding.check if finding.check != "agent" else f"agent {finding.subject}"
        detail, hint = finding.detail, finding.hint
        status: CheckStatus
        if finding.status == "in_use":
            if seen.answers:
                status, detail = "ok", f"{finding.subject}: in use by the running daemon"
            else:
                status = "fail"
                detail = f"{finding.subject}: {detail}, and no daemon answers on {settings.socket}"
                hint = "another daemon holds it: stop that one, or give this one its own"
        else:
            status = finding.status
            if finding.check == "storage":
                detail = f"{finding.subject}: {detail}"
        checks.append(Check(status, label, detail, hint))
        if finding.check == "config" and report.socket_configured and report.socket:
            checks.append(_socket_match(report.socket, settings))
    return checks


def _webhook_check(finding: CheckFinding, seen: _DaemonSeen) -> Check:
    """A webhook's receiver as the daemon's check found it, and its outbox as the running
    daemon has it: deliveries retrying or given up make a warning."""
    status: CheckStatus = "ok" if finding.status == "ok" else "warn"  # deliveries wait
    hint = finding.hint
    backlog = seen.webhooks.get(finding.subject)
    if not seen.answers:
        outbox = "outbox unknown: no daemon answers"
    elif backlog is None:  # a daemon that runs an older config, or an older daemon
        outbox = "outbox unknown: the running daemon does not have this webhook"
    elif backlog.pending == 0 and backlog.failed == 0:
        outbox = "outbox empty"
    else:
        outbox = f"outbox: {backlog.pending} pending ({backlog.retrying} retrying)"
        if backlog.failed:
            outbox += f", {backlog.failed} given up"
        if backlog.retrying or backlog.failed:
            status = "warn"
            hint = hint or (
                "the daemon retries each delivery for 24 h, then gives it up: see"
                " webhook_retry_scheduled and webhook_gave_up in its log"
            )
    return Check(status, f"webhook {finding.subject}", f"{finding.detail}; {outbox}", hint)


def _socket_match(configured: str, settings: Settings) -> Check:
    if os.path.abspath(configured) == os.path.abspath(settings.socket):
        return Check("ok", "config socket", f"{configured}, the one this command uses")
    return Check(
        "warn",
        "config socket",
        f"the config names {configured}, but this command uses {settings.socket} "
        f"(from {_socket_source(settings)})",
        f"pass --socket {configured}, or set CHINWAG_SOCKET={configured}",
    )


_MARKS: dict[CheckStatus, tuple[str, str]] = {
    "ok": ("✓", "green"),
    "warn": ("!", "yellow"),
    "fail": ("✗", "red"),
}


def _show_check(console: Console, check: Check) -> None:
    mark, style = _MARKS[check.status]
    line = Text(f"{mark} ", style=f"bold {style}")
    line.append(f"{check.label}: ", style="bold")
    line.append(check.detail)
    console.print(line)
    if check.hint and check.status != "ok":
        console.print(Text(f"    → {check.hint}", style="dim"))


async def examine(settings: Settings, config: Path | None, storage: str | None) -> list[Check]:
    """Every check, in the order to show them."""
    seen = await _check_socket(settings)
    report, problem = await _daemon_checks(config, storage, daemon_runs=seen.answers)
    if report is None:
        failed = Check("fail", "config", problem, "run `chinwag serve` to see the error")
        return [failed, *seen.checks]
    checks = _config_checks(report, settings, seen)
    # The config first, then the socket and daemon, then storage and agents.
    first = [check for check in checks if check.label in ("config", "config socket")]
    rest = [check for check in checks if check not in first]
    return [*first, *seen.checks, *rest]


def show_checks(checks: list[Check]) -> bool:
    """Print every check and a summary; whether none failed (warnings do not count)."""
    console = line_console()
    for check in checks:
        _show_check(console, check)
    failures = sum(check.status == "fail" for check in checks)
    warnings = sum(check.status == "warn" for check in checks)
    if failures:
        console.print(Text(f"{_plural(failures, 'check')} failed", style="bold red"))
        return False
    summary = "all checks passed" + (f" ({_plural(warnings, 'warning')})" if warnings else "")
    console.print(Text(summary, style="bold green"))
    return True
