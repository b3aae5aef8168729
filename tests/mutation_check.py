"""The mutation check: break one behaviour at a time and show the suite failing, not hanging.

    python tests/mutation_check.py                  # HEAD, every mutation, its tests
    python tests/mutation_check.py --worktree       # the working tree as it is, unstaged too
    python tests/mutation_check.py --only bare-prefix,ask-timeout
    python tests/mutation_check.py --suite          # the whole suite per mutation (slow)

Each mutation is a small text edit of one source file. The tree is copied to a
temporary directory (``git archive``, or the working tree's files with
``--worktree``); the files you commit from are never touched. The copy's
packages are put first on ``PYTHONPATH`` as ``chinwag.*`` (checked before
anything runs), so the tests, and every ``chinwag serve`` they start, run the
copy. First the tests of every mutation run on the unmutated copy and must
pass; then, for each mutation, its tests run on the mutated copy, which must
make them fail within ``--limit`` seconds (2 minutes): a run still going then
is killed and counts as a hang, a failure of this check.

Exit status 0 when every mutation was caught in time, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "daemon", "storage", "clients")  # installed as chinwag.<name>


@dataclass(frozen=True)
class Mutation:
    key: str
    what: str  # as the issue names it
    path: str  # the file edited, from the repository's root
    old: str  # text that must occur exactly once
    new: str
    tests: list[str]
    append: str = ""  # code added at the end of the file
    imports: list[str] = field(default_factory=list)


MUTATIONS = [
    Mutation(
        "kill-keeps-step",
        "kill keeps the unfinished step",
        "daemon/_steps.py",
        "        async with aclosing(speaker.provider.stream(request)) as chunks:\n",
        "        async with (\n"
        "            _kept_when_killed(turn, text, attribution),\n"
        "            aclosing(speaker.provider.stream(request)) as chunks,\n"
        "        ):\n",
        ["tests/e2e/test_runs.py", "tests/daemon/test_runtime.py"],
        append="""

@asynccontextmanager
async def _kept_when_killed(turn, text, agent):  # the mutation: a killed step is stored
    try:
        yield
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            entry = Entry(seq=0, role="assistant", content="".join(text), agent=agent,
                          run_id=turn.id, created_at=now())
            await turn.append([entry], [])
        raise
""",
        imports=["from contextlib import asynccontextmanager"],
    ),
    Mutation(
        "end-before-write",
        "`end done` before the durable write",
        "daemon/_steps.py",
        "        if not calls:\n"
        "            await turn.append([assistant], [])\n"
        "            return\n",
        "        if not calls:\n"
        "            turn.conversation.spawn(functools.partial(_late, turn, assistant))\n"
        "            return\n",
        ["tests/e2e/test_runs.py", "tests/crash/test_crash.py"],
        append="""

async def _late(turn, entry):  # the mutation: the answer is stored after `end done`
    await trio.sleep(0.3)
    await turn.append([entry], [])
""",
        imports=["import functools"],
    ),
    Mutation(
        "reject-no-409",
        "`reject` without 409",
        "daemon/_runtime.py",
        '        if queue == "reject" and conv.busy:\n',
        "        if False:  # the mutation: reject queues like enqueue\n",
        ["tests/e2e/test_runs.py", "tests/daemon/test_connection.py"],
    ),
    Mutation(
        "attach-no-replay",
        "`attach` without replay",
        "daemon/_runtime.py",
        "        for event in run.events:\n            if not sink(event):\n",
        "        for event in run.events[:0]:  # the mutation: nothing replayed\n"
        "            if not sink(event):\n",
        ["tests/e2e/test_runs.py", "tests/clients/test_client_library.py"],
    ),
    Mutation(
        "torn-line-kept",
        "a torn jsonl line kept",
        "storage/_jsonl.py",
        "        stat = _truncate(path, end)\n    if last is None:\n",
        "        end = size  # the mutation: the torn line stays\n    if last is None:\n",
        ["tests/conformance/test_jsonl.py"],
    ),
    Mutation(
        "split-counts-characters",
        "the 4096 split counting characters",
        "clients/telegram/_formatting.py",
        '    return len(text.encode("utf-16-le")) // 2\n',
        "    return len(text)  # the mutation: characters, not UTF-16 code units\n",
        [
            "tests/clients/telegram/test_telegram_formatting.py",
            "tests/clients/telegram/test_telegram_bridge.py",
        ],
    ),
    Mutation(
        "dot-dot-allowed",
        "`..` allowed",
        "daemon/_workspace.py",
        "    if not _inside(full, root):\n",
        "    if False:  # the mutation: anything resolved is allowed\n",
        ["tests/daemon/test_workspace.py", "tests/daemon/test_workspace_boundary.py"],
    ),
    Mutation(
        "ask-timeout-ignored",
        "the ask timeout ignored",
        "daemon/_conversation.py",
        "            with trio.move_on_after(math.inf if timeout is None else timeout):\n",
        "            with trio.move_on_after(math.inf):  # the mutation: no timeout\n",
        ["tests/daemon/test_runtime.py"],
    ),
    Mutation(
        "bare-prefix",
        "the bare-prefix `_inside`",
        "daemon/_workspace.py",
        "    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)\n",
        "    return path.startswith(root)  # the mutation: no separator after the root\n",
        ["tests/daemon/test_workspace_boundary.py", "tests/daemon/test_workspace.py"],
    ),
]


def copy_tree(dest: Path, worktree: bool, rev: str) -> str:
    """The repository's files in ``dest``; what was copied, in words."""
    if worktree:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, check=True, capture_output=True,
        ).stdout.split(b"\0")  # fmt: skip
        for name in filter(None, listed):
            source = REPO / os.fsdecode(name)
            if source.is_file():
                target = dest / os.fsdecode(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target, follow_symlinks=False)
        return "the working tree"
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev], cwd=REPO, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    return f"{rev} ({sha})"


