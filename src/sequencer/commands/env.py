"""`sequencer env`: versions, torch build, CPU and matrix ISA, threads and GPUs, for a bug report.

``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from ..tools.env import collect_env, format_env

    env = collect_env()
    print(json.dumps(env, indent=2) if args.json else format_env(env))
    return 0
