"""Command-line value types shared by every heartbatch command (errors argparse shows as usage errors)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def ratio(text: str) -> float:
    """A CTR threshold."""
    value = float(text)
    if not 0 < value < 2:
        raise argparse.ArgumentTypeError("must be between 0 and 2 (e.g. 0.5)")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value
