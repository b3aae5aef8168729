"""The runtime without sockets: runs, asks and shutdown on trio's autojump clock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from chinwag.daemon._agent import Agent
from chinwag.daemon._config import AgentConfig, Config, DaemonConfig
from chinwag.daemon._errors import RequestError
from chinwag.daemon._providers import FinishChunk, TextChunk, ToolCallChunk, UsageChunk
from chinwag.daemon._runtime import Runtime
from chinwag.protocol import AskUser, End, Start, TextDelta, ToolCallInfo, ToolResult, Usage
from chinwag.storage import MemoryStorage, StorageError
from deadlines import RUN_S, deadline
from runtime_harness import open_runtime, submit


@asynccontextmanager
async def runtime(**daemon: object) -> AsyncIterator[Runtime]:
    config = Config(
        daemon=DaemonConfig(**daemon),  # type: ignore[arg-type]
        agents={
            "assistant": AgentConfig(provider="echo", tools=["ask_user", "set_title", "delegate"]),
            "helper": AgentConfig(provider="echo", tools=["delegate"]),
            "third": AgentConfig(provider="echo", tools=["delegate"]),
            "fourth": AgentConfig(provider="echo"),
        },
    )
    async with open_runtime(config) as rt:
        yield rt


async def test_an_unanswered_ask_times_out_into_an_error_result(autojump_clock):
    async with runtime(ask_timeout_s=30.0) as rt:
        sink = submit(rt, "/ask Anyone there?")
        started = trio.current_time()
        await sink.finished(within=60)  # on the autojump clock: an ignored timeout fails at once
        assert trio.current_time() - started == pytest.approx(30.0, abs=0.5)
        result = next(e for e in sink.events if isinstance(e, ToolResult))
        assert result.is_error and "did not answer within 30 s" in result.output
        assert sink.end.status == "done"
        assert rt.conversations[("assistant", "user")].pending_ask is None


async def test_an_ask_waits_as_long_as_it_takes_by_default(autojump_clock):
    async with runtime() as rt:
        sink = submit(rt, "/ask Take your time")
        with trio.move_on_after(3600):
            await sink.ended.wait()
        assert not sink.ended.is_set(), "an hour on, the ask still waits"
        ask = next(e for e in sink.events if isinstance(e, AskUser))
        await rt.reply_to_ask("assistant", "user", "an hour later", ask.ask_id)
        await sink.finished()
        assert "".join(e.delta for e in sink.events if isinstance(e, TextDelta)) == "an hour later"


async def test_shutdown_lets_runs_finish_within_grace_then_cancels(autojump_clock):
    async with runtime() as rt:
        quick = submit(rt, "/slow 3 100", sender="quick")
        slow = submit(rt, "/slow 1000 100", sender="slow")
        queued = submit(rt, "queued behind the slow one", sender="slow")
        started = trio.current_time()
        await rt.shutdown(grace_s=5.0)
        assert trio.current_time() - started == pytest.approx(5.0, abs=0.2)
        assert quick.end.status == "done"
        assert slow.end.status == "error" and slow.end.error.code == 503
        assert [type(e) for e in queued.events][-1] is End
        assert queued.end.error.code == 503 and not any(isinstance(e, Start) for e in queued.events)
        with pytest.raises(RequestError) as err:
            submit(rt, "too late")
        assert err.value.code == 503


async def test_idle_conversations_are_dropped_and_reload_from_storage(autojump_clock):
    async with runtime(idle_conversations=2) as rt:
        for n in range(4):
            sink = submit(rt, f"hello {n}", sender=f"s{n}")
            await sink.finished()
        assert set(rt.conversations) == {("assistant", "s2"), ("assistant", "s3")}
        again = submit(rt, "back again", sender="s0")
        await again.finished()
        start = next(e for e in again.events if isinstance(e, Start))
        assert start.seq == 3, "the dropped conversation's history was reloaded"


async def test_runs_of_one_conversation_never_overlap(autojump_clock):
    async with runtime() as rt:
        sinks = [submit(rt, f"/slow 3 {10 * (5 - n)}") for n in range(5)]
        for sink in sinks:
            await sink.finished()
        starts = [next(e for e in s.events if isinstance(e, Start)).seq for s in sinks]
        assert starts == [1, 3, 5, 7, 9], "in submission order, each after the previous ended"


async def test_lookups_of_unknown_conversations_leave_nothing_behind(autojump_clock):
    async with runtime() as rt:
        for n in range(10):
            with pytest.raises(RequestError) as err:
                await rt.kill("assistant", f"ghost{n}", everything=False)
            assert err.value.code == 404
        assert rt.conversations == {}


def delegation(agent: str, message: str) -> str:
    return "/tool delegate " + json.dumps({"agent": agent, "message": message})


async def test_delegate_runs_a_turn_of_the_other_agent_and_returns_its_answer(autojump_clock):
    async with runtime() as rt:
        sink = submit(rt, delegation("helper", "two words"))
        await sink.finished()
        result = next(e for e in sink.events if isinstance(e, ToolResult))
        assert (result.output, result.is_error) == ("two words", False)
        assert sink.end.status == "done"
        entries = await rt.storage.history("helper", "agent:assistant")
        assert [(e.role, e.content) for e in entries] == [
            ("user", "two words"),
            ("assistant", "two words"),
        ]


async def test_delegation_cycles_and_depth_are_refused(autojump_clock):
    async with runtime(delegate_depth=2) as rt:
        loop = submit(
            rt, delegation("helper", delegation("assistant", "back to you")), sender="loop"
        )
        await loop.finished()
        result = next(e for e in loop.events if isinstance(e, ToolResult))
        assert "would loop: assistant -> helper -> assistant" in result.output
        deep = submit(
            rt, delegation("helper", delegation("third", delegation("fourth", "x"))), sender="deep"
        )
        await deep.finished()
        result = next(e for e in deep.events if isinstance(e, ToolResult))
        assert "at most 2 agents deep" in result.output


async def test_killing_the_caller_kills_its_delegate(autojump_clock):
    async with runtime() as rt:
        sink = submit(rt, delegation("helper", "/slow 100 1000"))
        await trio.sleep(5)
        delegate = rt.conversations[("helper", "agent:assistant")].current
        assert delegate is not None and delegate.started
        assert await rt.kill("assistant", "user", everything=False) is not None
        with deadline(RUN_S, "the killed caller's delegate to end"):
            await delegate.done.wait()
        assert sink.end.status == "killed"
        entries = await rt.storage.history("helper", "agent:assistant")
        assert [e.role for e in entries] == ["user"]


# --- a network model: its request goes out while the user entry is written ---------


class GatedStorage(MemoryStorage):
    """Memory storage whose appends wait at a gate, to see what happens meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.waiting = 0  # appends held at the gate
        self.failure: StorageError | None = None  # what the held appends fail with, if set

    async def append(self, agent, sender, entries, *, create=None):
        self.waiting += 1
        await self.gate.wait()
        self.waiting -= 1
        if self.failure is not None:
            raise self.failure
        return await super().append(agent, sender, entries, create=create)