def environment(copy: Path) -> dict[str, str]:
    """An environment in which ``import chinwag.<package>`` finds the copy first."""
    shim = copy / ".mutation-path" / "chinwag"
    shim.mkdir(parents=True)
    for package in PACKAGES:
        (shim / package).symlink_to(copy / package)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim.parent), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file is never read from a stale .pyc
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_imports(copy: Path, env: dict[str, str]) -> None:
    code = "import chinwag.{0} as m; print(m.__file__)"
    for package in PACKAGES:
        found = subprocess.run(
            [sys.executable, "-c", code.format(package)],
            cwd=copy, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if not Path(found).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"chinwag.{package} is imported from {found}, not from the copy")


@dataclass
class Outcome:
    status: str  # "passed", "failed", "hung"
    seconds: float
    failed: list[str]
    tail: str


def run_tests(copy: Path, env: dict[str, str], tests: list[str], limit: float) -> Outcome:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
            "-o", "addopts=-rf", *tests]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=limit)
        status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest, its workers and their daemons
        out, _ = proc.communicate()
        status = "hung"
    seconds = time.monotonic() - started
    failed = sorted(set(re.findall(r"^FAILED (.+?)(?: - .*)?$", out, re.M)))
    if status == "failed" and not failed:
        failed = [f"(no test failed: pytest exited {proc.returncode})"]
    return Outcome(status, seconds, failed, "\n".join(out.splitlines()[-15:]))


def mutate(copy: Path, mutation: Mutation) -> str:
    """Apply ``mutation`` to the copy; the file's original text, to restore it."""
    path = copy / mutation.path
    original = path.read_text()
    count = original.count(mutation.old)
    if count != 1:
        raise SystemExit(
            f"{mutation.key}: the text to replace occurs {count} times in {mutation.path},"
            " not once; update the mutation to the code"
        )
    text = original.replace(mutation.old, mutation.new)
    if mutation.imports:
        first = re.search(r"^(import \S+|from (?!__future__ )\S+ import)", text, re.M)
        assert first is not None
        added = "".join(f"{line}\n" for line in mutation.imports)
        text = text[: first.start()] + added + text[first.start() :]
    path.write_text(text + mutation.append)
    return original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the commit to copy (default HEAD)")
    parser.add_argument("--worktree", action="store_true", help="copy the working tree instead")
    parser.add_argument(
        "--only", help="comma-separated keys: " + ", ".join(m.key for m in MUTATIONS)
    )
    parser.add_argument("--suite", action="store_true", help="run the whole suite per mutation")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds per run (default 120)")
    parser.add_argument("--keep", action="store_true", help="keep the copy, and say where")
    args = parser.parse_args()

    chosen = MUTATIONS
    if args.only:
        keys = {key.strip() for key in args.only.split(",")}
        unknown = keys - {m.key for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutations: {', '.join(sorted(unknown))}")
        chosen = [m for m in MUTATIONS if m.key in keys]

    copy = Path(tempfile.mkdtemp(prefix="chinwag-mutation-"))
    try:
        source = copy_tree(copy, args.worktree, args.rev)
        env = environment(copy)
        check_imports(copy, env)
        print(f"mutation check of {source}, in {copy}; at most {args.limit:g} s a run")

        every = sorted({test for m in chosen for test in m.tests})
        baseline = run_tests(copy, env, ["tests"] if args.suite else every, args.limit * 3)
        print(f"\nunmutated: {baseline.status} in {baseline.seconds:.1f} s")
        if baseline.status != "passed":
            print(baseline.tail)
            print("the tests fail or hang without a mutation: nothing can be shown")
            return 1

        caught = 0
        for mutation in chosen:
            original = mutate(copy, mutation)
            try:
                outcome = run_tests(
                    copy, env, ["tests"] if args.suite else mutation.tests, args.limit
                )
            finally:
                (copy / mutation.path).write_text(original)
            verdict = {"failed": "CAUGHT", "passed": "MISSED", "hung": "HUNG"}[outcome.status]
            caught += verdict == "CAUGHT"
            print(
                f"\n{mutation.what} ({mutation.key}, {mutation.path}): {verdict}"
                f" in {outcome.seconds:.1f} s, {len(outcome.failed)} failing"
            )
            for name in outcome.failed[:6]:
                print(f"    {name}")
            if len(outcome.failed) > 6:
                print(f"    ... and {len(outcome.failed) - 6} more")
            if verdict != "CAUGHT":
                print(outcome.tail)
        print(f"\n{caught} of {len(chosen)} mutations caught, each within {args.limit:g} s")
        return 0 if caught == len(chosen) else 1
    finally:
        if args.keep:
            print(f"the copy is kept in {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
