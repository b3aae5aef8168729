"""The mail tools a hosted agent writes and reads mail with: send_mail, check_mail, reply_mail.

Driven through the echo model's `/tool NAME JSON` directive, on a runtime with
its post office, so each call goes through the whitelist, the tool and the
post office to the store, as a real model's call would.
"""

from __future__ import annotations

import json

from chinwag.daemon._config import AgentConfig, Config
from chinwag.daemon._post_office import PostOffice
from chinwag.storage import InboxQuery
from runtime_harness import open_runtime, submit

MAIL_TOOLS = ["send_mail", "check_mail", "reply_mail"]
AGENTS = {
    "writer": AgentConfig(provider="echo", tools=MAIL_TOOLS, mail="never"),
    "mute": AgentConfig(provider="echo", mail="never"),
}


def tool(name: str, **args: object) -> str:
    return f"/tool {name} {json.dumps(args)}"


async def office_for(rt) -> PostOffice:
    office = PostOffice(rt, rt.storage.mail)
    await office.start()
    return office


async def test_send_mail_posts_as_the_agent_and_says_where_it_went() -> None:
    async with open_runtime(Config(agents=AGENTS)) as rt:
        office = await office_for(rt)
        run = submit(
            rt, tool("send_mail", to=["ana"], content="build is green", priority=2), agent="writer"
        )
        await run.finished()
        assert not run.result.is_error, run.result.output
        assert "to ana" in run.result.output
        assert "ana is not registered" in run.result.output
        ((message, delivery),) = await office.store.inbox("ana", InboxQuery(), limit=10)
        assert (message.sender, message.content, message.priority) == (
            "writer",
            "build is green",
            2,
        )
        assert delivery.state == "pending"


async def test_check_mail_shows_unread_mail_newest_first_and_marks_it_read() -> None:
    async with open_runtime(Config(agents=AGENTS)) as rt:
        office = await office_for(rt)
        for text in ("first", "second"):
            await office.post(
                sender="ana",
                to=["writer"],
                content=text,
                format="markdown",
                structured=None,
                priority=1,
                channel=None,
                reply_to=None,
                scopes=(),
                refs=(),
                metadata={},
                mentions=(),
                idempotency_key=None,
            )
        run = submit(rt, tool("check_mail"), agent="writer")
        await run.finished()
        output = run.result.output
        assert output.index("): second") < output.index("): first"), output
        assert "from ana" in output
        assert await office.store.unread_counts("writer") == {}
        again = submit(rt, tool("check_mail"), agent="writer")
        await again.finished()
        assert again.result.output == "No unread mail."


async def test_reply_mail_threads_under_the_message_to_its_author() -> None:
    async with open_runtime(Config(agents=AGENTS)) as rt:
        office = await office_for(rt)
        asked = await office.post(
            sender="ana",
            to=["writer"],
            content="status?",
            format="markdown",
            structured=None,
            priority=1,
            channel=None,
            reply_to=None,
            scopes=(),
            refs=(),
            metadata={},
            mentions=(),
            idempotency_key=None,
        )
        msg_id = asked.message.msg_id
        run = submit(rt, tool("reply_mail", msg_id=msg_id, content="all good"), agent="writer")
        await run.finished()
        assert not run.result.is_error, run.result.output
        thread = await office.store.thread(msg_id)
        assert [(m.sender, m.content) for m in thread] == [
            ("ana", "status?"),
            ("writer", "all good"),
        ]
        assert thread[1].recipients == ["ana"]
        assert (await office.store.deliveries([msg_id]))[msg_id][0].state == "read"


async def test_bad_arguments_and_unknown_addresses_are_the_models_errors() -> None:
    async with open_runtime(Config(agents=AGENTS)) as rt:
        await office_for(rt)
        for call, expected in [
            (tool("send_mail", to=[], content="x"), "`to` must name at least one recipient"),
            (tool("send_mail", to=["@nobody"], content="x"), "No participant or role"),
            (tool("send_mail", to=["ana"], content="x", priority=9), "priority must be"),
            (tool("reply_mail", msg_id="m000000000042", content="x"), "No message"),
            (tool("check_mail", limit=0), "check_mail takes"),
        ]:
            run = submit(rt, call, agent="writer")
            await run.finished()
            assert run.result.is_error and expected in run.result.output, (call, run.result.output)


async def test_an_agent_without_the_tools_in_its_whitelist_cannot_use_them() -> None:
    async with open_runtime(Config(agents=AGENTS)) as rt:
        office = await office_for(rt)
        run = submit(rt, tool("send_mail", to=["ana"], content="x"), agent="mute")
        await run.finished()
        assert run.result.is_error and "not available" in run.result.output
        assert await office.store.inbox("ana", InboxQuery(), limit=10) == []
