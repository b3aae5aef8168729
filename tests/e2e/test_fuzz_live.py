"""Live fuzzing: malformed frames thrown at a running daemon from many connections while a
well-behaved client keeps streaming. The daemon must answer every one with a clean error
(or a close, for a broken frame), never crash, and never disturb the good client.

10,000 frames by default; CHINWAG_FUZZ_FRAMES=100000 runs the long version. The frames
come from a seeded generator (CHINWAG_FUZZ_SEED, printed on failure), so a failure replays.
"""

from __future__ import annotations

import os
import random
import struct
from typing import get_args

import msgspec
import pytest
import trio
from chinwag.clients import connect
from chinwag.protocol import ClientMsg, Hello, TextDelta
from deadlines import deadline

FRAMES = int(os.environ.get("CHINWAG_FUZZ_FRAMES", "10000"))
SEED = int(os.environ.get("CHINWAG_FUZZ_SEED", "20261129"))
CONNECTIONS = 32  # fuzzing connections at once
FUZZ_S = 240
MAX_FRAME = 65536

CONFIG = f"""
[daemon]
max_frame_bytes = {MAX_FRAME}
max_connections = 256

[agents.assistant]
provider = "echo"
"""

# Every type a client may send, and two no daemon knows.
TYPES = [msg.__struct_config__.tag for msg in get_args(ClientMsg)] + ["nope", ""]


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def junk_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 4 else 5)
    match kind:
        case 0:
            return rng.randrange(-(2**70), 2**70)
        case 1:
            return rng.random() * 10 ** rng.randrange(-5, 300)
        case 2:
            return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(40)))
        case 3:
            return rng.choice([None, True, False, "", 0, -1])
        case 4:
            return "x" * rng.randrange(1000, 20000)  # a long string, within the frame
        case 5 | 6:
            return [junk_value(rng, depth + 1) for _ in range(rng.randrange(6))]
        case _:
            return {f"k{i}": junk_value(rng, depth + 1) for i in range(rng.randrange(6))}


def malformed(rng: random.Random) -> tuple[bytes, bool]:
    """One bad frame and whether the daemon may close the connection for it."""
    match rng.randrange(10):
        case 0:  # random bytes as a body
            return frame(rng.randbytes(rng.randrange(1, 200))), True
        case 1:  # a zero or oversized length
            return struct.pack(">I", rng.choice([0, MAX_FRAME + 1, 2**32 - 1])), True
        case 2:  # JSON that is not an object
            return frame(msgspec.json.encode(junk_value(rng))), False
        case 3:  # a known or unknown type with junk fields
            body = {"type": rng.choice(TYPES), "id": junk_value(rng)}
            body |= {rng.choice(["agent", "content", "sender", "limit", "target"]): junk_value(rng)}
            return frame(msgspec.json.encode(body)), False
        case 4:  # a valid request with one field of the wrong type
            body = {"type": "stream", "id": rng.randrange(1 << 20), "agent": "assistant",
                    "content": "x", rng.choice(["content", "agent", "queue", "cwd", "guest"]):
                    junk_value(rng)}  # fmt: skip
            return frame(msgspec.json.encode(body)), False
        case 5:  # deep nesting
            depth = rng.randrange(50, 3000)
            return frame(b'{"type":"ping","id":1,"x":' + b"[" * depth + b"]" * depth + b"}"), True
        case 6:  # truncated JSON
            whole = msgspec.json.encode({"type": "ping", "id": 7, "pad": "y" * 50})
            return frame(whole[: rng.randrange(1, len(whole))]), True
        case 7:  # invalid UTF-8 in a string
            return frame(b'{"type":"ping","id":1,"s":"\xff\xfe"}'), True
        case 8:  # a huge array of small items
            items = b",".join([b"0"] * rng.randrange(1000, 20000))
            return frame(b'{"type":"ping","id":2,"a":[' + items + b"]}"), False
        case _:  # requests for things that do not exist
            body = {"type": rng.choice(["kill", "attach", "get_history", "compact"]),
                    "id": rng.randrange(1 << 20), "agent": rng.choice(["ghost", "assistant"]),
                    "sender": rng.choice(["nobody", "\x00", "z" * 300])}  # fmt: skip
            return frame(msgspec.json.encode(body)), False


async def fuzz_connection(path, rng: random.Random, budget: list[int], answers: list[int]) -> None:
    hello = frame(msgspec.json.encode(Hello(protocol=1, client="fuzz")))
    while budget[0] > 0:
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(hello)
            closed = False
            for _ in range(rng.randrange(1, 20)):
                if budget[0] <= 0 or closed:
                    break
                budget[0] -= 1
                data, may_close = malformed(rng)
                try:
                    await stream.send_all(data)
                except trio.BrokenResourceError:
                    break
                closed = may_close
            # Read whatever the daemon answered until it closes or goes quiet after a ping.
            try:
                await stream.send_all(frame(b'{"type":"ping","id":424242}'))
            except trio.BrokenResourceError:
                continue
            received = b""
            with trio.move_on_after(5):
                while chunk := await stream.receive_some(1 << 16):
                    received += chunk
                    if b"424242" in received:
                        break
            # A reset here would mean the daemon destroyed its own error frame.
            answers[0] += received.count(b'"type":"error"')


@pytest.mark.timeout(FUZZ_S + 60)  # past the suite's default; its own deadline says more
async def test_ten_thousand_malformed_frames_leave_the_daemon_and_a_good_client_unharmed(
    daemon_factory,
):
    daemon = daemon_factory(CONFIG)
    budget, answers = [FRAMES], [0]
    good_runs = 0

    async def good_client(done: trio.Event) -> None:
        nonlocal good_runs
        async with connect(daemon.socket_path) as c:
            while not done.is_set() or good_runs < 5:
                words = [f"w{good_runs}-{i}" for i in range(20)]
                async with c.stream("assistant", " ".join(words), sender="good") as events:
                    got = await events.collect()
                assert got[-1].status == "done", got[-1]
                assert "".join(e.delta for e in got if isinstance(e, TextDelta)).split() == words
                good_runs += 1

    with deadline(FUZZ_S, f"{FRAMES} malformed frames sent and the good client's runs"):
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(good_client, done)
            async with trio.open_nursery() as fuzzers:
                for i in range(CONNECTIONS):
                    fuzzers.start_soon(
                        fuzz_connection, daemon.socket_path, random.Random(SEED + i), budget,
                        answers,
                    )  # fmt: skip
            done.set()

    assert daemon.proc.poll() is None, f"the daemon died (seed {SEED})"
    assert answers[0] > FRAMES // 4, f"only {answers[0]} error frames came back (seed {SEED})"
    async with connect(daemon.socket_path) as c:
        stats = await c.stats()
        history = await c.history("assistant", "good")
    assert history.last_seq == 2 * good_runs, "every good turn was stored"
    assert stats.connections == 1
    log = daemon.log_path.read_text()
    assert "Traceback" not in log and "request_crashed" not in log, f"seed {SEED}"
