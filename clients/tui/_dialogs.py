"""The TUI's modal screens: an agent's question, compaction's instructions, a mail thread.

What the model or a person wrote (a question's options, a sender) is ``Content``, or a
``Static`` without markup: shown as written, never parsed as Textual's markup."""

from __future__ import annotations

from chinwag.protocol import AskQuestion, AskUser, MailItem, MailMessage
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown, SelectionList, Static

from .._mail_text import since_written
from .._terminal_input import joined_answers


class AskDialog(ModalScreen[str | None]):
    """An ``ask_user``: each question with its options as buttons (a list to tick when it
    takes several), and a line of free text; dismissed with the answer to send back.

    One question with options is answered by pressing one; otherwise `Send` (or Enter
    in a text line) sends once every question has an answer. Escape closes the dialog
    unanswered: the run keeps waiting (kill it, or answer elsewhere).
    """

    BINDINGS = [Binding("escape", "dismiss_unanswered", "Close")]

    def __init__(self, agent: str, ask: AskUser) -> None:
        super().__init__(classes="dialog")
        self.agent = agent
        self.ask = ask
        self.answers: dict[int, str] = {}  # question index -> its answer
        self._withdrawn = False

    def withdraw(self) -> None:
        """Close unanswered: the question was answered elsewhere, or its run ended.

        A dialog under another screen closes once it is on top again (``dismiss``
        pops whatever screen is on top).
        """
        if self.is_current:
            self.dismiss(None)
        else:
            self._withdrawn = True

    def on_screen_resume(self) -> None:
        if self._withdrawn:
            self.dismiss(None)

    @property
    def _one_choice(self) -> bool:
        """One question, with options, taking one of them: a button press answers it."""
        questions = self.ask.questions
        return len(questions) == 1 and bool(questions[0].options) and not questions[0].multi_select

    def compose(self) -> ComposeResult:
        with Vertical(id="ask"):
            yield Label(f"{self.agent} asks", classes="dialog-title")
            for index, question in enumerate(self.ask.questions):
                yield from self._question(index, question)
            if not self._one_choice:
                yield Button("Send", id="send", variant="primary", disabled=True)

    def _question(self, index: int, question: AskQuestion) -> ComposeResult:
        heading = question.question
        if question.header:
            heading = f"{question.header}: {heading}"
        yield Static(heading, classes="question", markup=False)
        if question.options and question.multi_select:
            yield SelectionList[str](
                *((Content(option.label), option.label) for option in question.options),
                id=f"choices-{index}",
            )
        elif question.options:
            with Horizontal(classes="options"):
                for number, option in enumerate(question.options):
                    button = Button(
                        Content(option.label),
                        id=f"option-{index}-{number}",
                        classes=f"option-{index}",
                    )
                    if option.description:
                        button.tooltip = Content(option.description)
                    yield button
        placeholder = "or type another answer" if question.options else "type the answer"
        yield Input(placeholder=placeholder, id=f"text-{index}")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        button_id = event.button.id or ""
        if button_id == "send":
            self._send()
            return
        _, index, number = button_id.split("-")
        question = self.ask.questions[int(index)]
        self._answer(int(index), question.options[int(number)].label)
        if self._one_choice:
            self._send()
            return
        for button in self.query(f"#ask Button.option-{index}").results(Button):
            button.variant = "default"
        event.button.variant = "success"

    def on_selection_list_selected_changed(self, event: SelectionList.SelectedChanged[str]) -> None:
        index = int((event.selection_list.id or "").rpartition("-")[2])
        self._answer(index, ", ".join(event.selection_list.selected))

    def on_input_changed(self, event: Input.Changed) -> None:
        index = int((event.input.id or "").rpartition("-")[2])
        self._answer(index, event.value.strip())

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._send()

    def _answer(self, index: int, answer: str) -> None:
        if answer:
            self.answers[index] = answer
        else:
            self.answers.pop(index, None)
        if not self._one_choice:
            self.query_one("#send", Button).disabled = not self._complete

    @property
    def _complete(self) -> bool:
        return len(self.answers) == len(self.ask.questions)

    def _send(self) -> None:
        if not self._complete:
            self.notify("every question wants an answer", severity="warning")
            return
        pairs = [(q.question, self.answers[i]) for i, q in enumerate(self.ask.questions)]
        self.dismiss(joined_answers(pairs))

    def action_dismiss_unanswered(self) -> None:
        self.dismiss(None)


class CompactDialog(ModalScreen[str | None]):
    """Compaction's optional instructions: dismissed with them ("" for none), None to
    leave the conversation as it is."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, agent: str, sender: str) -> None:
        super().__init__(classes="dialog")
        self.agent = agent
        self.sender = sender

    def compose(self) -> ComposeResult:
        with Vertical(id="compact"):
            yield Label(Content(f"Compact {self.agent}/{self.sender}"), classes="dialog-title")
            yield Static(
                "The history so far is summarized into an archive. Enter compacts; "
                "Escape leaves it as it is.",
                classes="hint",
            )
            yield Input(placeholder="instructions for the summary (optional)", id="instructions")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)


class MailEntry(Vertical):
    """One message of a thread, as it is now: who to whom and when, its text (not a
    deleted one's), and what was done to it since it was written."""

    def __init__(self, message: MailMessage) -> None:
        super().__init__(classes="mail")
        self.message = message
        self.set_class(message.deleted, "deleted")

    def compose(self) -> ComposeResult:
        message = self.message
        yield Static(_heading(message), classes="mail-from", markup=False)
        yield Markdown(_body(message), classes="mail-body")
        marks = since_written(message)
        if marks:
            yield Static(marks, classes="mail-marks", markup=False)

    def show(self, message: MailMessage) -> None:
        """Show ``message`` (this one, changed) as it is now: composed again, which
        holds also before the first compose has run."""
        self.message = message
        self.set_class(message.deleted, "deleted")
        self.refresh(recompose=True)


def _heading(message: MailMessage) -> str:
    to = ", ".join(message.to or message.recipients)
    return f"{message.sender} → {to}  {message.created_at.astimezone():%Y-%m-%d %H:%M}"


def _body(message: MailMessage) -> str:
    return "(deleted)" if message.deleted else message.content


class ThreadScreen(ModalScreen[None]):
    """A mail thread, oldest first, as ``reader`` sees it, its messages kept as they are
    now (``changed``)."""

    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, reader: str, items: list[MailItem]) -> None:
        super().__init__(classes="dialog")
        self.reader = reader
        self.items = items

    def compose(self) -> ComposeResult:
        with Vertical(id="thread"):
            yield Label(f"Thread · as {self.reader}", classes="dialog-title")
            with VerticalScroll():
                for item in self.items:
                    yield MailEntry(item.message)
            yield Static("Escape closes", classes="hint")

    def changed(self, message: MailMessage) -> None:
        """A message is now ``message``: shown so, if it is one of this thread's."""
        for entry in self.query(MailEntry):
            if entry.message.msg_id == message.msg_id:
                entry.show(message)

    def action_close(self) -> None:
        self.dismiss(None)
