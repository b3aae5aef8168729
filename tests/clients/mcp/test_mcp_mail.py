"""The MCP server's mail tools, driven by the mcp SDK's own client over stdio against a
real daemon: two servers with their own identities write to each other and to the
echo agent `assistant`, and the conversation tools keep working beside them."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import CallToolResult, Implementation, TextContent

_installed = Path(sys.executable).with_name("chinwag")
CHINWAG = str(_installed) if _installed.exists() else (shutil.which("chinwag") or "chinwag")

MAIL_TOOLS = {
    "send_message",  # with `to`; with `agent` it runs a conversation's turn
    "read_messages",
    "reply",
    "mark_read",
    "wait_for_message",
    "list_participants",
    "register_agent",
    "heartbeat",
    "search_messages",
    "edit_message",
    "react",
    "pin_message",
    "list_spaces",
    "create_space",
    "join_space",
    "leave_space",
    "space_members",
    "lock_resource",
    "unlock_resource",
    "list_locks",
}


@asynccontextmanager
async def mail_server(
    socket_path: Path, name: str | None, client: str = "pytest-client", **env: str
) -> AsyncIterator[ClientSession]:
    """`chinwag --socket PATH mcp` as CHINWAG_NAME=``name`` (None: unset), initialized."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    if name is not None:
        environment["CHINWAG_NAME"] = name
    environment.update(env)
    params = StdioServerParameters(
        command=CHINWAG, args=["--socket", str(socket_path), "mcp"], env=environment
    )
    with socket_path.with_name(f"mcp-{name or client}.log").open("a") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(
                read, write, client_info=Implementation(name=client, version="0")
            ) as session,
        ):
            await session.initialize()
            yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must succeed; its structured content."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    return result.structured_content


async def called(session: ClientSession, tool: str, **arguments: Any) -> tuple[str, dict[str, Any]]:
    """Call a tool that must succeed; its text and its structured content."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    return text_of(result), result.structured_content


async def refused(session: ClientSession, tool: str, **arguments: Any) -> str:
    """Call a tool that must fail; the error's text."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, text_of(result)
    text = text_of(result)
    assert "Traceback" not in text
    return text


def text_of(result: CallToolResult) -> str:
    [block] = result.content
    assert isinstance(block, TextContent)
    return block.text


async def test_mail_tools_are_served_beside_the_conversation_tools(daemon) -> None:
    with anyio.fail_after(20):
        async with mail_server(daemon.socket_path, "codex-1") as codex:
            listed = {tool.name: tool for tool in (await codex.list_tools()).tools}
            assert set(listed) >= MAIL_TOOLS
            # $CHINWAG_NAME takes no conversation tool away.
            conversation = {"list_agents", "read_history", "list_conversations", "kill", "compact"}
            assert conversation | {"wait_for_reply", "reply_to_ask"} <= set(listed)
            send = listed["send_message"].input_schema
            assert {"agent", "to", "content", "wait", "timeout_s", "priority"} <= set(
                send["properties"]
            )
            assert "text" not in send["properties"]
            assert set(send["required"]) == {"content"}
            assert set(listed["reply"].input_schema["required"]) == {"msg_id", "content"}
            assert listed["list_participants"].annotations is not None
            assert listed["list_participants"].annotations.read_only_hint is True

            unknown = await refused(codex, "send_message", to="@nobody", content="hi")
            assert "error 404" in unknown and "@nobody" in unknown
            assert "error 404" in await refused(
                codex, "reply", msg_id="m000000999999", content="hi"
            )
            assert "error 400" in await refused(codex, "mark_read")
            assert "error 409" in await refused(codex, "register_agent", name="assistant")
            # The refused name changed nothing: the session is still codex-1.
            assert (await call(codex, "list_participants"))["you"] == "codex-1"

            # A second session under a name a live one holds is told so, and may pick another.
            async with mail_server(daemon.socket_path, "codex-1", client="twin") as twin:
                clash = await refused(twin, "send_message", to="codex-1", content="hi")
                assert "error 409" in clash and "vendor pytest-client" in clash
                assert "register_agent" in clash
                renamed = await call(twin, "register_agent", name="Codex-2")
                assert renamed["participant"]["name"] == "codex-2"
                sent = await call(twin, "send_message", to="codex-1", content="from your twin")
                got = await call(codex, "wait_for_message", timeout_s=10)
                assert got["message"]["msg_id"] == sent["posted"]["msg_id"]
                assert got["message"]["from"] == "codex-2"

            # Without $CHINWAG_NAME the identity is the client's name, folded.
            async with mail_server(
                daemon.socket_path, None, client="Codex CLI ✨ Édition"
            ) as other:
                text, who = await called(other, "list_participants", online_only=True)
                assert who["you"] == "codex-cli-edition"
                assert "codex-cli-edition (you): session, online" in text
                assert {p["name"] for p in who["participants"]} == {
                    "assistant",
                    "helper",
                    "codex-1",
                    "codex-cli-edition",
                }


