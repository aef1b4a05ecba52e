"""``onepromptseg-dev``: the developers' commands (not installed into Slicer).

    onepromptseg-dev bench DATA_DIR [--kinds mask,box,click,doodle] [--transfer] [--json OUT]
    onepromptseg-dev speed [--shape 300,512,512] [--repeat N]

Training and calibration have their own entry points: ``python -m OnePromptSegLib.tooling.train`` and
``python -m OnePromptSegLib.tooling.calibrate``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..cli import run_command
from .bench import add_arguments, add_speed_arguments


def make_parser() -> argparse.ArgumentParser:
    """The parser of ``onepromptseg-dev``: ``bench`` and ``speed``."""
    ap = argparse.ArgumentParser(prog="onepromptseg-dev", description="OnePromptSeg developers' benchmark and "
                                 "timing commands.")
    sub = ap.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("bench", help="the project's benchmark on a folder of <case>_img/_lbl.nii.gz "
                                 "volumes"))
    add_speed_arguments(sub.add_parser("speed", help="time per slice and peak memory on a generated volume"))
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``onepromptseg-dev`` command."""
    return run_command(make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
