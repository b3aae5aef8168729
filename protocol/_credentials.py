"""A URL's credentials hidden wherever it is shown: the daemon's logs and errors,
`chinwag doctor`, the Telegram bridge's messages."""

from __future__ import annotations

import re

# What follows a scheme's `//` up to the authority's last `@`: the user and password.
_URL_CREDENTIALS = re.compile(r"(?<=//)[^/?#\s]*@")


def without_credentials(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    return _URL_CREDENTIALS.sub("***@", text) if "@" in text else text