async def test_one_session_writes_and_the_other_waits_for_it(daemon) -> None:
    with anyio.fail_after(30):
        async with mail_server(daemon.socket_path, "codex-1") as codex:
            # Written before claude-code's session exists: it waits for it.
            early = await call(codex, "send_message", to="claude-code", content="are you there?")
            assert early["posted"]["recipients"] == ["claude-code"]
            assert "not registered" in early["posted"]["warnings"][0]

            async with mail_server(daemon.socket_path, "claude-code") as claude:
                got = await call(claude, "wait_for_message", timeout_s=10)
                assert got["you"] == "claude-code"
                assert got["message"]["msg_id"] == early["posted"]["msg_id"]
                assert got["message"]["from"] == "codex-1"
                assert got["message"]["content"] == "are you there?"

                nothing = await claude.call_tool("wait_for_message", {"timeout_s": 0.2})
                assert not nothing.is_error
                assert text_of(nothing) == "No message for claude-code within 0.2 s."

                # Sent between two calls, two in a row: each comes, in order, once.
                first = await call(codex, "send_message", to=["claude-code"], content="one")
                second = await call(codex, "send_message", to="claude-code", content="two")
                text, one = await called(claude, "wait_for_message", timeout_s=10)
                assert one["message"]["msg_id"] == first["posted"]["msg_id"]
                assert text.startswith(
                    f"[{first['posted']['msg_id']} · from codex-1 to claude-code"
                )
                assert text.splitlines()[1] == "one"
                two = await call(claude, "wait_for_message", timeout_s=10)
                assert two["message"]["msg_id"] == second["posted"]["msg_id"]
                assert two["more_waiting"] == 0

                # A wait under way gets what is sent while it waits.
                async with anyio.create_task_group() as tasks:
                    waited: dict[str, Any] = {}

                    async def wait() -> None:
                        waited.update(await call(claude, "wait_for_message", timeout_s=20))

                    tasks.start_soon(wait)
                    sent = await call(codex, "send_message", to="@everyone", content="all hands")
                assert waited["message"]["msg_id"] == sent["posted"]["msg_id"]
                assert waited["message"]["to"] == ["@everyone"]

                # Both are there and online, with the hosted agents.
                text, everyone = await called(codex, "list_participants")
                by_name = {p["name"]: p for p in everyone["participants"]}
                assert by_name["codex-1"]["online"] and by_name["claude-code"]["online"]
                assert by_name["assistant"]["kind"] == "agent"
                assert by_name["claude-code"]["info"]["vendor"] == "pytest-client"
                assert "codex-1 (you): session, online" in text

                # Roles and a status line show there too; @role reaches the role.
                await call(claude, "register_agent", roles=["reviewer"], info={"model": "x"})
                await call(claude, "heartbeat", status="reviewing the auth module")
                reviewers = await call(codex, "list_participants", role="reviewer")
                [reviewer] = reviewers["participants"]
                assert reviewer["name"] == "claude-code"
                assert reviewer["status"] == "reviewing the auth module"
                assert reviewer["info"]["model"] == "x"
                to_role = await call(codex, "send_message", to="@reviewer", content="please review")
                assert to_role["posted"]["recipients"] == ["claude-code"]
                got = await call(claude, "wait_for_message", timeout_s=10)
                assert got["message"]["content"] == "please review"

            # claude-code's session ended: it is offline, its mail stays.
            after = await call(codex, "list_participants")
            gone = {p["name"]: p for p in after["participants"]}["claude-code"]
            assert gone["online"] is False


