"""What the bench scripts' flags take: positive counts, the config a bench runs (a preset under configs/ or a
parameters.json), and the SWE vocabulary found as the tests find it (`GPTSAN_SHARED`, default ../shared)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from gptsan.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def positive_integer(text: str) -> int:
    """An argparse type: `--batch 0` is `error: argument --batch: expected a positive integer, got '0'`."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def config_path(name: str) -> Path:
    """A preset name under configs/ or a path to a parameters.json."""
    path = ROOT / "configs" / f"{name}.json"
    if path.exists():
        return path
    if Path(name).is_file():
        return Path(name)
    presets = ", ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.json")))
    raise UserError(f"--config: expected a preset ({presets}) or a parameters.json path, got {name!r}")


def default_vocabulary() -> Path:
    """ja-swe36k.txt in the shared folder: `GPTSAN_SHARED`, else ../shared beside the repository."""
    return Path(os.environ.get("GPTSAN_SHARED", ROOT.parent / "shared")) / "vocab" / "ja-swe36k.txt"
