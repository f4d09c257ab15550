"""The one-line notices the panels show under their buttons."""

from __future__ import annotations

import html


def notice(text: str, error: bool = False) -> str:
    """`text` as the tab's notice HTML (escaped; red when `error`); "" for no text."""
    if not text:
        return ""
    css_class = "lora-trainer-notice lora-trainer-error" if error else "lora-trainer-notice"
    return f'<div class="{css_class}">{html.escape(text)}</div>'
