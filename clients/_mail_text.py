"""A message in a few words, as the CLI and the TUI show it: its text on one line (a
deleted one's left out), and what was done to it since it was written. The dashboard's
mail pages show the same (``mail_macros.html``): `(deleted)` in place of the text,
`(edited)`, each reaction's emoji and count, `pinned by NAME`."""

from __future__ import annotations

from chinwag.protocol import MailMessage


def one_line(text: str, width: int = 80) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def gist(message: MailMessage, width: int = 80) -> str:
    """Its text on one line; `(deleted)` for a deleted message, `(structured)` for one
    with a payload and no text."""
    if message.deleted:
        return "(deleted)"
    return one_line(message.content, width) if message.content.strip() else "(structured)"


def reaction_counts(message: MailMessage) -> str:
    """Each emoji reacted with, and by how many (`👍 2  🎉 1`); empty when none."""
    return "  ".join(f"{r.emoji} {len(r.by)}" for r in message.reactions)


def since_written(message: MailMessage) -> str:
    """`(edited)` (of a message not deleted), its reactions, `pinned by NAME`: what was
    done to it since it was written; empty when nothing was."""
    marks = []
    if message.version > 1 and not message.deleted:
        marks.append("(edited)")
    if message.reactions:
        marks.append(reaction_counts(message))
    if message.pinned:
        marks.append(f"pinned by {message.pinned_by}" if message.pinned_by else "pinned")
    return "  ".join(marks)
