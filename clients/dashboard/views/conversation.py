"""One conversation: its history (tool calls folded, guest turns named, archived entries
on demand), its run in flight streaming live, and what can be done to it: send a
message (answered by the agent or a guest), kill the run, compact with instructions,
answer an ``ask_user``.

The actions answer JSON to the page's script, which shows the run through the
page's event stream; when a run ends the script fetches the entries stored since
(``/conversation/entries``), so that the history shown is always the stored one.
"""

from __future__ import annotations

from typing import Any

from chinwag.protocol import Entry
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..._client import ChinwagError, Client
from .._link import DaemonAway
from .._view import View, daemon, flag, page, refusal, required

#: The largest entry number the wire carries (a signed 64-bit integer).
MAX_SEQ = 2**63 - 1


async def conversation(request: Request) -> Response:
    agent = required(request, "agent")
    sender = required(request, "sender")
    archived = flag(request, "archived")
    client = daemon(request).client
    agents = await client.list_agents()
    if agent not in {item.name for item in agents}:
        raise ChinwagError(404, f"No agent is named {agent}.")
    title, entries = await _entries(client, agent, sender, include_archived=archived)
    return page(
        request,
        "conversation.html",
        agent=agent,
        sender=sender,
        title=title,
        archived=archived,
        **_shown(entries),
        guests=[item.name for item in agents if item.name != agent],
    )


async def entries(request: Request) -> Response:
    """The entries after ``after_seq``, as the history shows them (an HTML fragment);
    with ``archived``, the archived ones too."""
    agent = required(request, "agent")
    sender = required(request, "sender")
    archived = flag(request, "archived")
    try:
        after_seq = int(request.query_params.get("after_seq") or 0)
    except ValueError:
        after_seq = -1
    if not 0 <= after_seq <= MAX_SEQ:
        raise ChinwagError(400, "after_seq is the number of an entry.")
    client = daemon(request).client
    _, stored = await _entries(
        client, agent, sender, after_seq=after_seq, include_archived=archived
    )
    return page(
        request,
        "entries.html",
        agent=agent,
        sender=sender,
        **_shown(stored),
    )


async def _entries(
    client: Client, agent: str, sender: str, *, after_seq: int = 0, include_archived: bool = False
) -> tuple[str, list[Entry]]:
    """The conversation's title and every entry after ``after_seq``, oldest first; none
    for a conversation not begun yet (the first message sent begins it)."""
    title = ""
    found: list[Entry] = []
    while True:
        try:
            history = await client.history(
                agent, sender, after_seq=after_seq, include_archived=include_archived
            )
        except ChinwagError as exc:
            if exc.code == 404 and not found:
                return title, found
            raise
        title = history.title
        found.extend(history.entries)
        if not history.entries or history.entries[-1].seq >= history.last_seq:
            return title, found
        after_seq = history.entries[-1].seq


def _shown(entries: list[Entry]) -> dict[str, Any]:
    """What ``entries.html`` shows ``entries`` with: each tool result named after its
    call (``tool_names``: call_id -> tool), each archived entry marked as such."""
    return {
        "entries": entries,
        "tool_names": {call.call_id: call.name for entry in entries for call in entry.tool_calls},
        "archived_in": _archived_in(entries),
    }


def _archived_in(entries: list[Entry]) -> dict[int, str]:
    """seq -> the archive of each entry a compaction archived: those before the latest
    compact marker (the history carries no flag of its own, only the markers, which it
    always returns), each in the archive of the first marker after it. Markers are
    not archived: every history shows them."""
    archived: dict[int, str] = {}
    archive: str | None = None  # the archive of the first marker after the entry
    for entry in reversed(entries):
        if entry.kind == "compact":
            archive = entry.archive or ""
        elif archive is not None:
            archived[entry.seq] = archive
    return archived


# --- actions ------------------------------------------------------------------------


async def _fields(request: Request, *names: str) -> dict[str, str]:
    try:
        body: Any = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ChinwagError(400, "An action's body is a JSON object of its fields.")
    missing = [name for name in names if not body.get(name)]
    if missing:
        raise ChinwagError(400, f"This action needs {', '.join(missing)}.")
    return {key: str(value) for key, value in body.items() if value not in (None, "")}


async def send(request: Request) -> Response:
    """Start a turn; the page sees it through its event stream. Answers once it is queued."""
    try:
        fields = await _fields(request, "agent", "sender", "content")
        client = daemon(request).client
        async with client.stream(
            fields["agent"], fields["content"], sender=fields["sender"], guest=fields.get("guest")
        ) as events:
            # The first event says the daemon took it (`queued` or `start`); leaving then
            # detaches this request, and the run goes on in the daemon.
            await events.__anext__()
    except (ChinwagError, DaemonAway) as exc:
        return refusal(exc)
    return JSONResponse({"accepted": True})


async def kill(request: Request) -> Response:
    try:
        fields = await _fields(request, "agent", "sender")
        killed = await daemon(request).client.kill(fields["agent"], fields["sender"])
    except (ChinwagError, DaemonAway) as exc:
        return refusal(exc)
    return JSONResponse({"run_id": killed.run_id})


async def compact(request: Request) -> Response:
    try:
        fields = await _fields(request, "agent", "sender")
        done = await daemon(request).client.compact(
            fields["agent"], fields["sender"], instructions=fields.get("instructions")
        )
    except (ChinwagError, DaemonAway) as exc:
        return refusal(exc)
    return JSONResponse({"archive": done.archive, "archived_entries": done.archived_entries})


async def reply(request: Request) -> Response:
    try:
        fields = await _fields(request, "agent", "sender", "content")
        await daemon(request).client.reply_to_ask(
            fields["agent"], fields["content"], sender=fields["sender"], ask_id=fields.get("ask_id")
        )
    except (ChinwagError, DaemonAway) as exc:
        return refusal(exc)
    return JSONResponse({"answered": True})


view = View(
    routes=[
        Route("/conversation", conversation),
        Route("/conversation/entries", entries),
        Route("/conversation/send", send, methods=["POST"]),
        Route("/conversation/kill", kill, methods=["POST"]),
        Route("/conversation/compact", compact, methods=["POST"]),
        Route("/conversation/reply", reply, methods=["POST"]),
    ]
)
