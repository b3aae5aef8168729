"""The bridge's pure parts, without I/O: MarkdownV2 conversion, splitting, commands, asks."""

from __future__ import annotations

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
from fake_bot_api import markdown_v2_problem, render
from hypothesis import given
from hypothesis import strategies as st

# --- MarkdownV2 -------------------------------------------------------------------------


def test_escape_covers_every_reserved_character() -> None:
    reserved = "_*[]()~`>#+-=|{}.!\\"
    assert escape_markdown_v2(reserved) == "".join("\\" + c for c in reserved)
    assert escape_markdown_v2("plain words 42") == "plain words 42"


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("Hello, world! 1 + 1 = 2.", "Hello, world\\! 1 \\+ 1 \\= 2\\."),
        ("**bold** and __bold__", "*bold* and *bold*"),
        ("*italic* and _italic_", "_italic_ and _italic_"),
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
        ("**a **b** c**", "*a \\*\\*b* c\\*\\*"),  # bold is not opened inside bold
    ],
)
def test_markdown_becomes_markdown_v2(markdown: str, expected: str) -> None:
    assert to_markdown_v2(markdown) == expected
    assert markdown_v2_problem(expected) is None


def test_fenced_code_escapes_only_backticks_and_backslashes() -> None:
    markdown = "Run:\n```python\nprint('a.b', `x`, '\\\\')\n```\nDone."
    converted = to_markdown_v2(markdown)
    assert converted == "Run:\n```python\nprint('a.b', \\`x\\`, '\\\\\\\\')\n```\nDone\\."
    assert render(converted) == "Run:\nprint('a.b', `x`, '\\\\')\nDone."


def test_a_fence_left_open_mid_stream_is_closed() -> None:
    converted = to_markdown_v2("Here:\n```sh\nls -la")
    assert converted == "Here:\n```sh\nls -la\n```"
    assert markdown_v2_problem(converted) is None


@given(st.text(alphabet=st.sampled_from(list("ab _*~`[]()#>-.!\\\n|{}+=")), max_size=60))
def test_any_markdown_converts_to_text_telegram_parses(markdown: str) -> None:
    converted = to_markdown_v2(markdown)
    assert markdown_v2_problem(converted) is None, converted


@given(st.text(max_size=80))
def test_escaped_text_shows_exactly_what_was_escaped(text: str) -> None:
    escaped = escape_markdown_v2(text)
    assert markdown_v2_problem(escaped) is None
    assert render(escaped) == text


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
    for piece in pieces:
        assert markdown_v2_problem(to_markdown_v2(piece)) is None
    shown = "\n".join(render(to_markdown_v2(p)) for p in pieces)
    assert all(f"value_{i} = {i}" in shown for i in range(60))


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
