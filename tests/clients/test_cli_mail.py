"""`chinwag mail ...` and `chinwag inbox`, run as subprocesses against a real daemon."""

from __future__ import annotations

import os
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from chinwag.clients import connect
from chinwag.clients._mail_cli import _Filters
from chinwag.protocol import MailMessage, Ref
from deadlines import killed_after
from test_cli import CHINWAG, assert_clean_failure, chinwag
from test_cli_start import loaded_by


def env_as(name: str | None) -> dict[str, str]:
    """This process's environment with $CHINWAG_NAME set to ``name``, or unset."""
    env = {key: value for key, value in os.environ.items() if key != "CHINWAG_NAME"}
    if name is not None:
        env["CHINWAG_NAME"] = name
    return env


def mail(
    socket_path: Path, *args: str, name: str | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`chinwag ARGS` with $CHINWAG_NAME set to ``name`` (unset for None); must succeed."""
    result = chinwag(socket_path, *args, env=env_as(name), input=input)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def mail_json(socket_path: Path, *args: str, name: str | None = None) -> Any:
    """The one JSON document `chinwag ARGS --json` prints."""
    return msgspec.json.decode(mail(socket_path, *args, "--json", name=name).stdout)


def send(socket_path: Path, sender: str, *args: str) -> dict[str, Any]:
    posted: dict[str, Any] = mail_json(socket_path, "mail", "send", "--as", sender, *args)
    return posted


def test_send_with_every_option_reaches_the_inbox(daemon) -> None:
    send(daemon.socket_path, "carol", "--to", "dave", "carol is known from now on")
    posted = send(
        daemon.socket_path,
        "ana",
        "--to", "bob", "--to", "Carol",
        "--priority", "3",
        "--channel", "ci",
        "--format", "plain",
        "--json-payload", '{"build": 42, "ok": false}',
        "--mention", "carol",
        "--scope", "module:auth",
        "--ref", "pr:7",
        "--idempotency-key", "build-42",
        "the build broke",
    )  # fmt: skip
    assert posted["recipients"] == ["bob", "carol"]
    assert posted["msg_id"].startswith("m")
    assert "id" not in posted and "type" not in posted
    # Only a name never seen before gets a warning.
    assert posted["warnings"] == ["bob is not registered: it will get this when it does."]
    again = send(daemon.socket_path, "ana", "--to", "bob", "--idempotency-key", "build-42", "x")
    assert again["msg_id"] == posted["msg_id"]

    page = mail_json(daemon.socket_path, "mail", "inbox", "--as", "bob")
    assert page["unread"] == 1
    [item] = page["items"]
    message = item["message"]
    assert item["state"] == "delivered"
    assert message["msg_id"] == posted["msg_id"]
    assert (message["from"], message["to"], message["content"]) == (
        "ana",
        ["bob", "Carol"],
        "the build broke",
    )
    assert (message["priority"], message["channel"], message["format"]) == (3, "ci", "plain")
    assert message["structured"] == {"build": 42, "ok": False}
    assert message["mentions"] == ["carol"]
    assert message["scopes"] == [{"type": "module", "value": "auth"}]
    assert {"type": "pr", "value": "7"} in message["refs"]


def test_human_send_names_the_recipients_and_warns_on_stderr(daemon) -> None:
    result = mail(daemon.socket_path, "mail", "send", "--as", "ana", "--to", "bob", "hello")
    assert result.stdout.startswith("sent m")
    assert result.stdout.rstrip().endswith("to bob")
    assert "note: bob is not registered" in result.stderr


def test_text_dash_is_read_from_stdin(daemon) -> None:
    mail(daemon.socket_path, "mail", "send", "--as", "ana", "--to", "bob", "-", input="piped\n")
    [item] = mail_json(daemon.socket_path, "inbox", "--as", "bob")["items"]
    assert item["message"]["content"] == "piped\n"


def test_the_acting_name_is_as_else_chinwag_name_else_user(daemon) -> None:
    sock = daemon.socket_path
    mail(sock, "mail", "send", "--to", "bob", "from the default", name=None)
    mail(sock, "mail", "send", "--to", "bob", "from the environment", name="ana")
    mail(sock, "mail", "send", "--as", "carol", "--to", "bob", "from the option", name="ana")
    # Reading takes the same name: bob, by $CHINWAG_NAME.
    items = mail_json(sock, "mail", "inbox", name="bob")["items"]
    assert [(i["message"]["from"], i["message"]["content"]) for i in items] == [
        ("carol", "from the option"),
        ("ana", "from the environment"),
        ("user", "from the default"),
    ]
    sent = mail_json(sock, "mail", "sent", name=None)["items"]
    assert [item["message"]["content"] for item in sent] == ["from the default"]


def test_inbox_filters_and_the_human_table(daemon) -> None:
    sock = daemon.socket_path

    async def register_bob_with_a_role() -> None:
        async with connect(sock) as c:
            await c.register("bob", roles=["ops"])

    anyio.run(register_bob_with_a_role)
    first = send(sock, "ana", "--to", "bob", "--channel", "chatter", "routine note")
    send(sock, "ana", "--to", "@ops", "--priority", "3", "--scope", "module:db", "paging ops")
    send(sock, "ana", "--to", "bob", "--mention", "@bob", "look here")

    def contents(*filters: str) -> list[str]:
        page = mail_json(sock, "inbox", "--as", "bob", *filters)
        return [item["message"]["content"] for item in page["items"]]

    assert contents() == ["look here", "paging ops", "routine note"]
    assert contents("--channel", "chatter") == ["routine note"]
    assert contents("--mentions") == ["look here", "paging ops"]
    assert contents("--priority", "3") == ["paging ops"]
    assert contents("--scope", "module:db") == ["paging ops"]
    assert contents("--since", "1h") == ["look here", "paging ops", "routine note"]
    assert contents("--limit", "2") == ["look here", "paging ops"]
    mail(sock, "mail", "read", "--as", "bob", first["msg_id"])
    assert contents("--unread") == ["look here", "paging ops"]

    table = mail(sock, "mail", "inbox", "--as", "bob").stdout
    lines = table.splitlines()
    assert lines[0].split() == ["id", "from", "when", "priority", "state", "message"]
    assert first["msg_id"] in table
    assert "paging ops" in table and "critical" in table
    assert lines[-1] == "2 unread"
    limited = mail(sock, "inbox", "--as", "bob", "--limit", "1").stdout
    assert limited.splitlines()[-1] == "2 unread; more with a higher --limit"
    empty = mail(sock, "inbox", "--as", "nobody-yet").stdout
    assert empty.splitlines() == ["no mail for nobody-yet here", "0 unread"]


def test_chinwag_inbox_is_mail_inbox(daemon) -> None:
    send(daemon.socket_path, "ana", "--to", "bob", "one")
    shortcut = mail(daemon.socket_path, "inbox", "--as", "bob", "--unread", "--json").stdout
    full = mail(daemon.socket_path, "mail", "inbox", "--as", "bob", "--unread", "--json").stdout
    assert shortcut == full
    assert [i["message"]["content"] for i in msgspec.json.decode(full)["items"]] == ["one"]


def test_reply_threads_under_the_message(daemon) -> None:
    sock = daemon.socket_path
    question = send(sock, "ana", "--to", "bob", "lunch?")
    replied = mail(sock, "mail", "reply", "--as", "bob", question["msg_id"], "yes, noon").stdout
    assert replied.startswith("replied m")
    assert f"to ana in thread {question['msg_id']}" in replied
    answer = mail_json(
        sock, "mail", "reply", "--as", "ana", "--priority", "2", question["msg_id"], "ok"
    )
    assert answer["thread_id"] == question["msg_id"]
    assert answer["recipients"] == ["bob"]  # replying to what one wrote: its recipients

    page = mail_json(sock, "mail", "thread", "--as", "bob", question["msg_id"])
    assert [i["message"]["content"] for i in page["items"]] == ["lunch?", "yes, noon", "ok"]
    # bob's reply marked the question read for bob; bob wrote the middle one.
    assert [i.get("state") for i in page["items"]] == ["read", None, "pending"]

    shown = mail(sock, "mail", "thread", "--as", "bob", question["msg_id"]).stdout
    assert shown.index("lunch?") < shown.index("yes, noon") < shown.index("  ok")
    assert "ana → bob" in shown and "bob → ana" in shown
    assert "[high, pending]" in shown


def test_sent_with_each_recipients_state(daemon) -> None:
    sock = daemon.socket_path
    posted = send(sock, "ana", "--to", "bob", "--to", "carol", "status please")

    def states() -> dict[str, str]:
        [item] = mail_json(sock, "mail", "sent", "--as", "ana")["items"]
        return {d["name"]: d["state"] for d in item["deliveries"]}

    assert states() == {"bob": "pending", "carol": "pending"}
    mail(sock, "inbox", "--as", "bob")
    assert states() == {"bob": "delivered", "carol": "pending"}
    mail(sock, "mail", "read", "--as", "carol", posted["msg_id"])
    assert states() == {"bob": "delivered", "carol": "read"}

    plain = mail(sock, "mail", "sent", "--as", "ana").stdout
    assert plain.splitlines()[0].split() == ["id", "to", "when", "message"]
    assert posted["msg_id"] in plain and "status please" in plain
    with_status = mail(sock, "mail", "sent", "--as", "ana", "--status").stdout
    assert with_status.splitlines()[0].split() == ["id", "to", "when", "message", "status"]
    assert "bob delivered" in with_status
    assert "carol read" in with_status
    nothing = mail(sock, "mail", "sent", "--as", "bob").stdout
    assert nothing == "bob has sent no mail\n"


def test_read_shows_each_message_and_marks_it_read(daemon) -> None:
    sock = daemon.socket_path
    one = send(sock, "ana", "--to", "bob", "--channel", "ci", "--scope", "module:auth", "first")
    two = send(sock, "ana", "--to", "bob", "--json-payload", "[1, 2]", "second")
    assert mail_json(sock, "inbox", "--as", "bob", "--unread")["unread"] == 2

    shown = mail(sock, "mail", "read", "--as", "bob", one["msg_id"]).stdout
    assert shown.splitlines()[0] == one["msg_id"]
    assert "from: ana" in shown and "channel: ci" in shown and "scopes: module:auth" in shown
    assert "state: read" in shown
    assert shown.rstrip().endswith("first")

    replies = mail_json(sock, "mail", "read", "--as", "bob", one["msg_id"], two["msg_id"])
    assert [(r["message"]["content"], r["state"]) for r in replies] == [
        ("first", "read"),
        ("second", "read"),
    ]
    assert replies[1]["message"]["structured"] == [1, 2]
    assert mail_json(sock, "inbox", "--as", "bob", "--unread")["items"] == []


def test_who_lists_participants_with_presence(daemon) -> None:
    sock = daemon.socket_path
    send(sock, "ana", "--to", "bob", "hi")

    async def while_registered() -> tuple[Any, Any, str]:
        async with connect(sock) as c:
            await c.register("carol", kind="person", roles=["ops"])
            await c.heartbeat("carol", "on call")
            # The CLI is another process; the registration lives while this connection does.
            everyone = await anyio.to_thread.run_sync(
                lambda: mail_json(sock, "mail", "who", "--as", "ana")
            )
            online = await anyio.to_thread.run_sync(
                lambda: mail_json(sock, "mail", "who", "--online")
            )
            table = await anyio.to_thread.run_sync(lambda: mail(sock, "mail", "who").stdout)
        return everyone, online, table

    everyone, online, table = anyio.run(while_registered)
    by_name = {p["name"]: p for p in everyone["items"]}
    assert {"ana", "bob", "carol", "assistant", "helper"} <= set(by_name)
    assert (by_name["carol"]["online"], by_name["carol"]["status"]) == (True, "on call")
    assert by_name["carol"]["roles"] == ["ops"]
    assert (by_name["bob"]["online"], by_name["bob"]["unread"]) == (False, 1)
    assert {p["name"] for p in online["items"]} == {"assistant", "helper", "carol"}
    assert table.splitlines()[0].split() == [
        "name", "kind", "roles", "presence", "last", "seen", "status", "unread"
    ]  # fmt: skip
    carol = next(line for line in table.splitlines() if line.split()[0] == "carol")
    assert carol.split()[:4] == ["carol", "person", "ops", "online"]
    assert "on call" in carol
    assert mail(sock, "mail", "who", "--role", "ops").stdout.count("carol") == 1


def test_context_counts_unread_by_priority_and_threads(daemon) -> None:
    sock = daemon.socket_path
    question = send(sock, "bob", "--to", "ana", "--priority", "3", "urgent")
    send(sock, "carol", "--to", "ana", "routine")
    view = mail_json(sock, "mail", "context", "--as", "ana")
    assert (view["name"], view["unread"]) == ("ana", 2)
    assert view["unread_by_priority"] == {"3": 1, "1": 1}
    assert [t["last_from"] for t in view["threads"]] == ["carol", "bob"]

    shown = mail(sock, "mail", "context", name="ana").stdout
    assert shown.splitlines()[0] == "ana: 2 unread (1 critical, 1 normal)"
    assert "threads with unread mail:" in shown
    assert f"{question['msg_id']}  1 unread, last {question['msg_id']} from bob" in shown


def test_follow_prints_the_inbox_then_what_comes_once_each(daemon) -> None:
    sock = daemon.socket_path
    earlier = send(sock, "ana", "--to", "bob", "before following")
    follow = subprocess.Popen(
        [CHINWAG, "--socket", str(sock), "mail", "inbox", "--follow", "--json", "--as", "bob"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env_as(None),
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        with killed_after(follow, 30, "the inbox, then the message posted while following"):
            first = msgspec.json.decode(follow.stdout.readline())
            # The watch stands before the inbox is printed: what is posted now is pushed.
            live = send(sock, "carol", "--to", "bob", "while following")
            send(sock, "carol", "--to", "dave", "not for bob")
            last = send(sock, "ana", "--to", "bob", "and one more")
            second = msgspec.json.decode(follow.stdout.readline())
            third = msgspec.json.decode(follow.stdout.readline())
        follow.send_signal(signal.SIGINT)
        rest, err = follow.communicate(timeout=15)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0, err
    assert "Traceback" not in err
    assert rest == ""
    assert (first["message"]["msg_id"], first["state"]) == (earlier["msg_id"], "delivered")
    assert [second["message"]["msg_id"], third["message"]["msg_id"]] == [
        live["msg_id"],
        last["msg_id"],
    ]
    assert (second["message"]["content"], second["state"]) == ("while following", "delivered")


def test_follow_keeps_to_its_filters_and_prints_lines(daemon) -> None:
    sock = daemon.socket_path
    send(sock, "ana", "--to", "bob", "--channel", "ci", "build 1 green")
    send(sock, "ana", "--to", "bob", "off the channel, before")
    follow = subprocess.Popen(
        [CHINWAG, "--socket", str(sock), "inbox", "--follow", "--channel", "ci"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env_as("bob"),
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        with killed_after(follow, 30, "the message on the channel posted while following"):
            assert "ana → bob  [#ci, delivered]" in follow.stdout.readline()
            assert follow.stdout.readline() == "  build 1 green\n"
            send(sock, "ana", "--to", "bob", "off the channel, after")
            send(sock, "carol", "--to", "bob", "--channel", "ci", "--priority", "2", "build 2 red")
            header = follow.stdout.readline()
            body = follow.stdout.readline()
        follow.send_signal(signal.SIGTERM)
        rest, err = follow.communicate(timeout=15)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0, err
    assert "carol → bob  [high, #ci, delivered]" in header
    assert body == "  build 2 red\n"
    assert rest == ""
    assert err == "following the mail of bob; Ctrl-C to stop\n"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("mail", "read", "m000000999999"), "404"),
        (("mail", "thread", "m000000999999"), "404"),
        (("mail", "send", "nobody to"), "400"),
        (("mail", "send", "--to", "bob", "--format", "json", "{not json"), "400"),
        (("mail", "send", "--to", "@no-such-role", "x"), "404"),
        (("mail", "reply", "m000000999999", "x"), "404"),
        (("inbox", "--scope", "nocolon"), "400"),
        (("inbox", "--since", "yesterday"), "400"),
        (("mail", "inbox", "--as", "everyone"), "400"),
    ],
)
def test_the_daemons_refusals_are_one_line(daemon, args: tuple[str, ...], code: str) -> None:
    result = chinwag(daemon.socket_path, *args, env=env_as(None))
    assert_clean_failure(result)
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"chinwag: error {code}: "), last
    assert last.endswith("."), last


@pytest.mark.parametrize(
    "args",
    [
        ("mail", "send", "--to", "bob", "--scope", "nocolon", "x"),
        ("mail", "send", "--to", "bob", "--ref", ":7", "x"),
        ("mail", "send", "--to", "bob", "--json-payload", "{not json", "x"),
        ("mail", "send", "--to", "bob", "--priority", "4", "x"),
        ("mail", "read"),
    ],
)
def test_bad_options_are_usage_errors(daemon, args: tuple[str, ...]) -> None:
    result = chinwag(daemon.socket_path, *args)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert "Error:" in result.stderr


def test_reading_without_a_daemon_fails_cleanly(short_tmp: Path) -> None:
    missing = short_tmp / "none.sock"
    result = chinwag(missing, "inbox")
    assert_clean_failure(result)
    assert f"no daemon is listening on {missing}" in result.stderr


def test_mail_is_loaded_only_when_named(daemon) -> None:
    sock = str(daemon.socket_path)
    code, modules = loaded_by("--socket", sock, "send", "assistant", "hi")
    assert code == 0
    assert "chinwag.clients._mail_cli" not in modules
    for command in (("mail", "who"), ("inbox",)):
        code, modules = loaded_by("--socket", sock, *command)
        assert code == 0
        assert "chinwag.clients._mail_cli" in modules
        assert "chinwag.clients.telegram" not in modules
        assert "chinwag.clients.mcp" not in modules


def _pushed(**fields: Any) -> MailMessage:
    return MailMessage(
        msg_id="m000000000001",
        sender="ana",
        to=fields.pop("to", ["bob"]),
        recipients=["bob"],
        content="x",
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
        **fields,
    )


@pytest.mark.parametrize(
    ("filters", "message", "kept"),
    [
        ({}, _pushed(), True),
        ({"unread": True, "since": "1h"}, _pushed(), True),  # what is pushed is new
        ({"channel": "ci"}, _pushed(channel="ci"), True),
        ({"channel": "ci"}, _pushed(), False),
        ({"thread_id": "m000000000007"}, _pushed(thread_id="m000000000007"), True),
        ({"thread_id": "m000000000007"}, _pushed(), False),
        ({"priority_min": 2}, _pushed(priority=2), True),
        ({"priority_min": 2}, _pushed(priority=1), False),
        ({"scope": "module:db"}, _pushed(scopes=[Ref(type="module", value="db")]), True),
        ({"scope": "module:db"}, _pushed(scopes=[Ref(type="module", value="auth")]), False),
        ({"mentions": True}, _pushed(), False),
        ({"mentions": True}, _pushed(mentions=["bob"]), True),
        ({"mentions": True}, _pushed(to=["@Bob"]), True),
        ({"mentions": True}, _pushed(to=["@ops"]), True),  # a role of bob's
        ({"mentions": True}, _pushed(mentions=["ops"]), True),
        ({"mentions": True}, _pushed(to=["@everyone"]), False),
        ({"mentions": True}, _pushed(to=["@dev"]), False),
    ],
)
def test_follow_keeps_what_the_inbox_would(
    filters: dict[str, Any], message: MailMessage, kept: bool
) -> None:
    chosen = {
        "unread": False,
        "mentions": False,
        "channel": None,
        "scope": None,
        "thread_id": None,
        "priority_min": 0,
        "since": None,
        **filters,
    }
    assert _Filters(**chosen).admits(message, frozenset({"bob", "ops"})) is kept