class NetworkModel:
    """A provider that is not `local`: it records its first request and answers 'hi'."""

    local = False

    def __init__(self, *, pause_s: float = 0.0) -> None:
        self.pause_s = pause_s  # before the answer: a model's time to first token
        self.asked = trio.Event()
        self.last_message = ""

    async def stream(self, request):
        self.last_message = request.messages[-1].content
        self.asked.set()
        await trio.sleep(self.pause_s)
        yield TextChunk("hi")
        yield UsageChunk(1, 1)
        yield FinishChunk("stop")

    async def aclose(self) -> None:
        pass

    async def list_models(self) -> list[str] | None:
        return None


@asynccontextmanager
async def network_runtime(
    storage: MemoryStorage, model: NetworkModel, tools: list[str] | None = None
) -> AsyncIterator[Runtime]:
    config = Config(agents={"assistant": AgentConfig(provider="net", tools=tools or [])})
    agent = Agent(name="assistant", config=config.agents["assistant"], provider=model)
    async with trio.open_nursery() as nursery:
        yield Runtime(config, storage, {"assistant": agent}, nursery)
        nursery.cancel_scope.cancel()


async def test_a_network_model_is_asked_while_the_user_entry_is_written(autojump_clock):
    storage, model = GatedStorage(), NetworkModel()
    async with network_runtime(storage, model) as rt:
        sink = submit(rt, "hello there")
        with deadline(5, "the model to be asked while the write is held"):
            await model.asked.wait()
        assert model.last_message == "hello there", "the entry in flight is in the prompt"
        await trio.testing.wait_all_tasks_blocked()
        assert storage.waiting == 1, "the user entry's write is under way"
        assert sink.events == [], "what the model said is held until `start`"
        storage.gate.set()
        await sink.finished(within=5)
        assert [type(e) for e in sink.events] == [Start, TextDelta, Usage, End]
        assert sink.events[0].seq == 1 and sink.end.status == "done"
        entries = await storage.history("assistant", "user")
        assert [(e.role, e.content) for e in entries] == [
            ("user", "hello there"),
            ("assistant", "hi"),
        ]


