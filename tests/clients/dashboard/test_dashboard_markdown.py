"""Message text rendered as CommonMark, and never as the page's own markup."""

from __future__ import annotations

from chinwag.clients.dashboard._markdown import markdown
from markupsafe import Markup


def test_bold_code_and_a_link() -> None:
    shown = markdown("Plant **tomatoes** [in May](https://example.org/may).\n\n```\nrow < 3\n```")
    assert isinstance(shown, Markup)
    assert shown == (
        "<p>Plant <strong>tomatoes</strong> "
        '<a href="https://example.org/may" rel="noopener noreferrer">in May</a>.</p>\n'
        "<pre><code>row &lt; 3\n</code></pre>\n"
    )


def test_raw_html_shows_as_text() -> None:
    shown = markdown('<script>alert(1)</script>\n\nsee <img src=x onerror=alert(1)> <b a="1">')
    assert "<script" not in shown and "<img" not in shown and "<b " not in shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    assert "&lt;img src=x onerror=alert(1)&gt;" in shown


def test_no_script_link_and_no_image_fetched_on_sight() -> None:
    assert markdown("[go](javascript:alert(1))") == "<p>[go](javascript:alert(1))</p>\n"
    assert markdown("<javascript:alert(1)>") == "<p>&lt;javascript:alert(1)&gt;</p>\n"
    # An image is a link to it, fetched only if followed.
    assert markdown("![a cat](https://example.org/cat.png)") == (
        '<p>!<a href="https://example.org/cat.png" rel="noopener noreferrer">a cat</a></p>\n'
    )
