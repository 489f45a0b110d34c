"""The command lines: what the three (``python -m training``, ``python -m export``, ``python -m mssan_infer``)
share -- help that shows defaults, one form of error line -- and, in its modules, the runtime's commands
(:mod:`.main` parses flags; :mod:`.index`, :mod:`.search`, :mod:`.remove`, :mod:`.info` do the work)."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "error_line"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (``(default: ...)``) unless the text already says it or there is
    none to show (a flag, or an option that is off unless given); descriptions are kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is argparse.SUPPRESS or action.default == []
        if "default" in text or nothing or action.nargs == 0 or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def error_line(e: object) -> str:
    """The one line every MSSAN command prints for an error (an exception or a message): ``error: <message>``,
    its whitespace and line breaks folded into single spaces."""
    return f"error: {' '.join(str(e).split())}"