async def test_read_reply_and_mark_read(daemon) -> None:
    with anyio.fail_after(30):
        async with (
            mail_server(daemon.socket_path, "codex-1") as codex,
            mail_server(daemon.socket_path, "claude-code") as claude,
        ):
            await call(claude, "register_agent")
            first = (await call(codex, "send_message", to="claude-code", content="first"))["posted"]
            second = (
                await call(codex, "send_message", to="claude-code", content="second", priority=3)
            )["posted"]

            text, unread = await called(claude, "read_messages", mark_read=False)
            assert [m["msg_id"] for m in unread["messages"]] == [
                second["msg_id"],
                first["msg_id"],
            ]
            assert [m["state"] for m in unread["messages"]] == ["delivered", "delivered"]
            assert unread["unread"] == 2
            assert "2 unread message(s) for claude-code, newest first:" in text
            assert "priority critical" in text
            # Not marked: they are still unread.
            again = await call(claude, "read_messages", mark_read=False)
            assert len(again["messages"]) == 2

            await call(claude, "mark_read", msg_ids=[first["msg_id"]])
            left = await call(claude, "read_messages", mark_read=False)
            assert [m["msg_id"] for m in left["messages"]] == [second["msg_id"]]
            everything = await call(claude, "read_messages", unread_only=False, mark_read=False)
            assert [m["state"] for m in everything["messages"]] == ["delivered", "read"]

            # Shown by read_messages: wait_for_message does not hand them out again.
            waited = await claude.call_tool("wait_for_message", {"timeout_s": 0.2})
            assert "No message" in text_of(waited)

            answer = await call(claude, "reply", msg_id=second["msg_id"], content="on it")
            assert answer["posted"]["recipients"] == ["codex-1"]
            assert answer["posted"]["thread_id"] == second["msg_id"]
            # Replying read the message answered.
            assert (await call(claude, "read_messages"))["messages"] == []

            got = await call(codex, "wait_for_message", timeout_s=10)
            assert got["message"]["msg_id"] == answer["posted"]["msg_id"]
            assert got["message"]["reply_to"] == second["msg_id"]
            assert got["message"]["thread_id"] == second["msg_id"]
            # wait_for_message marked it read.
            assert (await call(codex, "read_messages"))["messages"] == []

            # A whole thread, or everything, at once.
            third = (await call(codex, "reply", msg_id=answer["posted"]["msg_id"], content="3"))[
                "posted"
            ]
            fourth = (await call(codex, "send_message", to="claude-code", content="4"))["posted"]
            await call(claude, "mark_read", thread_id=second["msg_id"])
            left = await call(claude, "read_messages", mark_read=False)
            assert [m["msg_id"] for m in left["messages"]] == [fourth["msg_id"]]
            assert third["thread_id"] == second["msg_id"]
            await call(claude, "mark_read", all=True)
            assert (await call(claude, "read_messages", mark_read=False))["messages"] == []


async def test_send_message_with_wait_returns_the_hosted_agents_reply(daemon) -> None:
    with anyio.fail_after(30):
        async with mail_server(daemon.socket_path, "codex-1") as codex:
            text, sent = await called(
                codex, "send_message", to="assistant", content="hello by mail", wait=True
            )
            posted, reply = sent["posted"], sent["reply"]
            assert posted["recipients"] == ["assistant"]
            assert reply["from"] == "assistant"
            assert reply["content"] == "hello by mail"  # the echo model's answer
            assert reply["reply_to"] == posted["msg_id"]
            assert reply["thread_id"] == posted["msg_id"]
            assert text.splitlines()[-1] == "hello by mail"
            assert f"reply to {posted['msg_id']}" in text

            # Returned with the send, and so read: wait_for_message does not hand it out again.
            nothing = await codex.call_tool("wait_for_message", {"timeout_s": 0.2})
            assert "No message" in text_of(nothing)
            assert (await call(codex, "read_messages"))["messages"] == []

            # A reply to the answer goes on in the thread, and the agent answers it.
            again = await call(
                codex, "reply", msg_id=reply["msg_id"], content="and again", wait=True
            )
            assert again["reply"]["content"] == "and again"
            assert again["reply"]["thread_id"] == posted["msg_id"]

            # The mail is the conversation (assistant, codex-1); read_history's default
            # sender stays the conversation tools' own, mcp:<client name>.
            history = await call(codex, "read_history", agent="assistant", sender="codex-1")
            assert history["sender"] == "codex-1"
            assert [e["content"] for e in history["entries"]] == [
                "hello by mail",
                "hello by mail",
                "and again",
                "and again",
            ]

            # With no answer in time the reply is not lost: wait_for_message returns it.
            slow = await call(
                codex,
                "send_message",
                to="assistant",
                content="/slow 2 300",
                wait=True,
                timeout_s=0.05,
            )
            assert slow["reply"] is None
            late = await call(codex, "wait_for_message", timeout_s=10)
            assert late["message"]["reply_to"] == slow["posted"]["msg_id"]
            assert late["message"]["content"].split() == ["1", "2"]


