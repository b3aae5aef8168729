"""Message text as the dashboard shows it: CommonMark, turned into HTML of its own making.

Agents answer in Markdown, and people write it; neither may write the page. So raw
HTML in a message is text (``html`` off: a ``<script>`` shows as written), a link
gets ``rel="noopener noreferrer"`` (the page it opens gets neither this window nor
the dashboard's address), and markdown-it's own check refuses ``javascript:``,
``vbscript:``, ``file:`` and ``data:`` links. Images are not rendered (the text
``![alt](url)`` shows as ``!`` and a link): a browser fetches an image the moment it is
shown, which would tell its host, and whatever its address carries (an agent can be
talked into writing one), that someone read the message, without anyone clicking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import OptionsDict
from markupsafe import Markup


def _link_open(
    renderer: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: Any
) -> str:
    tokens[idx].attrSet("rel", "noopener noreferrer")
    return renderer.renderToken(tokens, idx, options, env)


_PARSER = MarkdownIt("commonmark", {"html": False}).disable("image")
_PARSER.add_render_rule("link_open", _link_open)


def markdown(text: str) -> Markup:
    """``text`` (CommonMark) as HTML, safe to put in a page as it is."""
    return Markup(_PARSER.render(text))
