"""The help layout both command lines (iserver, psana-ipc) share: epilogs kept
as written, and each option's default shown where it tells something."""
import argparse
from typing import Sequence


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """RawDescriptionHelpFormatter that appends "(default: X)" to an option's help,
    unless the help already speaks of its default or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def epilog(examples: Sequence[str], *paragraphs: str) -> str:
    """A help epilog: "examples:" with each example indented, then the paragraphs."""
    return "\n\n".join(["examples:\n" + "\n".join("  " + e for e in examples), *paragraphs])