async def test_a_failed_user_entry_ends_the_run_500_with_nothing_shown(autojump_clock):
    storage, model = GatedStorage(), NetworkModel(pause_s=10)
    async with network_runtime(storage, model) as rt:
        sink = submit(rt, "hello")
        with deadline(5, "the model to be asked"):
            await model.asked.wait()
        storage.failure = StorageError("the disk is full")
        storage.gate.set()
        # Not the model's 10 s: the run stops when the write fails.
        await sink.finished(within=5)
        assert [type(e) for e in sink.events] == [End]
        assert sink.end.status == "error" and sink.end.error.code == 500
        assert "the disk is full" in sink.end.error.message
        assert await storage.get_conversation("assistant", "user") is None


async def test_a_run_killed_while_its_user_entry_is_written_keeps_it_and_starts(autojump_clock):
    storage, model = GatedStorage(), NetworkModel(pause_s=10)
    async with network_runtime(storage, model) as rt:
        sink = submit(rt, "hello")
        with deadline(5, "the model to be asked"):
            await model.asked.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(rt.kill, "assistant", "user", everything=False))
            await trio.testing.wait_all_tasks_blocked()
            assert not sink.ended.is_set(), "the end waits for the write under way"
            storage.gate.set()
        assert [type(e) for e in sink.events] == [Start, End]
        assert sink.end.status == "killed"
        entries = await storage.history("assistant", "user")
        assert [e.role for e in entries] == ["user"]


class TitlingModel(NetworkModel):
    """A network model whose first step calls set_title at once; then it answers."""

    async def stream(self, request):
        self.asked.set()
        if request.messages[-1].role == "tool":
            yield TextChunk("titled")
            yield FinishChunk("stop")
            return
        call = ToolCallInfo(call_id="call_t", name="set_title", arguments='{"title": "Pets"}')
        yield ToolCallChunk(call)
        yield FinishChunk("tool_calls")


async def test_a_tool_called_while_the_user_entry_is_written_waits_for_it(autojump_clock):
    # Regression: set_title ran before the new conversation was stored, and failed
    # with ConversationNotFound (seen under the parallel suite's load).
    storage, model = GatedStorage(), TitlingModel()
    async with network_runtime(storage, model, tools=["set_title"]) as rt:
        sink = submit(rt, "name this")
        with deadline(5, "the model to be asked"):
            await model.asked.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert storage.waiting == 1, "the user entry's write is held at the gate"
        storage.gate.set()
        await sink.finished(within=5)
    result = sink.result
    assert (result.output, result.is_error) == ("Title set to 'Pets'.", False)
    item = await storage.get_conversation("assistant", "user")
    assert item is not None and item.title == "Pets"
