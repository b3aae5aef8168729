"""`chinwag mcp` spawned over stdio by the mcp SDK's own client, against a real daemon."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from chinwag.clients import connect
from chinwag.protocol import Start, TextDelta
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import CallToolResult, Implementation, TextContent

_installed = Path(sys.executable).with_name("chinwag")
# The console script next to this interpreter, else whatever `chinwag` is on PATH.
CHINWAG = str(_installed) if _installed.exists() else (shutil.which("chinwag") or "chinwag")

CLIENT = "pytest-client"
ME = f"mcp:{CLIENT}"  # the sender a tool call that names none gets


@asynccontextmanager
async def mcp_server(socket_path: Path, *options: str) -> AsyncIterator[ClientSession]:
    """`chinwag --socket PATH mcp OPTIONS`, initialized; its stderr goes beside the socket."""
    params = StdioServerParameters(
        command=CHINWAG,
        args=["--socket", str(socket_path), "mcp", *options],
        # The SDK passes on only a few variables by default; PYTHONPATH among ours
        # decides which chinwag the server runs.
        env=dict(os.environ),
    )
    with socket_path.with_name("mcp.log").open("a") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(
                read, write, client_info=Implementation(name=CLIENT, version="0")
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


async def test_tools_are_listed_with_schemas_and_failures_are_tool_errors(daemon) -> None:
    with anyio.fail_after(20):
        async with mcp_server(daemon.socket_path) as session:
            listed = {tool.name: tool for tool in (await session.list_tools()).tools}
            assert set(listed) == {
                "list_agents",
                "send_message",
                "read_history",
                "list_conversations",
                "kill",
                "compact",
                "reply_to_ask",
                "wait_for_reply",
                # mail: always served, registering nobody until one is used
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
            required = {
                name: set(tool.input_schema.get("required", [])) for name, tool in listed.items()
            }
            assert required == {
                "list_agents": set(),
                "send_message": {"content"},  # and `agent` or `to`
                "read_history": {"agent"},
                "list_conversations": set(),
                "kill": {"agent"},
                "compact": {"agent"},
                "reply_to_ask": {"agent", "content"},
                "wait_for_reply": {"agent", "timeout_s"},
                "read_messages": set(),
                "reply": {"msg_id", "content"},
                "mark_read": set(),
                "wait_for_message": set(),
                "list_participants": set(),
                "register_agent": set(),
                "heartbeat": set(),
                "search_messages": {"query"},
                "edit_message": {"msg_id", "content"},
                "react": {"msg_id", "emoji"},
                "pin_message": {"msg_id"},
                "list_spaces": set(),
                "create_space": {"space"},
                "join_space": {"space"},
                "leave_space": {"space"},
                "space_members": {"space"},
                "lock_resource": {"resource"},
                "unlock_resource": {"resource"},
                "list_locks": set(),
            }
            send = listed["send_message"].input_schema["properties"]
            # No context leaks in: a turn's agent, sender, timeout_s; mail's to, wait, priority.
            assert set(send) == {
                "agent",
                "to",
                "content",
                "sender",
                "timeout_s",
                "wait",
                "priority",
            }
            assert "reply_to_ask" in (listed["send_message"].description or "")
            assert set(listed["read_history"].input_schema["properties"]) == {
                "agent",
                "sender",
                "after_seq",
                "limit",
                "include_archived",
            }
            assert listed["kill"].annotations is not None
            assert listed["kill"].annotations.destructive_hint is True

            agents = await call(session, "list_agents")
            assert [a["name"] for a in agents["agents"]] == ["assistant", "helper"]

            unknown_agent = await refused(session, "send_message", agent="nobody", content="hi")
            assert "error 404" in unknown_agent and "nobody" in unknown_agent
            for tool, arguments in [
                ("read_history", {"agent": "assistant"}),
                ("kill", {"agent": "assistant", "sender": "nobody-here"}),
                ("wait_for_reply", {"agent": "assistant", "timeout_s": 5}),
                ("reply_to_ask", {"agent": "nobody", "content": "blue"}),
            ]:
                assert "error 404" in await refused(session, tool, **arguments), tool
            invalid = await refused(session, "read_history", agent="assistant", limit=0)
            assert "limit" in invalid

            # The server outlives the daemon, and says plainly that it is gone.
            await anyio.to_thread.run_sync(daemon.stop)
            for tool, arguments in [
                ("list_agents", {}),
                ("send_message", {"agent": "assistant", "content": "hi"}),
            ]:
                text = await refused(session, tool, **arguments)
                assert f"no daemon is listening on {daemon.socket_path}" in text, tool


async def test_send_message_runs_a_turn_and_what_was_said_reads_in_pages(daemon) -> None:
    with anyio.fail_after(20):
        async with mcp_server(daemon.socket_path) as session:
            result = await session.call_tool(
                "send_message", {"agent": "assistant", "content": "hello from mcp"}
            )
            assert not result.is_error
            assert text_of(result).startswith("hello from mcp\n\n[done")
            reply = result.structured_content
            assert reply is not None
            assert reply["status"] == "done"
            assert reply["text"] == "hello from mcp"
            assert reply["sender"] == ME
            assert reply["last_seq"] == 2
            assert reply["tool_calls"] == []

            history = await call(session, "read_history", agent="assistant")
            assert history["sender"] == ME
            assert [(e["seq"], e["role"], e["content"]) for e in history["entries"]] == [
                (1, "user", "hello from mcp"),
                (2, "assistant", "hello from mcp"),
            ]
            assert {e["run_id"] for e in history["entries"]} == {reply["run_id"]}

            titled = await call(session, "send_message", agent="assistant", content="/title Ideas")
            assert titled["status"] == "done"
            assert [(c["name"], c["is_error"]) for c in titled["tool_calls"]] == [
                ("set_title", False)
            ]
            failed = await session.call_tool(
                "send_message", {"agent": "assistant", "content": "/fail out of cheese"}
            )
            assert failed.is_error  # with the run's own report: a turn that ended in error
            assert failed.structured_content is not None
            assert failed.structured_content["status"] == "error"
            assert "error 502: out of cheese" in text_of(failed)

            listed = await call(session, "list_conversations", agent="assistant")
            [mine] = listed["conversations"]
            assert (mine["agent"], mine["sender"], mine["title"]) == ("assistant", ME, "Ideas")

            for sender in ["a", "b", "c"]:
                await call(session, "send_message", agent="helper", content="hi", sender=sender)
            for words in ["two", "three"]:
                await call(session, "send_message", agent="helper", content=words, sender="c")

            first = await call(session, "list_conversations", agent="helper", limit=2)
            assert [c["sender"] for c in first["conversations"]] == ["c", "b"]
            second = await call(
                session, "list_conversations", agent="helper", limit=2, cursor=first["next_cursor"]
            )
            assert [c["sender"] for c in second["conversations"]] == ["a"]
            assert second["next_cursor"] is None

            page = await call(session, "read_history", agent="helper", sender="c", limit=4)
            assert [e["seq"] for e in page["entries"]] == [1, 2, 3, 4]
            assert (page["last_seq"], page["next_after_seq"]) == (6, 4)
            rest = await call(
                session, "read_history", agent="helper", sender="c", after_seq=4, limit=4
            )
            assert [e["content"] for e in rest["entries"]] == ["three", "three"]
            assert rest["next_after_seq"] is None


async def test_read_history_reads_on_past_the_pages_the_daemon_cuts_to_fit_a_frame(
    daemon_factory,
) -> None:
    # 1 KiB frames: the daemon sends this conversation's history a few entries at a time.
    daemon = daemon_factory(
        config='[daemon]\nmax_frame_bytes = 1024\n[agents.assistant]\nprovider = "echo"\n'
    )
    said = [f"turn {n}: " + " ".join(["words"] * 12) for n in range(6)]
    with anyio.fail_after(20):
        async with connect(daemon.socket_path) as client:
            for text in said:
                async with client.stream("assistant", text, sender="paged") as events:
                    await events.collect()
            first = await client.history("assistant", "paged")
            assert 0 < len(first.entries) < 2 * len(said)  # it does come in pages
        async with mcp_server(daemon.socket_path) as session:
            everything = await call(
                session, "read_history", agent="assistant", sender="paged", limit=None
            )
            assert [e["content"] for e in everything["entries"]] == [
                text for text in said for _ in ("user", "assistant")
            ]
            assert (everything["last_seq"], everything["next_after_seq"]) == (12, None)
            some = await call(session, "read_history", agent="assistant", sender="paged", limit=9)
            assert [e["seq"] for e in some["entries"]] == list(range(1, 10))
            assert (some["last_seq"], some["next_after_seq"]) == (12, 9)


async def test_the_sender_option_and_an_explicit_sender(daemon) -> None:
    with anyio.fail_after(20):
        async with mcp_server(daemon.socket_path, "--sender", "team-bot") as session:
            default = await call(session, "send_message", agent="assistant", content="one")
            assert default["sender"] == "team-bot"
            explicit = await call(
                session, "send_message", agent="assistant", content="two", sender="alice"
            )
            assert explicit["sender"] == "alice"

            history = await call(session, "read_history", agent="assistant", sender="alice")
            assert [e["content"] for e in history["entries"]] == ["two", "two"]
            listed = await call(session, "list_conversations", agent="assistant")
            assert {c["sender"] for c in listed["conversations"]} == {"team-bot", "alice"}

            # Compaction may still be landing in the daemon: done, or the daemon's refusal
            # (501 while unsupported) as a clean tool error.
            result = await session.call_tool("compact", {"agent": "assistant", "sender": "alice"})
            if result.is_error:
                assert re.search(r"error \d{3}: \w", text_of(result)), text_of(result)
                assert "Traceback" not in text_of(result)
            else:
                assert result.structured_content is not None
                assert result.structured_content["archived_entries"] == 2


async def test_kill_from_a_second_call_stops_a_slow_run(daemon) -> None:
    with anyio.fail_after(20):
        async with (
            mcp_server(daemon.socket_path) as session,
            connect(daemon.socket_path) as client,
            client.subscribe("assistant", ME) as runs,
        ):
            sent: dict[str, Any] = {}

            async def send_slowly() -> None:
                sent.update(
                    await call(session, "send_message", agent="assistant", content="/slow 100 100")
                )

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(send_slowly)
                async for frame in runs:
                    if isinstance(frame.event, TextDelta):
                        break  # the run is under way: its first word is out
                killed = await call(session, "kill", agent="assistant")
            assert sent["status"] == "killed"
            assert killed["killed_run_id"] == sent["run_id"]
            assert sent["text"].startswith("1")
            assert "100" not in sent["text"].split()


async def test_wait_for_reply_follows_a_run_to_its_end_or_gives_up_waiting(daemon) -> None:
    with anyio.fail_after(20):
        async with mcp_server(daemon.socket_path) as session:
            started = await call(
                session, "send_message", agent="assistant", content="/slow 5 60", timeout_s=0.05
            )
            assert started["status"] in ("starting", "running")
            finished = await call(session, "wait_for_reply", agent="assistant", timeout_s=10)
            assert finished["status"] == "done"
            assert finished["text"].split() == ["1", "2", "3", "4", "5"]
            if started["run_id"] is not None:
                assert finished["run_id"] == started["run_id"]

            idle = await session.call_tool(
                "wait_for_reply", {"agent": "assistant", "timeout_s": 10}
            )
            assert idle.structured_content is not None
            assert idle.structured_content["status"] == "idle"
            assert "Nothing is running" in text_of(idle)

            # A run started elsewhere is attached to, from its start.
            async with connect(daemon.socket_path) as client:
                async with client.stream("assistant", "/slow 3 50", sender=ME) as events:
                    async for event in events:
                        if isinstance(event, Start):
                            break
                elsewhere = await call(session, "wait_for_reply", agent="assistant", timeout_s=10)
            assert elsewhere["status"] == "done"
            assert elsewhere["run_id"] == event.run_id
            assert elsewhere["text"].split() == ["1", "2", "3"]

            # Its first word would come after a minute: the run is still going at every step.
            await call(
                session, "send_message", agent="assistant", content="/slow 2 60000", timeout_s=0.1
            )
            waited = await session.call_tool(
                "wait_for_reply", {"agent": "assistant", "timeout_s": 0.1}
            )
            assert not waited.is_error
            assert waited.structured_content is not None
            assert waited.structured_content["status"] in ("starting", "running")
            assert "Not finished after 0.1 s" in text_of(waited)
            [conversation] = (await call(session, "list_conversations", agent="assistant"))[
                "conversations"
            ]
            assert conversation["running"] is True

            killed = await call(session, "kill", agent="assistant")
            assert killed["killed_run_id"] is not None
            ended = await call(session, "wait_for_reply", agent="assistant", timeout_s=10)
            assert (ended["status"], ended["run_id"]) == ("killed", killed["killed_run_id"])


async def test_a_question_returns_at_once_and_the_answer_finishes_the_run(daemon) -> None:
    with anyio.fail_after(20):
        async with mcp_server(daemon.socket_path) as session:
            asked = await session.call_tool(
                "send_message", {"agent": "assistant", "content": "/ask what colour?"}
            )
            assert not asked.is_error
            question = asked.structured_content
            assert question is not None
            assert question["status"] == "asking"
            assert [q["question"] for q in question["questions"]] == ["what colour?"]
            assert question["ask_id"] in text_of(asked)
            assert "reply_to_ask" in text_of(asked)

            # Waiting without answering shows the same question again, at once.
            again = await call(session, "wait_for_reply", agent="assistant", timeout_s=10)
            assert (again["status"], again["ask_id"]) == ("asking", question["ask_id"])

            wrong = await refused(
                session, "reply_to_ask", agent="assistant", content="x", ask_id="nope"
            )
            assert "error 409" in wrong
            answered = await call(session, "reply_to_ask", agent="assistant", content="blue")
            assert answered["ask_id"] == question["ask_id"]

            reply = await call(session, "wait_for_reply", agent="assistant", timeout_s=10)
            assert reply["status"] == "done"
            assert reply["run_id"] == question["run_id"]
            assert reply["text"] == "blue"
            assert [c["name"] for c in reply["tool_calls"]] == ["ask_user"]
            assert "error 404" in await refused(
                session, "reply_to_ask", agent="assistant", content="x"
            )
