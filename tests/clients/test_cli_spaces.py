"""`chinwag mail` part 2 (spaces, projects, focus, edits, reactions, pins, search,
`since`, locks), run as subprocesses against a real daemon."""

from __future__ import annotations

from typing import Any

from test_cli import assert_clean_failure, chinwag
from test_cli_mail import env_as, mail, mail_json, send


def test_spaces_projects_and_focus_from_the_cli(daemon) -> None:
    path = daemon.socket_path
    created = mail_json(path, "mail", "project", "create", "web", "--tag", "ui", "--as", "ana")
    assert (created["name"], created["tags"]) == ("web", ["ui"])
    mail_json(path, "mail", "space", "create", "site", "--project", "web", "--as", "ana")
    mail_json(path, "mail", "space", "create", "ops", "--as", "ana")
    mail(path, "mail", "space", "join", "site", "--as", "bob")
    mail(path, "mail", "space", "invite", "ops", "cy", "--as", "ana")
    members = mail_json(path, "mail", "space", "members", "site", "--as", "bob")
    assert [m["name"] for m in members["items"]] == ["ana", "bob"]
    posted = mail_json(path, "mail", "space", "send", "site", "release at noon", "--as", "ana")
    assert posted["recipients"] == ["bob"]
    send(path, "ana", "--to", "#ops", "ops only")

    listed = mail_json(path, "mail", "space", "list", "--as", "bob")
    assert [(s["name"], s["members"], s["messages"]) for s in listed["items"]] == [
        ("ops", 2, 1),
        ("site", 2, 1),
    ]
    mail(path, "mail", "focus", "web", "--as", "bob")
    listed = mail_json(path, "mail", "space", "list", "--as", "bob")
    assert [s["name"] for s in listed["items"]] == ["site"]
    page = mail_json(path, "mail", "space", "read", "ops", "--as", "bob")
    assert [i["message"]["content"] for i in page["items"]] == ["ops only"]
    assert [i.get("state") for i in page["items"]] == [None]  # bob is no member of #ops
    human = mail(path, "mail", "context", "--as", "bob").stdout
    assert "focus: web" in human and "#site" in human

    refused = chinwag(path, "mail", "project", "delete", "web", "--as", "ana", env=env_as(None))
    assert_clean_failure(refused)
    assert "used by the space #site" in refused.stderr
    shown = mail(path, "mail", "project", "show", "web").stdout
    assert "web" in shown and "ui" in shown


def test_edit_react_pin_delete_and_search_from_the_cli(daemon) -> None:
    path = daemon.socket_path
    posted = send(path, "ana", "--to", "bob", "the first wombat")
    msg = posted["msg_id"]
    mail(path, "mail", "edit", msg, "the second koala", "--as", "ana")
    not_yours = chinwag(path, "mail", "edit", msg, "x", "--as", "bob", env=env_as(None))
    assert_clean_failure(not_yours)
    assert "its author" in not_yours.stderr
    reacted = mail(path, "mail", "react", msg, "👍", "--as", "bob").stdout
    assert "👍 1" in reacted
    mail(path, "mail", "pin", msg, "--as", "bob")
    pinned = mail_json(path, "mail", "inbox", "--pinned", "--as", "bob")
    assert [i["message"]["msg_id"] for i in pinned["items"]] == [msg]
    history = mail(path, "mail", "read", msg, "--history", "--as", "bob").stdout
    assert "the second koala" in history and "the first wombat" in history
    assert "pinned: by bob" in history and "👍 bob" in history

    found = mail_json(path, "mail", "search", "koala", "--as", "bob")
    assert [i["message"]["msg_id"] for i in found["items"]] == [msg]
    assert mail_json(path, "mail", "search", "wombat", "--as", "bob")["items"] == []
    recent = mail_json(path, "mail", "since", "30m", "--as", "bob")
    assert [i["message"]["msg_id"] for i in recent["items"]] == [msg]

    unasked = chinwag(path, "mail", "delete", msg, "--as", "ana", env=env_as(None), input="")
    assert unasked.returncode != 0 and "--force" in unasked.stderr
    mail(path, "mail", "delete", msg, "--force", "--reason", "stale", "--as", "ana")
    assert mail_json(path, "mail", "inbox", "--as", "bob")["items"] == []
    kept = mail_json(path, "mail", "inbox", "--deleted", "--as", "bob")["items"]
    assert [i["message"]["delete_reason"] for i in kept] == ["stale"]


def test_locks_from_the_cli(daemon) -> None:
    path = daemon.socket_path
    taken: dict[str, Any] = mail_json(
        path, "mail", "lock", "paths.py", "--ttl", "10m", "--as", "ana"
    )
    assert taken["acquired"]
    refused = chinwag(
        path, "mail", "lock", "paths.py", "--advisory", "--as", "bob", env=env_as(None)
    )
    assert refused.returncode == 1 and "held by ana" in refused.stderr
    assert "Traceback" not in refused.stderr
    held = mail_json(path, "mail", "locks", "--holder", "ana")
    assert [h["resource"] for h in held["items"]] == ["paths.py"]
    assert "paths.py" in mail(path, "mail", "locks").stdout
    not_held = chinwag(path, "mail", "unlock", "paths.py", "--as", "bob", env=env_as(None))
    assert_clean_failure(not_held)
    assert "bob holds no lock on paths.py" in not_held.stderr
    mail(path, "mail", "unlock", "paths.py", "--as", "ana")
    assert mail_json(path, "mail", "locks")["items"] == []
    bad = chinwag(path, "mail", "lock", "x", "--ttl", "soon", env=env_as(None))
    assert bad.returncode == 2 and "90s" in bad.stderr
