"""Agent Markdown as Telegram text: MarkdownV2 conversion and message splitting.

Pure functions, no I/O. Agents write CommonMark; markdown-it-py parses it
(CommonMark, plus ``~~strikethrough~~``) and ``to_markdown_v2`` walks the
tree into Telegram's MarkdownV2, which has other markers and reserves 18
characters that must be escaped wherever they are not markup. What
MarkdownV2 cannot show (a heading, a list, a rule, raw HTML) is shown as
text: no text is ever dropped, and the output parses even for half-streamed
input (a fence left open is closed). ``split_message`` cuts a long reply into
messages at paragraph or line boundaries, before conversion.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

#: The most text a Telegram message holds, in UTF-16 code units after entity parsing.
MESSAGE_LIMIT = 4096

# Characters MarkdownV2 reserves outside code: each must be escaped with `\`.
_RESERVED = frozenset("_*[]()~`>#+-=|{}.!\\")

_PARSER = MarkdownIt("commonmark").enable("strikethrough")

# Inline Markdown nodes and the MarkdownV2 marker of the entity each becomes.
_MARKERS = {"strong": "*", "em": "_", "s": "~"}
# Telegram makes links of these only; another URL is shown as text.
_LINKABLE = ("http://", "https://", "tg://")
_RULE = "———"  # a thematic break: no longer than the shortest one written


def telegram_length(text: str) -> int:
    """How long Telegram counts ``text``: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def escape_markdown_v2(text: str) -> str:
    """``text`` as literal MarkdownV2 (outside code): every reserved character escaped."""
    return "".join("\\" + char if char in _RESERVED else char for char in text)


def _escape_code(text: str) -> str:
    return text.replace("\\", "\\\\").replace("`", "\\`")


def _escape_url(url: str) -> str:
    return url.replace("\\", "\\\\").replace(")", "\\)")


@dataclass(frozen=True)
class _Line:
    """A line of MarkdownV2 and what it belongs to."""

    text: str
    code: bool = False  # a line of a pre block, which no quote or list marker may precede
    quoted: bool = False  # shown in a blockquote: `>` goes before it


def to_markdown_v2(markdown: str) -> str:
    """Convert agent Markdown to Telegram MarkdownV2 that always parses.

    Headings become bold lines, bullets `•`, ordered items keep their number,
    a rule a line of dashes, raw HTML and links Telegram cannot open show as
    text. A fenced block left open (mid-stream) is closed.
    """
    tree = SyntaxTreeNode(_PARSER.parse(markdown))
    return "\n".join((">" if line.quoted else "") + line.text for line in _blocks(tree.children))


def _blocks(nodes: Iterable[SyntaxTreeNode]) -> list[_Line]:
    """Block nodes as lines, a blank line between two only where the source has one."""
    lines: list[_Line] = []
    last_end: int | None = None
    for node in nodes:
        rendered = _block(node)
        if not rendered or node.map is None:
            continue
        if last_end is not None and node.map[0] > last_end:
            lines.append(_Line(""))
        lines += rendered
        last_end = _end(node)
    return lines


def _end(node: SyntaxTreeNode) -> int:
    """The line after a block's last line of content (a list's own map runs on
    over the blank lines after it)."""
    inner = [child for child in node.children if child.map is not None]
    if node.type in ("bullet_list", "ordered_list", "list_item", "blockquote") and inner:
        return _end(inner[-1])
    assert node.map is not None
    return node.map[1]


def _block(node: SyntaxTreeNode) -> list[_Line]:
    match node.type:
        case "paragraph":
            return _text_lines(_inline(node.children[0]))
        case "heading":
            title = _inline(node.children[0], frozenset({"strong"}))
            return _text_lines(f"*{title}*") if title.strip() else []
        case "fence" | "code_block":
            return _pre(next(iter(node.info.split()), ""), node.content)
        case "html_block":
            return _text_lines(escape_markdown_v2(node.content.rstrip("\n")))
        case "hr":
            return [_Line(_RULE)]
        case "blockquote":
            return [
                line if line.code else replace(line, quoted=True) for line in _blocks(node.children)
            ]
        case "bullet_list" | "ordered_list":
            return [line for item in node.children for line in _item(item)]
    return []  # nothing else holds text: a link reference definition leaves no node


def _text_lines(text: str) -> list[_Line]:
    return [_Line(line) for line in text.split("\n")]


def _pre(language: str, content: str) -> list[_Line]:
    body = content.removesuffix("\n")
    if not body.strip():
        return []  # an empty block shows nothing (Telegram drops an empty entity)
    # MarkdownV2 reads the language up to a space or a backtick; keep only a plain name.
    if not language.replace("-", "").replace("+", "").replace("#", "").isalnum():
        language = ""
    lines = [f"```{language}", *_escape_code(body).split("\n"), "```"]
    return [_Line(line, code=True) for line in lines]


