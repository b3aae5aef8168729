"""The bridge's pure parts, without I/O: MarkdownV2 conversion, splitting, commands, asks."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from chinwag.clients.telegram._ask import AskPrompt, Press
from chinwag.clients.telegram._bridge import parse_command
from chinwag.clients.telegram._chat import sender_for
from chinwag.clients.telegram._formatting import (
    MESSAGE_LIMIT,
    escape_markdown_v2,
    split_message,
    telegram_length,
    to_markdown_v2,
)
from chinwag.protocol import AskOption, AskQuestion, AskUser
from hypothesis import given
from hypothesis import strategies as st
from markdown_v2 import parse_markdown_v2

# --- MarkdownV2 -------------------------------------------------------------------------


def test_escape_covers_every_reserved_character() -> None:
    reserved = "_*[]()~`>#+-=|{}.!\\"
    assert escape_markdown_v2(reserved) == "".join("\\" + c for c in reserved)
    assert escape_markdown_v2("plain words 42") == "plain words 42"


def shown(converted: str) -> str:
    """The text Telegram shows for MarkdownV2 ``converted``; fails where Telegram would
    refuse it."""
    return parse_markdown_v2(converted).text


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("Hello, world! 1 + 1 = 2.", "Hello, world\\! 1 \\+ 1 \\= 2\\."),
        ("**bold** and __bold__", "*bold* and *bold*"),
        ("*italic* and _italic_", "_italic_ and _italic_"),
        ("*one*_run_", "_onerun_"),  # `_one__run_` would open an underline
        ("~~gone~~", "~gone~"),
        ("`a.b` and ``x`y``", "`a.b` and `x\\`y`"),
        ("[the docs](https://example.com/a_b)", "[the docs](https://example.com/a_b)"),
        ("# Title.", "*Title\\.*"),
        ("- one\n  * two", "• one\n  • two"),
        ("1. first", "1\\. first"),
        ("> quoted (x)", ">quoted \\(x\\)"),
        ("snake_case_name, 2 * 3 * 4", "snake\\_case\\_name, 2 \\* 3 \\* 4"),
        ("\\*not italic\\*", "\\*not italic\\*"),
        ("**a _b_ c**", "*a _b_ c*"),
        ("**a **b** c**", "*a b c*"),  # bold is not opened again inside bold
        ("use `x.y`, then **`z`**", "use `x.y`, then *z*"),  # bold cannot hold code
        ("[`a.b`](https://example.com)", "[a\\.b](https://example.com)"),
        ("[docs](/relative)", "docs \\(/relative\\)"),  # Telegram links only absolute URLs
        ("```   \ncode", "```\ncode\n```"),  # an info string of spaces names no language
    ],
)
def test_markdown_becomes_markdown_v2(markdown: str, expected: str) -> None:
    assert to_markdown_v2(markdown) == expected
    parse_markdown_v2(expected)


def test_fenced_code_escapes_only_backticks_and_backslashes() -> None:
    markdown = "Run:\n```python\nprint('a.b', `x`, '\\\\')\n```\nDone."
    converted = to_markdown_v2(markdown)
    assert converted == "Run:\n```python\nprint('a.b', \\`x\\`, '\\\\\\\\')\n```\nDone\\."
    message = parse_markdown_v2(converted)
    assert message.spans("pre") == ["print('a.b', `x`, '\\\\')\n"]
    assert message.text == "Run:\nprint('a.b', `x`, '\\\\')\n\nDone."


# A line that opens and closes its backticks is a code span, not a fence: a
# fence's info string holds no backtick. Read as a fence, it swallowed the text.


def test_a_line_of_inline_code_is_inline_code() -> None:
    message = parse_markdown_v2(to_markdown_v2("```sh npm install```"))
    assert (message.text, message.spans("code", "pre")) == ("sh npm install", ["sh npm install"])


def test_a_reply_whose_one_line_is_inline_code_shows_it() -> None:
    message = parse_markdown_v2(to_markdown_v2("```ls```"))
    assert (message.text, message.spans("code")) == ("ls", ["ls"])


def test_a_guest_answer_of_inline_code_keeps_its_text_under_the_guests_name() -> None:
    # As the bridge shows a `/guest critic` answer: the guest's name in bold on
    # a line of its own above the answer (_turn.py), split into messages, each
    # converted (_reply.py, _outbox.py).
    answer = "```sh npm install```"
    [piece] = split_message(f"**critic:**\n{answer}")
    message = parse_markdown_v2(to_markdown_v2(piece))
    assert message.text == "critic:\nsh npm install"
    assert (message.spans("bold"), message.spans("code")) == (["critic:"], ["sh npm install"])


def test_inline_code_between_lines_of_text_loses_none_of_them() -> None:
    message = parse_markdown_v2(to_markdown_v2("Try:\n```sh npm install```\nthen run it."))
    assert message.text == "Try:\nsh npm install\nthen run it."
    assert message.spans("code") == ["sh npm install"]


def test_a_fence_left_open_mid_stream_is_closed() -> None:
    converted = to_markdown_v2("Here:\n```sh\nls -la")
    assert converted == "Here:\n```sh\nls -la\n```"
    assert parse_markdown_v2(converted).spans("pre") == ["ls -la\n"]


def _commonmark_examples() -> list[tuple[int, str, str, str]]:
    """(number, section, Markdown, HTML) of each example in commonmark_examples.txt,
    read as the spec's own test runner reads spec.txt (`→` is a tab)."""
    examples: list[tuple[int, str, str, str]] = []
    section, example = "", None
    fence = "`" * 32
    text = (Path(__file__).parent / "commonmark_examples.txt").read_text(encoding="utf-8")
    for line in text.splitlines():
        if example is None:
            if line.startswith("## "):
                section = line[3:]
            elif line == f"{fence} example":
                example = []
        elif line == fence:
            split = example.index(".")
            markdown, meaning = example[:split], example[split + 1 :]
            examples.append(
                (
                    len(examples) + 1,
                    section,
                    "".join(f"{row}\n" for row in markdown).replace("→", "\t"),
                    "".join(f"{row}\n" for row in meaning).replace("→", "\t"),
                )
            )
            example = None
        else:
            example.append(line)
    return examples


