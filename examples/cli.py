"""What the example scripts share: a user's mistake is one line on stderr and exit status 2.

Bad flags (argparse), and every error of skipvision.errors (a bad checkpoint, config, image,
prompt, data file or setting) end the script this way; anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import sys

from skipvision.errors import SkipvisionError


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def at_least(self, a, **minimums):
        """A usage error for the first given flag below its minimum (None: not given)."""
        for flag, lo in minimums.items():
            if getattr(a, flag) is not None and getattr(a, flag) < lo:
                self.error(f"--{flag.replace('_', '-')} must be >= {lo}")


def fail(message: str):
    """Stop the script for a user's mistake: one line, exit status 2."""
    raise UsageError(message)


class UsageError(SkipvisionError):
    """A flag combination or value that the script refuses."""


def run_main(main, argv=None):
    """main(argv), with a SkipvisionError (or a missing file) as one line and exit status 2."""
    try:
        return main(argv)
    except (SkipvisionError, FileNotFoundError) as e:
        prog = sys.argv[0].rpartition("/")[2] or "skipvision"
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
