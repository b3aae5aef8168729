"""The MCP server's mail tools of part 2 (spaces, search, edits, reactions, pins, locks),
driven by the mcp SDK's own client over stdio against a real daemon."""

from __future__ import annotations

from test_mcp_mail import call, called, mail_server, refused


async def test_spaces_search_and_changes_through_mcp(daemon) -> None:
    path = daemon.socket_path
    async with mail_server(path, "ana") as ana, mail_server(path, "bob") as bob:
        made = await call(ana, "create_space", space="eng", description="engineering")
        assert made["space"]["name"] == "eng"
        await call(bob, "join_space", space="eng")
        text, members = await called(bob, "space_members", space="eng")
        assert [m["name"] for m in members["members"]] == ["ana", "bob"]
        listed = await call(bob, "list_spaces")
        assert [(s["name"], s["members"]) for s in listed["spaces"]] == [("eng", 2)]

        posted = await call(ana, "send_message", to=["#eng"], content="the staging wombat")
        msg_id = posted["posted"]["msg_id"]
        found = await call(bob, "search_messages", query="wombat")
        assert [m["msg_id"] for m in found["messages"]] == [msg_id]

        edited = await call(ana, "edit_message", msg_id=msg_id, content="the staging koala")
        assert edited["message"]["version"] == 2
        assert "author" in await refused(bob, "edit_message", msg_id=msg_id, content="x")
        text, _ = await called(bob, "react", msg_id=msg_id, emoji="🚀")
        assert "🚀 1" in text
        pinned = await call(bob, "pin_message", msg_id=msg_id)
        assert pinned["message"]["pinned"] is True
        await call(bob, "leave_space", space="eng")
        text, members = await called(ana, "space_members", space="eng")
        assert [m["name"] for m in members["members"]] == ["ana"]


async def test_locks_through_mcp(daemon) -> None:
    path = daemon.socket_path
    async with mail_server(path, "ana") as ana, mail_server(path, "bob") as bob:
        taken = await call(ana, "lock_resource", resource="paths.py", ttl_s=60)
        assert taken["acquired"] is True
        text, refused_lock = await called(bob, "lock_resource", resource="paths.py")
        assert refused_lock["acquired"] is False and "held by ana" in text
        listed = await call(bob, "list_locks")
        assert [(h["resource"], h["holder"]) for h in listed["locks"]] == [("paths.py", "ana")]
        assert "holds no lock" in await refused(bob, "unlock_resource", resource="paths.py")
        await call(ana, "unlock_resource", resource="paths.py")
        assert (await call(bob, "list_locks"))["locks"] == []