COMMONMARK = _commonmark_examples()


class _ShownHTML(HTMLParser):
    """The text a spec example's HTML shows, and its code spans and blocks that
    Telegram can show as code (those in no link, emphasis or heading)."""

    # Inside these, MarkdownV2 holds no code entity.
    _NO_CODE = frozenset({"a", "em", "strong", "del", "h1", "h2", "h3", "h4", "h5", "h6"})

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.code: list[str] = []
        self._open: list[str] = []
        self._code: list[str] | None = None
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "code" and not self._NO_CODE.intersection(self._open):
            self._code = []
        self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._open:
            del self._open[len(self._open) - 1 - self._open[::-1].index(tag) :]
        if tag == "code" and self._code is not None:
            self.code.append("".join(self._code))
            self._code = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._code is not None:
            self._code.append(data)


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("number", "section", "markdown", "meaning"),
    COMMONMARK,
    ids=[f"example {number} ({section})" for number, section, _, _ in COMMONMARK],
)
def test_commonmark_examples_parse_in_telegram_and_lose_no_text(
    number: int, section: str, markdown: str, meaning: str
) -> None:
    converted = to_markdown_v2(markdown)
    message = parse_markdown_v2(converted)
    html = _ShownHTML(meaning)
    # Every character the HTML shows is shown, in order, whitespace aside. (The
    # raw HTML an example passes through is markup to the HTML, and text here.)
    shown = iter("".join(message.text.split()))
    missing = [char for char in "".join("".join(html.text).split()) if char not in shown]
    assert not missing, (converted, message.text)
    # Each code span or block is shown as code, whole (raw HTML's own <code>
    # tags pass through as text).
    code = [_words(span) for span in message.spans("code", "pre")]
    for span in html.code if "<code" not in markdown else []:
        if span.strip():
            assert _words(span) in code, (span, converted)