def _item(item: SyntaxTreeNode) -> list[_Line]:
    """A list item: its marker before its first line, its other lines indented to match."""
    bullet = item.parent is not None and item.parent.type == "bullet_list"
    marker = "•" if bullet else escape_markdown_v2(item.info + item.markup)
    lines = _blocks(item.children)
    if not lines or lines[0].code:
        lines.insert(0, _Line(""))
    indent = " " * (len(item.info + item.markup) + 1)
    shown = [replace(lines[0], text=f"{marker} {lines[0].text}".rstrip())]
    for line in lines[1:]:
        shown.append(line if line.code or not line.text else replace(line, text=indent + line.text))
    return shown


def _inline(node: SyntaxTreeNode, inside: frozenset[str] = frozenset()) -> str:
    """Inline Markdown to MarkdownV2; ``inside`` names the entities around this
    text: an entity is not opened inside itself, and a code span inside any
    entity is shown as its text (Telegram nests no entity in a link or in code)."""
    out: list[str] = []
    italic = False  # whether ``out`` ends with an italic entity
    for child in node.children:
        part = _inline_part(child, inside)
        opens_italic = child.type == "em" and "em" not in inside
        if italic and opens_italic:
            # One italic run right after another is one: MarkdownV2 reads `__` as underline.
            out[-1] = out[-1][:-1] + part[1:]
        else:
            out.append(part)
        italic = opens_italic
    return "".join(out)


def _inline_part(node: SyntaxTreeNode, inside: frozenset[str]) -> str:
    match node.type:
        case "text" | "html_inline":
            return escape_markdown_v2(node.content)
        case "softbreak" | "hardbreak":
            return "\n"
        case "code_inline":
            if inside or not node.content.strip():
                return escape_markdown_v2(node.content)
            return f"`{_escape_code(node.content)}`"
        case "strong" | "em" | "s":
            body = _inline(node, inside | {node.type})
            if node.type in inside:
                return body
            return f"{_MARKERS[node.type]}{body}{_MARKERS[node.type]}"
        case "link" | "image":
            return _link(node, inside)
    return ""  # markdown-it's CommonMark inline rules make no other node


def _link(node: SyntaxTreeNode, inside: frozenset[str]) -> str:
    url = str(node.attrs.get("href" if node.type == "link" else "src", ""))
    label = _inline(node, inside | {"link"})
    if not label.strip():
        return escape_markdown_v2(url)
    if url.lower().startswith(_LINKABLE) and "link" not in inside:
        return f"[{label}]({_escape_url(url)})"
    shown = _plain(node)
    if not url or url in shown or url.removeprefix("mailto:") in shown:
        return label
    return f"{label} {escape_markdown_v2(f'({url})')}"


def _plain(node: SyntaxTreeNode) -> str:
    """The text an inline node shows, without markup."""
    return "".join(
        child.content if not child.children else _plain(child) for child in node.children
    )


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Cut ``text`` into pieces of at most ``limit`` UTF-16 units each.

    A cut falls on a paragraph break in the second half of the room if there
    is one, else on the last line break, else the last space (either past the
    first quarter of the room), else anywhere.
    A fenced code block cut in two is closed at the end of one piece and
    opened again at the start of the next.
    """
    pieces: list[str] = []
    rest = text
    while telegram_length(rest) > limit:
        # Room for closing a fence that the cut may leave open.
        room = _fitting(rest, limit - _closing_room(rest))
        cut, skip = _best_cut(rest, room)
        head, rest = rest[:cut], rest[cut + skip :]
        fence = _open_fence(head)
        if fence is not None:
            opening, closing = fence
            head += "\n" + closing
            if len(opening) < limit // 8:  # shorter than any cut, so each piece makes progress
                rest = f"{opening}\n{rest}"
        pieces.append(head)
    pieces.append(rest)
    return pieces


def _closing_room(text: str) -> int:
    """Room for the line that closes the longest fence marker in ``text``."""
    room = 0
    for line in text.split("\n"):
        line = line.lstrip(" ")
        if line.startswith(("```", "~~~")):
            room = max(room, 1 + len(line) - len(line.lstrip(line[0])))
    return room


def _fitting(text: str, limit: int) -> int:
    """The longest prefix of ``text`` (in characters) that is at most ``limit`` units."""
    units = 0
    for index, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit:
            return index
    return len(text)


def _best_cut(text: str, room: int) -> tuple[int, int]:
    """Where to cut ``text`` within its first ``room`` characters, and how many
    separator characters to drop there."""
    window = text[:room]
    paragraph = window.rfind("\n\n")
    if paragraph >= room // 2:
        return paragraph, 2
    # A break too near the start would leave a scrap of a message.
    for separator in ("\n", " "):
        at = window.rfind(separator)
        if at >= max(room // 4, 1):
            return at, 1
    return room, 0


def _open_fence(piece: str) -> tuple[str, str] | None:
    """The opening line and the closing marker of the fenced code block that
    ``piece`` leaves open, if any: the block a line added after it would fall in.
    Only a block at the top level is closed and opened again (one in a quote or
    a list ends with its container)."""
    lines = piece.split("\n")
    for token in reversed(_PARSER.parse(piece + "\nx")):
        if token.type == "fence" and token.level == 0 and token.map is not None:
            if token.map[1] <= len(lines):
                return None
            return lines[token.map[0]].strip(), token.markup
    return None
