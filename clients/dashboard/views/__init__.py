"""The dashboard's views, one module each; a new view is a module and a line below.

Each module holds ``view = View(...)``: its routes (pages and actions) and its place in
the navigation bar; its templates are in ``templates/``, named after it.
"""

from __future__ import annotations

from .._view import View
from . import agents, conversation, conversations, feed, stats

#: In the navigation bar's order.
VIEWS: tuple[View, ...] = (
    conversations.view,
    agents.view,
    feed.view,
    stats.view,
    conversation.view,
)

__all__ = ["VIEWS"]