def test_the_examples_are_the_whole_spec() -> None:
    assert len(COMMONMARK) == 652  # CommonMark 0.31.2 numbers its examples 1 to 652
    assert {section for _, section, _, _ in COMMONMARK} >= {
        "Tabs",
        "Fenced code blocks",
        "Code spans",
        "Emphasis and strong emphasis",
        "Links",
        "Block quotes",
        "List items",
    }


# Markdown's markers, and pieces that make blocks, links and fences.
_PIECES = [*"ab _*~`[]()#>-.!\\\n|{}+=<:/\t", "```", "~~~", "    ", "- ", "1. ", "> ", "http://x"]


@given(st.lists(st.sampled_from(_PIECES), max_size=40).map("".join))
def test_any_markdown_converts_to_text_telegram_parses(markdown: str) -> None:
    parse_markdown_v2(to_markdown_v2(markdown))


@given(st.text(max_size=80))
def test_escaped_text_shows_exactly_what_was_escaped(text: str) -> None:
    assert parse_markdown_v2(escape_markdown_v2(text)).text == text


# --- splitting --------------------------------------------------------------------------


def test_a_short_reply_is_one_message() -> None:
    assert split_message("hello") == ["hello"]
    assert split_message("x" * MESSAGE_LIMIT) == ["x" * MESSAGE_LIMIT]


def test_long_replies_split_at_paragraphs() -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 20 for i in range(12)]
    pieces = split_message("\n\n".join(p.strip() for p in paragraphs), 300)
    assert len(pieces) > 1
    assert all(telegram_length(piece) <= 300 for piece in pieces)
    for piece in pieces:
        assert piece.startswith("Paragraph ")  # every cut fell between paragraphs
        assert piece.endswith("word")
    assert "\n\n".join(pieces) == "\n\n".join(p.strip() for p in paragraphs)


