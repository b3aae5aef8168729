"""Mail, part 2, through the client library against a real `chinwag serve`, on asyncio and
on trio: spaces and their mail, projects and focus, edits and reactions on a watch that
asks for updates, search, and locks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from chinwag.clients import ChinwagError, connect
from chinwag.protocol import MailMessage, MailUpdate

Runner = Callable[[Callable[[], Awaitable[object]]], object]


def test_spaces_projects_and_focus(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as client:
            project = await client.project_create("ana", "web", tags=["ui"])
            assert (project.name, project.tags) == ("web", ["ui"])
            space = await client.space_create("ana", "site", project="web", description="www")
            assert (space.name, space.project, space.members) == ("site", "web", 1)
            await client.space_create("ana", "ops")
            await client.space_join("bob", "site")
            await client.space_invite("ana", "site", "cy")
            members = await client.space_members("site")
            assert [m.name for m in members] == ["ana", "bob", "cy"]
            posted = await client.post("ana", "release at noon", to="#site")
            assert sorted(posted.recipients) == ["bob", "cy"]

            await client.focus("bob", "web")
            assert [s.name for s in await client.spaces(reader="bob")] == ["site"]
            assert [s.messages for s in await client.spaces(reader="bob")] == [1]
            page = await client.inbox("bob", space="site")
            assert [i.message.content for i in page.items] == ["release at noon"]
            await client.mark_read("bob", space="site")
            assert (await client.inbox("bob", unread_only=True)).items == []
            context = await client.mail_context("bob")
            assert (context.focus, context.spaces) == ("web", ["site"])

            with pytest.raises(ChinwagError) as refused:
                await client.project_delete("ana", "web")
            assert refused.value.code == 409
            updated = await client.project_update("ana", "web", status="done")
            assert updated.status == "done" and [p.name for p in await client.projects()] == ["web"]
            await client.space_leave("cy", "site")
            await client.space_archive("ana", "site")
            assert [s.name for s in await client.spaces(reader="ana")] == ["ops"]

    run(main)


def test_edits_reactions_and_pins_reach_a_watch_with_updates(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as ana, connect(daemon.socket_path) as bob:
            async with bob.watch("bob", updates=True) as feed:
                posted = await ana.post("ana", "first take", to="bob")
                got: list[MailMessage | MailUpdate] = []
                await ana.edit("ana", posted.msg_id, "second take")
                await bob.react("bob", posted.msg_id, "👍")
                await bob.pin("bob", posted.msg_id)
                async for item in feed:
                    got.append(item)
                    if len(got) == 4:
                        break
            assert isinstance(got[0], MailMessage) and got[0].content == "first take"
            assert [(u.change, u.message.version) for u in got[1:]] == [  # type: ignore[union-attr]
                ("edit", 2),
                ("react", 2),
                ("pin", 2),
            ]
            reply = await bob.get_message("bob", posted.msg_id, history=True)
            assert reply.versions is not None and [v.content for v in reply.versions] == [
                "first take"
            ]
            found = await bob.search_mail("bob", "second")
            assert [i.message.msg_id for i in found.items] == [posted.msg_id]
            deleted = await ana.delete_message("ana", posted.msg_id, reason="stale")
            assert deleted.deleted and (await bob.inbox("bob")).items == []
            assert len((await bob.inbox("bob", include_deleted=True)).items) == 1

    run(main)


def test_locks(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as client:
            taken = await client.lock("ana", "paths.py", ttl_s=60)
            assert taken.acquired and taken.expires_at is not None
            refused = await client.lock("bob", "paths.py", mode="advisory")
            assert not refused.acquired and [h.holder for h in refused.holders] == ["ana"]
            assert [h.resource for h in await client.locks(holder="ana")] == ["paths.py"]
            with pytest.raises(ChinwagError) as not_held:
                await client.unlock("bob", "paths.py")
            assert not_held.value.code == 403
            await client.unlock("ana", "paths.py")
            assert await client.locks() == []

    run(main)
