"""`sequencer` command line: one sub-command per workflow.

Each sub-command lives in its own module of :mod:`sequencer.commands`, exposing ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their command runs, and import the library (torch) only inside ``run``, so ``sequencer --help``,
``sequencer COMMAND --help`` and a bad flag answer without loading torch (``tests/test_cli.py`` checks it).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import sys
import warnings

from . import __version__
from .errors import DISTRIBUTION, SequencerError

# name -> (module, one-line help)
COMMANDS = {
    "models": ("sequencer.commands.models", "list registered models with parameters and GMACs"),
    "train": ("sequencer.commands.train", "train or fine-tune a model (timm-compatible flags)"),
    "validate": ("sequencer.commands.validate", "evaluate a model on a dataset split"),
    "predict": ("sequencer.commands.predict", "classify images"),
    "segment": ("sequencer.commands.segment", "semantic segmentation: segment train | validate | predict"),
    "erf": ("sequencer.commands.erf", "effective receptive field heat-maps (the paper's, or --mode magnitude)"),
    "robustness": ("sequencer.commands.robustness", "ImageNet-C errors and mCE by the paper's protocol"),
    "resolution-sweep": ("sequencer.commands.resolution", "accuracy across input resolutions"),
    "export": ("sequencer.commands.export", "export to ONNX, TorchScript, torch.export (.pt2) or safetensors"),
    "checkpoint": ("sequencer.commands.checkpoint", "average or clean checkpoints"),
    "benchmark": ("sequencer.commands.benchmark", "throughput, memory and GMACs (optionally vs timm)"),
    "env": ("sequencer.commands.env", "versions, torch build, CPU and matrix ISA, threads, GPUs: for bug reports"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (no usage dump) and exit status 2."""

    command: str | None = None  # the subcommand on the command line, for the help an unknown flag points to

    def error(self, message: str):
        prog = f"{self.prog} {self.command}" if self.command and self.prog == "sequencer" else self.prog
        self.exit(2, f"{prog}: error: {message} (see `{prog} --help`)\n")


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="sequencer", description="Sequencer (deep LSTM) vision backbones")
    parser.command = argv_command
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == argv_command:  # only the chosen command's module is imported
            importlib.import_module(module_name).add_arguments(p)
            p.set_defaults(_module=module_name)
    return parser


def install_console_logging(as_flags) -> None:
    """The "sequencer" logger's output for this command (replacing an earlier call's handler, e.g. in tests).
    Under torchrun only rank 0 speaks: another rank's console shows errors only, so a note every rank logs (the
    autocast dtype, the data) appears once, as the launcher's output."""
    from .commands.common import speaks_for_the_launch
    from .engine.guest import ConsoleHandler  # imported with the command, not for `sequencer --help`
    logger = logging.getLogger("sequencer")
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler) and h.thread is None]:
        logger.removeHandler(handler)
    other_rank = not speaks_for_the_launch()
    logger.addHandler(ConsoleHandler(logging.ERROR if other_rank else logging.INFO, rewrite=as_flags))
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the command's output is these lines, once, whatever the root logger does


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from .commands.common import as_flags  # the library names parameters; the command line shows its flags
    rewrite = functools.partial(as_flags, command=args.command)
    with _command_console(rewrite):
        return _run_command(args, rewrite)


@contextlib.contextmanager
def _command_console(rewrite):
    """The command's console for its length: the "sequencer" logger's lines (:func:`install_console_logging`)
    and warnings as one line each. A caller of ``main`` in its own process (a notebook, a test) gets its logging
    and warnings back as they were afterwards."""
    logger = logging.getLogger("sequencer")
    saved = list(logger.handlers), logger.level, logger.propagate, warnings.formatwarning
    install_console_logging(rewrite)
    # warnings are messages for the user: one line, without the source line of the code that raised them
    warnings.formatwarning = lambda message, category, *_args, **_kw: f"warning: {rewrite(str(message))}\n"
    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    cpp_extension.addFilter(_no_cuda_runtime_note)
    strict_streams = _escape_unencodable_text()
    try:
        yield
    finally:
        for stream in strict_streams:
            stream.reconfigure(errors="strict")
        cpp_extension.removeFilter(_no_cuda_runtime_note)
        logger.handlers[:], level, logger.propagate, warnings.formatwarning = saved
        logger.setLevel(level)


def _escape_unencodable_text() -> list:
    """stdout and stderr write what they cannot encode as escapes for the command's length: a file name that is not
    UTF-8 (held as a lone surrogate) in any printed line would otherwise end the command in a UnicodeEncodeError
    traceback after its work is done (the logged lines spell such names already: ``engine.guest.printable``).
    Returns the streams changed, to be given back their strict errors."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
            changed.append(stream)
    return changed


def _no_cuda_runtime_note(record: logging.LogRecord) -> bool:
    """False for torch's "No CUDA runtime is found, using CUDA_HOME=..." that the first C++ build of
    ``--torchcompile`` logs on a machine without a GPU: expected there, and it reads as a fault."""
    return not record.getMessage().startswith("No CUDA runtime is found")


def _run_command(args: argparse.Namespace, rewrite) -> int:
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except SequencerError as e:
        print(f"sequencer {args.command}: error: {rewrite(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sequencer {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `sequencer models | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
