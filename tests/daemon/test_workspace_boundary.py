"""The workspace boundary, case by case: `_inside`, `_relative` and the cwd checks.

Each table pins one exact outcome per input: sibling directories whose names
begin with the root's (`ws-evil`, `ws2`), trailing slashes, `.` and `..`
segments, case, and unicode look-alikes of `/` and `.`. A bare prefix check
(no separator) in `_inside` lets `ws-evil` and `ws2` in, and fails them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from chinwag.daemon._errors import ToolError
from chinwag.daemon._workspace import _inside, _relative, workdir_problem

OUTSIDE = "leads outside the working directory"
ABSOLUTE = "is absolute; give a path relative to the working directory"
NOT_ALLOWED = "is outside the allowed roots"
NOT_ABSOLUTE = "is not an absolute path"
MISSING = "is not an existing directory"

DIVISION_SLASH, FULLWIDTH_SOLIDUS, FULLWIDTH_DOT = "\u2215", "\uff0f", "\uff0e"
CYRILLIC_DZE = "\u0455"  # drawn as a Latin s


@pytest.mark.parametrize(
    ("path", "root", "inside"),
    [
        ("/x/ws", "/x/ws", True),
        ("/x/ws/a", "/x/ws", True),
        ("/x/ws/a/b.txt", "/x/ws", True),
        ("/x/ws/ws-evil", "/x/ws", True),
        # Siblings that begin with the root's name.
        ("/x/ws-evil", "/x/ws", False),
        ("/x/ws-evil/s.txt", "/x/ws", False),
        ("/x/ws2", "/x/ws", False),
        ("/x/ws2/s.txt", "/x/ws", False),
        ("/x/wsx", "/x/ws", False),
        ("/x/ws.d/s.txt", "/x/ws", False),
        # Its parent, and a root given with its trailing slash.
        ("/x", "/x/ws", False),
        ("/x/ws/a", "/x/ws/", True),
        ("/x/ws-evil", "/x/ws/", False),
        ("/x/ws2", "/x/ws/", False),
        # Case: another directory on Linux.
        ("/x/WS", "/x/ws", False),
        ("/x/WS/a", "/x/ws", False),
        ("/X/ws/a", "/x/ws", False),
        # Look-alikes of `/` are name characters, not separators; a look-alike letter
        # is another name.
        (f"/x/ws{DIVISION_SLASH}a", "/x/ws", False),
        (f"/x/ws{FULLWIDTH_SOLIDUS}a", "/x/ws", False),
        (f"/x/w{CYRILLIC_DZE}", "/x/ws", False),
        (f"/x/w{CYRILLIC_DZE}/a", "/x/ws", False),
        (f"/x/ws/a{DIVISION_SLASH}..{DIVISION_SLASH}b", "/x/ws", True),
        # Unicode normalisation: the same letters, other code points, another name.
        ("/x/cafe\u0301/a", "/x/caf\u00e9", False),
        ("/x/caf\u00e9/a", "/x/caf\u00e9", True),
        # The file system's root holds everything.
        ("/", "/", True),
        ("/x/ws", "/", True),
    ],
)
def test_inside_is_a_whole_component_prefix(path: str, root: str, inside: bool) -> None:
    assert _inside(path, root) is inside


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """``base/ws`` is the working directory; the rest sit beside it or lead out of it."""
    base = tmp_path.resolve()
    ws = base / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "s.txt").write_text("inside\n")
    (ws / "sub" / "s.txt").write_text("inside, deeper\n")
    for sibling in ("ws-evil", "ws2", "WS", f"w{CYRILLIC_DZE}"):
        (base / sibling).mkdir()
        (base / sibling / "s.txt").write_text("outside\n")
    (ws / "escape").symlink_to(base / "ws-evil")  # inside by name, outside once resolved
    (ws / "back").symlink_to("sub")  # a symlink that stays inside
    (base / "into").symlink_to(ws)  # a symlink from outside to the root
    yield base


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # Inside, however it is spelled.
        ("s.txt", "s.txt"),
        ("./s.txt", "s.txt"),
        (".", "."),
        ("./", "."),
        ("sub", "sub"),
        ("sub/", "sub"),
        ("sub//", "sub"),
        ("sub/./s.txt", os.path.join("sub", "s.txt")),
        ("sub/../s.txt", "s.txt"),
        ("sub/..", "."),
        ("back/s.txt", os.path.join("sub", "s.txt")),
        ("new/deeper/file.txt", os.path.join("new", "deeper", "file.txt")),
        # Out and back in: what counts is where it lands.
        ("../ws", "."),
        ("../ws/s.txt", "s.txt"),
        ("sub/../../ws/sub", "sub"),
        ("../into/s.txt", "s.txt"),  # through a symlink outside that leads to the root
        # Out, to siblings that begin with the root's name: the case first.
        ("../ws-evil/s.txt", OUTSIDE),
        ("../ws-evil", OUTSIDE),
        ("../ws-evil/", OUTSIDE),
        ("../ws2/s.txt", OUTSIDE),
        ("../ws2", OUTSIDE),
        ("sub/../../ws-evil/s.txt", OUTSIDE),
        ("../ws/../ws-evil/s.txt", OUTSIDE),
        ("../ws/./../ws2", OUTSIDE),
        ("./../ws-evil", OUTSIDE),
        # Out, otherwise.
        ("..", OUTSIDE),
        ("../", OUTSIDE),
        ("../..", OUTSIDE),
        ("sub/../..", OUTSIDE),
        ("../WS/s.txt", OUTSIDE),
        (f"../w{CYRILLIC_DZE}/s.txt", OUTSIDE),
        ("escape", OUTSIDE),
        ("escape/s.txt", OUTSIDE),
        # Absolute, however it is spelled.
        ("/etc/passwd", ABSOLUTE),
        ("//etc", ABSOLUTE),
        ("~/s.txt", ABSOLUTE),
        ("~", ABSOLUTE),
        # Look-alikes of `/` and `.` are names inside, never steps out.
        (f"..{DIVISION_SLASH}ws-evil", f"..{DIVISION_SLASH}ws-evil"),
        (f"..{FULLWIDTH_SOLIDUS}ws-evil{FULLWIDTH_SOLIDUS}s.txt",
         f"..{FULLWIDTH_SOLIDUS}ws-evil{FULLWIDTH_SOLIDUS}s.txt"),
        (f"{FULLWIDTH_DOT}{FULLWIDTH_DOT}/ws-evil/s.txt",
         os.path.join(f"{FULLWIDTH_DOT}{FULLWIDTH_DOT}", "ws-evil", "s.txt")),
        ("...", "..."),
        ("..s.txt", "..s.txt"),
        (".. ", ".. "),
    ],
)  # fmt: skip
def test_a_tool_path_resolves_inside_or_is_refused(tree: Path, path: str, expected: str) -> None:
    root = str(tree / "ws")
    if expected in (OUTSIDE, ABSOLUTE):
        with pytest.raises(ToolError, match=expected) as refused:
            _relative(root, path, "read_file")
        assert repr(path) in str(refused.value), "the refusal names the path given"
    else:
        assert _relative(root, path, "read_file") == expected


@pytest.mark.parametrize(
    ("cwd", "roots", "problem"),
    [
        ("ws", ["ws"], None),
        ("ws/", ["ws"], None),
        ("ws//", ["ws"], None),
        ("ws/sub", ["ws"], None),
        ("ws/sub/", ["ws"], None),
        ("ws/./sub", ["ws"], None),
        ("ws/sub/..", ["ws"], None),
        ("ws/back", ["ws"], None),  # a symlink that stays inside
        ("into", ["ws"], None),  # a symlink to the root itself
        ("ws", ["ws/"], None),  # a root written with its trailing slash
        ("ws/sub", ["ws/."], None),
        ("ws/sub", ["ws/sub/.."], None),
        ("ws", ["into"], None),  # a root given through a symlink is resolved too
        ("ws/sub", ["ws2", "ws"], None),  # any one of the roots
        # Siblings that begin with the root's name: the case first.
        ("ws-evil", ["ws"], NOT_ALLOWED),
        ("ws-evil/", ["ws"], NOT_ALLOWED),
        ("ws2", ["ws"], NOT_ALLOWED),
        ("ws-evil", ["ws/"], NOT_ALLOWED),
        ("ws2", ["ws/"], NOT_ALLOWED),
        ("ws/../ws-evil", ["ws"], NOT_ALLOWED),
        ("ws/sub/../../ws2", ["ws"], NOT_ALLOWED),
        ("ws/escape", ["ws"], NOT_ALLOWED),  # inside by name, outside once resolved
        # Its parent, case, a look-alike letter.
        ("ws/..", ["ws"], NOT_ALLOWED),
        (".", ["ws"], NOT_ALLOWED),
        ("WS", ["ws"], NOT_ALLOWED),
        (f"w{CYRILLIC_DZE}", ["ws"], NOT_ALLOWED),
        ("ws", ["WS"], NOT_ALLOWED),
        ("ws", [f"w{CYRILLIC_DZE}"], NOT_ALLOWED),
        ("ws", [], NOT_ALLOWED),
        # Not a directory that exists, or not absolute.
        ("ws/missing", ["ws"], MISSING),
        ("ws/s.txt", ["ws"], MISSING),
        (f"ws{DIVISION_SLASH}sub", ["ws"], MISSING),
        (f"ws{FULLWIDTH_SOLIDUS}sub", ["ws"], MISSING),
    ],
)
def test_a_cwd_lies_under_an_allowed_root_or_is_refused(
    tree: Path, cwd: str, roots: list[str], problem: str | None
) -> None:
    # Relative names in the table are under the tree; a trailing slash is kept as written.
    found = workdir_problem(f"{tree}/{cwd}", [f"{tree}/{root}" for root in roots])
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and found.endswith("."), found


@pytest.mark.parametrize("cwd", ["ws", "./ws", "ws/sub", "", "~/ws"])
def test_a_cwd_that_is_not_absolute_is_refused(tree: Path, cwd: str) -> None:
    found = workdir_problem(cwd, [str(tree / "ws")])
    assert found is not None and NOT_ABSOLUTE in found, found
