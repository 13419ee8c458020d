"""The command-line parser of fastdreamer's eval and plot: argparse, whose usage errors are one line, as train's."""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage error is one line naming the command and exit code 2 (argparse prints the
    whole usage first, several lines for these commands)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (--help lists the flags)", file=sys.stderr)
        sys.exit(2)