async def test_a_restarted_daemon_loses_no_mail(daemon) -> None:
    with anyio.fail_after(40):
        async with (
            mail_server(daemon.socket_path, "codex-1") as codex,
            mail_server(daemon.socket_path, "claude-code") as claude,
        ):
            await call(claude, "register_agent")
            await call(codex, "send_message", to="claude-code", content="before")
            assert (await call(claude, "wait_for_message", timeout_s=10))["message"][
                "content"
            ] == "before"

            await anyio.to_thread.run_sync(daemon.restart)
            # Sent while claude-code's session had no connection: replayed to it.
            await call(codex, "send_message", to="claude-code", content="meanwhile")
            got = await call(claude, "wait_for_message", timeout_s=10)
            assert got["message"]["content"] == "meanwhile"
            online = await call(codex, "list_participants", online_only=True)
            assert "claude-code" in {p["name"] for p in online["participants"]}


async def test_send_message_runs_a_turn_with_agent_and_mails_with_to(daemon) -> None:
    with anyio.fail_after(30):
        async with mail_server(daemon.socket_path, "codex-1") as codex:
            # With $CHINWAG_NAME set, `agent` is still a turn of the conversation, as the
            # conversation tools' default sender, and returns the run's report.
            turn = await codex.call_tool(
                "send_message", {"agent": "assistant", "content": "a turn"}
            )
            assert not turn.is_error, text_of(turn)
            assert text_of(turn).startswith("a turn\n\n[done")
            report = turn.structured_content
            assert report is not None
            assert (report["status"], report["sender"], report["text"]) == (
                "done",
                "mcp:pytest-client",
                "a turn",
            )
            asked = await call(codex, "send_message", agent="assistant", content="/ask colour?")
            assert asked["status"] == "asking"
            await call(codex, "reply_to_ask", agent="assistant", content="blue")
            answered = await call(codex, "wait_for_reply", agent="assistant", timeout_s=10)
            assert (answered["status"], answered["text"]) == ("done", "blue")
            history = await call(codex, "read_history", agent="assistant")
            assert history["sender"] == "mcp:pytest-client"
            assert [e.get("content") for e in history["entries"][:2]] == ["a turn", "a turn"]

            # Neither or both of agent and to, or the other use's options: tool errors
            # that say what to give, before anything is sent.
            neither = await refused(codex, "send_message", content="hi")
            assert "needs `agent` or `to`" in neither
            assert "needs `agent` or `to`" in await refused(
                codex, "send_message", content="hi", to=[]
            )
            both = await refused(
                codex, "send_message", content="hi", agent="assistant", to="assistant"
            )
            assert "`agent` or `to`, not both" in both
            assert "`sender` goes with `agent`" in await refused(
                codex, "send_message", content="hi", to="assistant", sender="alice"
            )
            assert "`wait` and `priority` go with `to`" in await refused(
                codex, "send_message", content="hi", agent="assistant", wait=True
            )
            # The message is `content`, for mail too.
            assert "content" in await refused(codex, "send_message", to="assistant", text="hi")
            after = await call(codex, "read_history", agent="assistant")
            assert after["last_seq"] == history["last_seq"]  # no turn ran

            # Conversation tools alone registered nobody: codex-1 is not a participant.
            async with mail_server(daemon.socket_path, None, client="observer") as observer:
                names = {
                    p["name"] for p in (await call(observer, "list_participants"))["participants"]
                }
                assert names == {"assistant", "helper", "observer"}

                # `to` is mail, under $CHINWAG_NAME, registered on first use.
                sent = await call(
                    codex, "send_message", to="assistant", content="by mail", wait=True
                )
                assert sent["you"] == "codex-1"
                assert sent["reply"]["content"] == "by mail"
                online = await call(observer, "list_participants", online_only=True)
                assert "codex-1" in {p["name"] for p in online["participants"]}
