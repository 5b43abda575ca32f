"""Text that people and attackers choose, made safe before it is kept or shown.

Reasons, names and values reach the journal and are printed on terminals and reports, so
``plain_text_problem`` refuses control, format (bidi overrides, zero-width), surrogate,
private-use and unassigned characters, and ``escaped`` turns a string that cannot be refused
(a user name that failed to sign in) into at most ``limit`` printable ASCII characters.
"""

from __future__ import annotations

import unicodedata

_REFUSED = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def plain_text_problem(value: str) -> str | None:
    """What makes ``value`` not plain text (its first bad character), or None."""
    for index, char in enumerate(value):
        if unicodedata.category(char) in _REFUSED:
            return (
                f"character {index + 1} is U+{ord(char):04X}, a control or invisible "
                "character; give plain text"
            )
    return None


def escaped(value: str, limit: int = 32) -> str:
    """``value`` as at most ``limit`` characters, anything but printable ASCII escaped
    (``\\x00``, ``\\u202e``), followed by how much was cut."""
    cut = value[:limit].encode("unicode_escape").decode("ascii")
    return cut + (f"...(+{len(value) - limit} chars)" if len(value) > limit else "")
