"""`sequencer benchmark`: throughput, step time, peak memory, GMACs and GEMM-rate fraction (:mod:`sequencer.tools.benchmark`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..choices import AMP_DTYPE_NAMES
from ..fileio import write_atomically
from .common import add_model_args, check_results_file, check_workers, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("-b", "--batch-size", type=positive_int, default=16, help="images per step (default 16)")
    parser.add_argument("--mode", choices=("infer", "train", "both"), default="infer")
    parser.add_argument("--amp-dtype", choices=AMP_DTYPE_NAMES, default="float32",
                        help="compute dtype: autocast for eager models, weight dtype for --optimized on CPU")
    parser.add_argument("--compare-timm", action="store_true",
                        help="also run timm's Sequencer2d, same weights, interleaved in this process")
    parser.add_argument("--optimized", action="store_true",
                        help="also run sequencer.optimize_for_inference(model, dtype) (inference only)")
    parser.add_argument("--torchcompile", action="store_true",
                        help="also run each implementation under torch.compile (rows named <impl>-compiled)")
    parser.add_argument("--lstm-backend", dest="lstm_backends", action="append", default=[],
                        choices=("native", "auto", "triton", "cpu"),
                        help="also run ours with this LSTM backend (row ours-<backend>; repeatable; the row "
                             "'ours' runs the model's own, by default auto)")
    parser.add_argument("--reference-model", default="", metavar="TIMM_NAME",
                        help="also run this timm model (its own weights) as a reference row, e.g. convnext_tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--num-warmup", type=int, default=2, help="untimed steps per implementation (default 2)")
    parser.add_argument("--num-iter", type=positive_int, default=10, help="timed steps per implementation")
    parser.add_argument("--memory-iter", type=int, default=2,
                        help="steps per peak-memory probe; 0 skips the memory measurement (default 2)")
    parser.add_argument("--gemm-size", type=positive_int, default=2048, help="side of the GEMM-rate probe")
    parser.add_argument("--results-file", default="", metavar="R.json", help="write the results as JSON")
    parser.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("input pipeline (--data)")
    g.add_argument("--data", default="", metavar="DIR",
                   help="measure the training input pipeline on DIR's train split instead of the model "
                        "(with --compare-timm: beside timm's create_loader)")
    g.add_argument("-j", "--workers", type=int, default=2, help="data-loader workers for --data (default 2)")
    g.add_argument("--rounds", type=positive_int, default=3, help="alternating timed rounds for --data (default 3)")
    g = parser.add_argument_group("detection backbone (--backbone)")
    g.add_argument("--backbone", action="store_true",
                   help="measure create_backbone(--model) (trunk + stride 4-32 pyramid) beside the trunk alone and "
                        "--reference-model (default convnext_tiny) with features_only, bare and under torchvision's "
                        "FPN; --img-size defaults to 512")
    parser.add_argument("--onnx", action="append", default=[], metavar="PATH",
                        help="also time this `sequencer export` ONNX file (fp32 or int8) under onnxruntime, "
                             "interleaved with the PyTorch paths (inference; repeatable; the model defaults to "
                             "the file's)")


def run(args: argparse.Namespace) -> int:
    check_results_file(args.results_file)
    check_workers(args.workers)
    from ..tools.benchmark import BenchmarkSettings, run_benchmark

    settings = BenchmarkSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchmarkSettings)})
    if args.backbone:  # first: it refuses --data (which would otherwise quietly time the loader instead)
        from ..tools.backbone_benchmark import format_backbone_results, run_backbone_benchmark
        report = run_backbone_benchmark(settings)
        print(format_backbone_results(report))
    elif args.data:
        from ..engine.inference import resolve_device
        from ..tools.loader_benchmark import format_loader_results, run_loader_benchmark
        img_size = args.img_size or 224
        report = run_loader_benchmark(settings, resolve_device(args.device), img_size)
        print(format_loader_results(report))
    else:
        report = run_benchmark(settings)
        print(format_results(report))
    if args.results_file:
        text = json.dumps(report, indent=2)
        write_atomically(args.results_file, lambda tmp: Path(tmp).write_text(text), what="--results-file")
    return 0


def _with_head(classes: int | None) -> str:
    """What a parameter count includes: the classifier's size differs between runs (1000 for ImageNet, 10 for the
    digits demo)."""
    return f" with a {classes}-class head" if classes else (" without a classifier head" if classes == 0 else "")


def format_results(report: dict) -> str:
    head = f"{'impl':<15} {'mode':<6} {'dtype':<9} {'img/s':>8} {'step ms':>9} {'vs timm':>8} {'peak MiB':>9} " \
           f"{'GEMM %':>7} {'rel diff':>9}"
    gmacs = report['results'][0]['gmacs']
    lines = [f"{report['model']} {'x'.join(map(str, report['input_size']))} batch {report['batch_size']} on "
             f"{report['device']} ({report['threads']} threads); params "
             f"{report['results'][0]['params_m']:.2f}M{_with_head(report.get('head_classes'))}, GMACs/img {gmacs if gmacs is None else round(gmacs, 3)}"
             f", GEMM rate {report['gemm_gflops']:.0f} GFLOP/s",
             f"CPU {report['cpu_description']}", head]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    for r in report["results"]:
        lines.append(f"{r['impl']:<15} {r['mode']:<6} {r['dtype']:<9} {r['img_per_s']:>8.2f} {r['step_ms']:>9.1f} "
                     f"{fmt(r['speedup_vs_timm'], '>7.2f') + ('x' if r['speedup_vs_timm'] else ''):>8} "
                     f"{fmt(r['peak_memory_mb'], '>9.0f'):>9} "
                     f"{fmt(None if r['gemm_fraction'] is None else 100 * r['gemm_fraction'], '>6.1f'):>7} "
                     f"{fmt(r['max_rel_diff_vs_timm'], '>9.1e'):>9}")
    return "\n".join(lines)
