"""How much of a caller's value an error message quotes: the engine's sampling checks and the
server's request parsing (optimized/serve/api.py) quote by the same rule. Here, and not in the
server, because the engine cannot import the server (the server imports the engine)."""

from __future__ import annotations

import json

# An integer of 4000 digits, or a megabyte string, quoted in full buried the message (and made it
# as big as the body). Names get more room than numbers: a model's name or a path is read in full
# where it fits.
QUOTE_DIGITS, QUOTE_CHARS = 20, 80


def shown(value, spell=json.dumps) -> str:
    """`value` as `spell` writes it (JSON, as the client sent it; repr for a name), or its first
    characters, "..." and its size: an integer's digits, a string's characters, else the spelling's."""
    text = spell(value)
    number = isinstance(value, int) and not isinstance(value, bool)
    if len(text) <= (QUOTE_DIGITS if number else QUOTE_CHARS):
        return text
    if number:
        return f"{text[:QUOTE_DIGITS]}... ({len(text.lstrip('-'))} digits)"
    return f"{text[:QUOTE_CHARS]}... ({len(value) if isinstance(value, str) else len(text)} characters)"


def shown_ids(ids) -> str:
    """Token ids as a list, each shortened (an id of 4000 digits is valid JSON); the caller picks
    which few to name."""
    return "[" + ", ".join(shown(t) for t in ids) + "]"
