"""An agent's ``ask_user`` as Telegram inline keyboards, one question at a time.

Options become buttons; a multi-select question toggles them and ends with
Done; "Other…" (and any text typed while a question is open) answers in the
person's own words. Callback data is ``<token>:<question>:<action>:<option>``,
well under Telegram's 64 bytes whatever the ask id.
"""

from __future__ import annotations

import enum

from chinwag.protocol import AskQuestion, AskUser
from telegram import InlineKeyboardButton, InlineKeyboardMarkup

_PICK, _TOGGLE, _DONE, _OTHER = "p", "t", "d", "o"


class Press(enum.Enum):
    """What a button press did."""

    STALE = "stale"  # a button of another prompt or an earlier question
    TOGGLED = "toggled"  # a multi-select option changed: show the keyboard again
    NOTHING_CHOSEN = "nothing_chosen"  # Done with no option ticked
    TYPE = "type"  # Other…: the next text typed is the answer
    ANSWERED = "answered"  # the question has its answer


class AskPrompt:
    """The state of one ``ask_user`` shown in one chat."""

    def __init__(self, ask: AskUser, token: str) -> None:
        self.ask_id = ask.ask_id
        self.token = token
        self.questions = ask.questions
        self.answers: list[str] = []
        self.ticked: set[int] = set()
        self.typing = False
        self.message_id: int | None = None

    @property
    def question(self) -> AskQuestion:
        return self.questions[len(self.answers)]

    @property
    def complete(self) -> bool:
        return len(self.answers) == len(self.questions)

    def text(self) -> str:
        """The open question, as Markdown."""
        question = self.question
        lines = [f"❓ **{question.header}**" if question.header else "❓"]
        lines.append(question.question)
        described = [option for option in question.options if option.description]
        if described:
            lines.append("")
            lines += [f"- **{option.label}**: {option.description}" for option in described]
        if self.typing or not question.options:
            lines += ["", "_Type your answer._"]
        return "\n".join(lines)

    def answered_text(self, answer: str) -> str:
        """The question just answered, with its answer, as Markdown."""
        question = self.questions[len(self.answers) - 1]
        return f"❓ {question.question}\n\n✅ {answer}"

    def keyboard(self) -> InlineKeyboardMarkup | None:
        question = self.question
        if not question.options:
            return None
        index = len(self.answers)
        rows: list[list[InlineKeyboardButton]] = []
        for number, option in enumerate(question.options):
            if question.multi_select:
                mark = "☑️ " if number in self.ticked else "▫️ "
                rows.append([self._button(mark + option.label, index, _TOGGLE, number)])
            else:
                rows.append([self._button(option.label, index, _PICK, number)])
        last = [self._button("Other…", index, _OTHER)]
        if question.multi_select:
            last.append(self._button("Done", index, _DONE))
        rows.append(last)
        return InlineKeyboardMarkup(rows)

    def _button(self, label: str, index: int, action: str, option: int = 0) -> InlineKeyboardButton:
        return InlineKeyboardButton(label, callback_data=f"{self.token}:{index}:{action}:{option}")

    def press(self, data: str) -> Press:
        """Apply the press of the button whose callback data is ``data``."""
        token, _, rest = data.partition(":")
        parts = rest.split(":")
        if token != self.token or len(parts) != 3 or self.complete:
            return Press.STALE
        index, action, option = parts
        question = self.question
        if index != str(len(self.answers)) or not (option.isdecimal() and option.isascii()):
            return Press.STALE
        number = int(option)
        if action == _PICK and number < len(question.options):
            self.answers.append(question.options[number].label)
            return Press.ANSWERED
        if action == _TOGGLE and number < len(question.options):
            self.ticked ^= {number}
            return Press.TOGGLED
        if action == _DONE:
            if not self.ticked:
                return Press.NOTHING_CHOSEN
            chosen = [question.options[n].label for n in sorted(self.ticked)]
            self.answers.append(", ".join(chosen))
            return Press.ANSWERED
        if action == _OTHER:
            self.typing = True
            return Press.TYPE
        return Press.STALE

    def type(self, text: str) -> None:
        """The person typed the answer to the open question."""
        self.answers.append(text)

    def next_question(self) -> None:
        """Reset what belonged to the question just answered."""
        self.ticked = set()
        self.typing = False
        self.message_id = None

    def reply(self) -> str:
        """Every answer, as the ``reply_to_ask`` content (as the CLI words it)."""
        if len(self.answers) == 1:
            return self.answers[0]
        return "\n".join(
            f"{question.question}: {answer}"
            for question, answer in zip(self.questions, self.answers, strict=True)
        )
