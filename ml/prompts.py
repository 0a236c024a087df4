"""Prompts: a dataset's template filled with one example, ending where the label word should come next."""

from __future__ import annotations


def render(template: str, text: str, text_pair: str | None = None) -> str:
    # format_map on the template only: braces inside the text are data, never placeholders.
    return template.format_map({"text": text, "text_pair": text_pair or ""})
