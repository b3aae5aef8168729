"""Agent Markdown as Telegram text: MarkdownV2 conversion and message splitting.

Pure functions, no I/O. Agents write CommonMark-ish Markdown; Telegram's
MarkdownV2 has other markers and reserves 18 characters that must be escaped
wherever they are not markup. ``to_markdown_v2`` parses the Markdown people
and models write (bold, italic, strikethrough, inline code, fenced code,
links, headings, bullets, quotes) and escapes everything else, so its output
parses even for half-streamed input (an unclosed fence is closed).
``split_message`` cuts a long reply into messages at paragraph or line
boundaries, before conversion.
"""

from __future__ import annotations

import re

#: The most text a Telegram message holds, in UTF-16 code units after entity parsing.
MESSAGE_LIMIT = 4096

# Characters MarkdownV2 reserves outside code: each must be escaped with `\`.
_RESERVED = frozenset("_*[]()~`>#+-=|{}.!\\")

_INLINE = re.compile(
    r"\\(?P<escaped>[!-/:-@\[-`{-~])"  # a Markdown backslash escape of ASCII punctuation
    r"|(?P<ticks>`+)(?P<code>.+?)(?P=ticks)"
    r"|\*\*(?P<bold>\S(?:.*?\S)?)\*\*"
    r"|(?<!\w)__(?P<bold_u>\S(?:.*?\S)?)__(?!\w)"
    r"|~~(?P<strike>\S(?:.*?\S)?)~~"
    r"|\[(?P<label>[^\]]+)\]\((?P<url>[^()\s]+)\)"
    r"|(?<![\w*])\*(?P<italic>[^*\s](?:[^*]*[^*\s])?)\*(?![\w*])"
    r"|(?<![\w_])_(?P<italic_u>[^_\s](?:[^_]*[^_\s])?)_(?![\w_])"
)
_FENCE = re.compile(r"^\s*```\s*(?P<lang>[\w#+.-]*)")
_HEADING = re.compile(r"^#{1,6}\s+(?P<text>.*?)\s*#*\s*$")
_QUOTE = re.compile(r"^>\s?(?P<text>.*)$")
_BULLET = re.compile(r"^(?P<indent>\s*)[-*+]\s+(?P<text>.*)$")


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


def to_markdown_v2(markdown: str) -> str:
    """Convert agent Markdown to Telegram MarkdownV2 that always parses.

    What is not recognised as markup is shown literally. Headings become bold
    lines, bullets `•`; a fenced block left open (mid-stream) is closed.
    """
    out: list[str] = []
    code: list[str] | None = None  # lines of the fenced block being read
    lang = ""
    for line in markdown.split("\n"):
        fence = _FENCE.match(line)
        if code is not None:
            if fence is not None and not fence.group("lang"):
                out.extend(_code_block(lang, code))
                code = None
            else:
                code.append(line)
            continue
        if fence is not None:
            code, lang = [], fence.group("lang")
            continue
        out.append(_line(line))
    if code is not None:
        out.extend(_code_block(lang, code))
    return "\n".join(out)


def _code_block(lang: str, lines: list[str]) -> list[str]:
    body = "\n".join(lines)
    if not body.strip():
        return []  # Telegram refuses an empty entity
    return [f"```{lang}\n{_escape_code(body)}\n```"]


def _line(line: str) -> str:
    if (heading := _HEADING.match(line)) and heading.group("text"):
        return f"*{_inline(heading.group('text'), frozenset({'bold'}))}*"
    if quote := _QUOTE.match(line):
        return ">" + _inline(quote.group("text"))
    if bullet := _BULLET.match(line):
        return f"{bullet.group('indent')}• {_inline(bullet.group('text'))}"
    return _inline(line)


def _inline(text: str, inside: frozenset[str] = frozenset()) -> str:
    """Inline Markdown to MarkdownV2; ``inside`` names the entities around this
    text, which are not opened again (MarkdownV2 cannot nest an entity in itself)."""
    out: list[str] = []
    position = 0
    for match in _INLINE.finditer(text):
        out.append(escape_markdown_v2(text[position : match.start()]))
        out.append(_entity(match, inside))
        position = match.end()
    out.append(escape_markdown_v2(text[position:]))
    return "".join(out)


def _entity(match: re.Match[str], inside: frozenset[str]) -> str:
    groups = match.groupdict()
    if groups["escaped"] is not None:
        return escape_markdown_v2(groups["escaped"])
    if groups["code"] is not None:
        return f"`{_escape_code(groups['code'])}`"
    if groups["url"] is not None:
        if "link" in inside:
            return escape_markdown_v2(match.group(0))
        label = _inline(groups["label"], inside | {"link"})
        return f"[{label}]({_escape_url(groups['url'])})"
    for kind, marker, names in (
        ("bold", "*", ("bold", "bold_u")),
        ("strike", "~", ("strike",)),
        ("italic", "_", ("italic", "italic_u")),
    ):
        body = next((groups[name] for name in names if groups[name] is not None), None)
        if body is None:
            continue
        if kind in inside:
            return escape_markdown_v2(match.group(0))
        return f"{marker}{_inline(body, inside | {kind})}{marker}"
    raise AssertionError(f"unhandled inline match {match.group(0)!r}")


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
        room = _fitting(rest, limit - 4 if "```" in rest else limit)
        cut, skip = _best_cut(rest, room)
        head, rest = rest[:cut], rest[cut + skip :]
        fence = _open_fence(head)
        if fence is not None:
            head += "\n```"
            if len(fence) < limit // 8:  # shorter than any cut, so each piece makes progress
                rest = f"{fence}\n{rest}"
        pieces.append(head)
    pieces.append(rest)
    return pieces


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


def _open_fence(piece: str) -> str | None:
    """The opening fence line of a code block ``piece`` leaves open, if any."""
    opening: str | None = None
    for line in piece.split("\n"):
        fence = _FENCE.match(line)
        if fence is None:
            continue
        if opening is None:
            opening = line.strip()
        elif not fence.group("lang"):
            opening = None
    return opening
