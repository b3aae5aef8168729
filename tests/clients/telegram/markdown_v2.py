"""Telegram's MarkdownV2 parser, as the Bot API applies it, for tests.

A port of tdlib's ``parse_markdown_v2`` (td/telegram/MessageEntity.cpp): the
text a message shows and its entities, or the error Telegram answers for text
it refuses. Like Telegram, it reads ``__`` greedily as underline, so an italic
closed right before another opens (``_a__b_``) is refused; Telegram skips an
empty entity. One rule is stricter than Telegram's: an entity opened in a
blockquote must close in it. Custom emoji (``![..](tg://emoji..)``) and
expandable blockquotes (``**>``) are refused, as the bridge never writes them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Reserved outside code and pre: each must be escaped with `\`.
_RESERVED = "_*[]()~`>#+-=|{}.!"

# The closing marker of each entity written with one.
_CLOSING = {
    "bold": "*",
    "italic": "_",
    "underline": "__",
    "strikethrough": "~",
    "spoiler": "||",
    "code": "`",
    "pre": "```",
    "text_link": "]",
}


class MarkdownV2Error(ValueError):
    """Text Telegram refuses, with its error message."""


@dataclass(frozen=True)
class Entity:
    """A span of a message's text shown as ``type``."""

    type: str  # one of _CLOSING's keys, or "blockquote"
    offset: int  # in characters of Message.text (Telegram counts UTF-16 units)
    length: int
    argument: str = ""  # a pre block's language, a text link's URL


@dataclass(frozen=True)
class Message:
    """What a MarkdownV2 text shows."""

    text: str
    entities: tuple[Entity, ...]

    def spans(self, *types: str) -> list[str]:
        """The text of each entity of one of ``types``, in order."""
        return [self.text[e.offset : e.offset + e.length] for e in self.entities if e.type in types]


@dataclass
class _Open:
    type: str
    start: int  # where its text starts in the output
    source: int  # where its marker is in the input, for the error
    argument: str = ""


def parse_markdown_v2(text: str) -> Message:
    """The message Telegram shows for ``text`` sent with parse_mode MarkdownV2.

    Raises MarkdownV2Error with Telegram's message where it refuses ``text``.
    """
    out: list[str] = []
    entities: list[Entity] = []
    nested: list[_Open] = []
    quote: tuple[int, int] | None = None  # (start in the output, entities open before it)

    def at(index: int) -> str:
        return text[index] if index < len(text) else ""

    def close(entity: _Open, argument: str = "") -> None:
        if len(out) > entity.start:  # Telegram skips an empty entity
            entities.append(Entity(entity.type, entity.start, len(out) - entity.start, argument))

    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and 0 < ord(at(i + 1) or "\0") <= 126:
            out.append(text[i + 1])
            i += 2
            continue
        in_code = bool(nested) and nested[-1].type in ("code", "pre")
        if char not in ("`" if in_code else _RESERVED):
            out.append(char)
            if char == "\n" and quote is not None and at(i + 1) != ">":
                start, depth = quote
                if len(nested) > depth:
                    raise MarkdownV2Error(_unclosed(nested[-1]))
                out.pop()
                close(_Open("blockquote", start, 0))
                out.append("\n")
                quote = None
            i += 1
            continue
        top = nested[-1].type if nested else ""
        if top and text.startswith(_CLOSING[top], i) and not (top == "italic" and at(i + 1) == "_"):
            entity = nested.pop()
            if quote is not None and len(nested) < quote[1]:
                raise MarkdownV2Error(f"{top} opened before a blockquote closes inside it")
            i += len(_CLOSING[top])
            if top != "text_link":
                close(entity, entity.argument)
                continue
            url = "".join(out[entity.start :])
            if at(i) == "(":
                url, i = _url(text, i + 1)
            close(entity, url)
            continue
        opened = _open(text, i, char, len(out))
        if opened is None:  # a blockquote's `>`
            if quote is None:
                quote = (len(out), len(nested))
            i += 1
            continue
        entity, i = opened
        nested.append(entity)
    if nested:
        raise MarkdownV2Error(_unclosed(nested[-1]))
    if quote is not None:
        close(_Open("blockquote", quote[0], 0))
    return Message("".join(out), tuple(sorted(entities, key=lambda e: (e.offset, -e.length))))


def _open(text: str, i: int, char: str, start: int) -> tuple[_Open, int] | None:
    """The entity whose marker starts at ``i`` and where its text starts;
    None for a blockquote's `>`."""
    double = text[i + 1 : i + 2] == char
    if char == "_":  # `__` is read greedily, as Telegram does
        return _Open("underline" if double else "italic", start, i), i + (2 if double else 1)
    if char == "|" and double:
        return _Open("spoiler", start, i), i + 2
    if char in "*~[":
        kind = {"*": "bold", "~": "strikethrough", "[": "text_link"}[char]
        return _Open(kind, start, i), i + 1
    if char == ">" and (i == 0 or text[i - 1] == "\n"):
        return None
    if char != "`":
        raise MarkdownV2Error(
            f"Bad Request: can't parse entities: Character '{char}' is reserved "
            "and must be escaped with the preceding '\\'"
        )
    if not text.startswith("```", i):
        return _Open("code", start, i), i + 1
    j = i + 3
    language_end = j
    while language_end < len(text) and not text[language_end].isspace():
        if text[language_end] == "`":
            break
        language_end += 1
    language = ""
    if language_end != j and language_end < len(text) and text[language_end] != "`":
        language, j = text[j:language_end], language_end
    if text.startswith(("\r\n", "\n\r"), j):
        j += 2
    elif text.startswith(("\n", "\r"), j):
        j += 1
    return _Open("pre", start, i, language), j


def _url(text: str, i: int) -> tuple[str, int]:
    """A link's URL from ``i`` (after its `(`) and the index after its `)`."""
    url: list[str] = []
    begin = i
    while i < len(text) and text[i] != ")":
        if text[i] == "\\" and 0 < ord(text[i + 1 : i + 2] or "\0") <= 126:
            url.append(text[i + 1])
            i += 2
            continue
        url.append(text[i])
        i += 1
    if i == len(text):
        raise MarkdownV2Error(
            f"Bad Request: can't parse entities: Can't find end of a URL at byte offset {begin}"
        )
    return "".join(url), i + 1


def _unclosed(entity: _Open) -> str:
    name = entity.type.replace("_", "").title().replace("Textlink", "TextUrl")
    return (
        f"Bad Request: can't parse entities: Can't find end of {name} entity "
        f"at byte offset {entity.source}"
    )