def test_without_paragraphs_a_reply_splits_at_lines_then_spaces() -> None:
    lines = "\n".join(f"line {i:03}" for i in range(100))
    pieces = split_message(lines, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert "\n".join(pieces) == lines
    words = " ".join(f"w{i:03}" for i in range(100))
    pieces = split_message(words, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert " ".join(pieces) == words
    assert split_message("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]


def test_a_code_block_cut_in_two_is_closed_and_reopened() -> None:
    code = "\n".join(f"value_{i} = {i}" for i in range(60))
    pieces = split_message(f"Intro.\n```python\n{code}\n```\nEnd.", 200)
    assert len(pieces) > 2
    assert all(len(p) <= 200 for p in pieces)
    assert pieces[0].startswith("Intro.\n```python\n") and pieces[0].endswith("\n```")
    assert all(p.startswith("```python\n") for p in pieces[1:])
    shown = [span for p in pieces for span in parse_markdown_v2(to_markdown_v2(p)).spans("pre")]
    assert "".join(shown) == code + "\n"  # every line, shown as code


def test_a_line_of_inline_code_is_not_taken_for_a_fence_when_cut() -> None:
    words = [f"w{i:03}" for i in range(60)]
    pieces = split_message("```sh npm install```\n" + " ".join(words), 100)
    assert len(pieces) > 1
    # No fence was closed at the cut, nor opened again after it.
    assert pieces[0].startswith("```sh npm install```\n") and not pieces[0].endswith("```")
    assert not any(piece.startswith("```") for piece in pieces[1:])
    assert " ".join(" ".join(pieces).split()[3:]) == " ".join(words)
    assert parse_markdown_v2(to_markdown_v2(pieces[0])).spans("code") == ["sh npm install"]


def test_a_tilde_fence_cut_in_two_is_closed_and_reopened_with_its_own_marker() -> None:
    code = "\n".join(f"value_{i} = {i}" for i in range(30))
    pieces = split_message(f"~~~~python\n{code}\n~~~~", 150)
    assert len(pieces) > 1
    assert all(telegram_length(p) <= 150 for p in pieces)
    assert pieces[0].endswith("\n~~~~") and all(p.startswith("~~~~python\n") for p in pieces[1:])
    shown = [span for p in pieces for span in parse_markdown_v2(to_markdown_v2(p)).spans("pre")]
    assert "".join(shown) == code + "\n"


def test_length_is_counted_as_telegram_does() -> None:
    pieces = split_message("😀" * 300, 100)  # each emoji is two UTF-16 units
    assert [telegram_length(p) for p in pieces] == [100] * 6


@given(st.text(alphabet=st.sampled_from(list("ab \n`")), max_size=400))
def test_splitting_keeps_every_piece_within_the_limit(text: str) -> None:
    pieces = split_message(text, 40)
    assert all(telegram_length(piece) <= 40 for piece in pieces)


# --- commands, senders, asks ------------------------------------------------------------


def test_commands_are_parsed_with_or_without_the_bot_name() -> None:
    assert parse_command("/kill", "my_bot") == ("kill", "", True)
    assert parse_command("/Kill@My_Bot all", "my_bot") == ("kill", "all", True)
    assert parse_command("/guest helper hi there", "my_bot") == ("guest", "helper hi there", True)
    assert parse_command("/kill@other_bot", "my_bot") == ("kill", "", False)
    assert parse_command("/compact\nkeep names", "my_bot") == ("compact", "keep names", True)
    assert parse_command("hello /kill", "my_bot") is None


def test_senders_name_the_chat_and_the_topic() -> None:
    assert sender_for(42, None) == "tg:42"
    assert sender_for(-100123, 7) == "tg:-100123:7"


def _ask(*questions: AskQuestion) -> AskUser:
    return AskUser(ask_id="ask1", questions=list(questions))


def test_a_single_choice_is_one_press() -> None:
    prompt = AskPrompt(
        _ask(
            AskQuestion(
                question="Colour?", options=[AskOption(label="red"), AskOption(label="blue")]
            )
        ),
        "tok",
    )
    keyboard = prompt.keyboard()
    assert keyboard is not None
    labels = [button.text for row in keyboard.inline_keyboard for button in row]
    assert labels == ["red", "blue", "Other…"]
    data = keyboard.inline_keyboard[1][0].callback_data
    assert isinstance(data, str) and len(data.encode()) <= 64
    assert prompt.press("other:0:p:1") is Press.STALE
    assert prompt.press(data) is Press.ANSWERED
    assert prompt.complete and prompt.reply() == "blue"
    assert prompt.press(data) is Press.STALE


def test_multi_select_toggles_then_done() -> None:
    question = AskQuestion(
        question="Toppings?",
        options=[AskOption(label=name) for name in ("ham", "egg", "cheese")],
        multi_select=True,
    )
    prompt = AskPrompt(_ask(question), "tok")
    assert prompt.press("tok:0:d:0") is Press.NOTHING_CHOSEN
    assert prompt.press("tok:0:t:2") is Press.TOGGLED
    assert prompt.press("tok:0:t:0") is Press.TOGGLED
    keyboard = prompt.keyboard()
    assert keyboard is not None
    assert [b.text for row in keyboard.inline_keyboard for b in row] == [
        "☑️ ham",
        "▫️ egg",
        "☑️ cheese",
        "Other…",
        "Done",
    ]
    assert prompt.press("tok:0:d:0") is Press.ANSWERED
    assert prompt.reply() == "ham, cheese"


def test_other_then_typed_text_answers_and_several_questions_combine() -> None:
    prompt = AskPrompt(
        _ask(
            AskQuestion(question="Colour?", options=[AskOption(label="red")]),
            AskQuestion(question="Name?"),
        ),
        "tok",
    )
    assert prompt.press("tok:0:o:0") is Press.TYPE
    assert "Type your answer" in prompt.text()
    prompt.type("teal")
    prompt.next_question()
    assert prompt.keyboard() is None  # a question without options is answered by typing
    prompt.type("Ada")
    assert prompt.complete
    assert prompt.reply() == "Colour?: teal\nName?: Ada"
