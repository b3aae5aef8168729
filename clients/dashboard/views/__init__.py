"""The dashboard's views, one module each; a new view is a module and a line below.

Each module holds ``view = View(...)``: its routes (pages and actions) and its place in
the navigation bar; its templates are in ``templates/``, named after it.
"""

from __future__ import annotations

from .._view import View
from . import (
    agents,
    conversation,
    conversations,
    feed,
    inbox,
    locks,
    participants,
    spaces,
    stats,
    thread,
)

#: In the navigation bar's order.
VIEWS: tuple[View, ...] = (
    conversations.view,
    agents.view,
    feed.view,
    stats.view,
    participants.view,
    inbox.view,
    spaces.view,
    locks.view,
    conversation.view,
    thread.view,
)

__all__ = ["VIEWS"]
