"""`sequencer train`: timm-compatible training, fine-tuning and transfer (:func:`sequencer.train` underneath).

Flags keep the names and meaning of timm's ``train.py``, so the paper's recipes run unchanged; their defaults and
checks are :class:`~sequencer.engine.config.TrainConfig`'s. With no DATA it trains ``sequencer2d_nano`` on the
embedded digits.
"""
from __future__ import annotations

import argparse

from ..engine.config import RunState, config_defaults, resolve_config
from .common import KeyValues, Switch, add_torchcompile_argument, failure_reported_to_launcher, key_value


def _float_list(n):
    return dict(type=float, nargs=n, metavar="F")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", metavar="DATA",
                        help="dataset root (image folders, a .tar, or the torchvision download folder); "
                             "none = the embedded digits demo")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="YAML of flag values (e.g. a run's args.yaml); command-line flags override it")

    g = parser.add_argument_group("dataset")
    g.add_argument("--data-dir", metavar="DIR", help="same as DATA")
    g.add_argument("--dataset", "-d", metavar="NAME",
                   help='"" image folders, "tar", "torch/cifar10", "torch/flowers102", ..., "digits"')
    g.add_argument("--train-split", help="training split (folder name)")
    g.add_argument("--val-split", help="validation split (val/validation/test found by name)")
    g.add_argument("--val-fraction", type=float, metavar="F",
                   help="hold out this share of each class of the training images (seeded by --seed; the files "
                        "are listed in the experiment folder's val_files.txt), for data without a held-out split")
    g.add_argument("--dataset-download", action="store_true", help="let torchvision datasets download")
    g.add_argument("--class-map", metavar="FILE", help="class name -> index map file")

    g = parser.add_argument_group("model")
    g.add_argument("--model", "-m", metavar="NAME",
                   help="model name (default: sequencer2d_s; sequencer2d_nano for the demo; a resumed or "
                        "initial checkpoint's own)")
    g.add_argument("--model-kwargs", nargs="*", type=key_value, action=KeyValues, metavar="KEY=VALUE",
                   help="architecture overrides, e.g. layers='(1,1,1)' union=add")
    g.add_argument("--pretrained", action="store_true", help="start from the released ImageNet weights")
    g.add_argument("--initial-checkpoint", metavar="PATH", help="start from these weights")
    initial_ema = g.add_mutually_exclusive_group()
    initial_ema.add_argument("--initial-checkpoint-ema", dest="initial_checkpoint_ema", action="store_true",
                             default=None, help="start from the initial checkpoint's EMA weights (default: the "
                                                "weights its run evaluated and logged)")
    initial_ema.add_argument("--no-initial-checkpoint-ema", dest="initial_checkpoint_ema", action="store_false",
                             help="start from the initial checkpoint's raw model weights even when its run "
                                  "evaluated its EMA weights")
    g.add_argument("--resume", metavar="PATH|auto",
                   help="resume model, optimizer, scheduler, EMA, scaler, epoch and RNG state; 'auto' = the "
                        "experiment folder's recovery/last checkpoint if any (needs --experiment)")
    g.add_argument("--no-resume-opt", action="store_true", help="do not restore optimizer/scheduler/scaler state")
    g.add_argument("--num-classes", type=int, help="classifier size (default: the dataset's)")
    g.add_argument("--img-size", type=int, help="square image size (default: the model's)")
    g.add_argument("--in-chans", type=int, help="input channels")
    g.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size C H W (overrides --img-size)")
    g.add_argument("--crop-pct", type=float, help="validation centre-crop fraction")
    g.add_argument("--mean", type=float, nargs="+", metavar="M", help="normalisation mean")
    g.add_argument("--std", type=float, nargs="+", metavar="S", help="normalisation std")
    g.add_argument("--interpolation", help="validation resize interpolation")
    g.add_argument("-b", "--batch-size", type=int, help="batch size per process")
    g.add_argument("-vb", "--validation-batch-size", type=int, help="validation batch size")
    g.add_argument("--channels-last", action=Switch, off="--no-channels-last", help="channels-last memory layout")
    g.add_argument("--grad-accum-steps", type=int, help="micro-batches per optimizer step")
    g.add_argument("--grad-checkpointing", action=Switch, off="--no-grad-checkpointing",
                   help="activation checkpointing per block")
    add_torchcompile_argument(g)
    g.add_argument("--no-torchcompile", dest="torchcompile", action="store_const", const="",
                   help="run eager (turns off the --torchcompile a resumed run was started with)")
    g.add_argument("--torchcompile-mode", metavar="MODE",
                   help="torch.compile mode (default, reduce-overhead, max-autotune, ...)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--opt", help="timm optimizer name (adamw, sgd, lamb, ...)")
    g.add_argument("--opt-eps", type=float, help="optimizer epsilon")
    g.add_argument("--opt-betas", type=float, nargs="+", metavar="B", help="optimizer betas")
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, help="weight decay")
    g.add_argument("--clip-grad", type=float, help="gradient clipping value (off by default)")
    g.add_argument("--clip-mode", choices=("norm", "value", "agc"), help="gradient clipping mode")
    g.add_argument("--layer-decay", type=float, help="layer-wise lr decay")

    g = parser.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", help="cosine, tanh, step, multistep, plateau, poly or none")
    g.add_argument("--sched-on-updates", action=Switch, off="--no-sched-on-updates",
                   help="step the schedule every update")
    g.add_argument("--lr", type=float,
                   help="learning rate (default: --lr-base scaled by the global batch size)")
    g.add_argument("--lr-base", type=float, help="lr for a global batch of --lr-base-size")
    g.add_argument("--lr-base-size", type=int, help="batch size --lr-base refers to")
    g.add_argument("--lr-base-scale", help="linear or sqrt (default: sqrt for ada*/lamb)")
    g.add_argument("--lr-noise", type=float, nargs="+", metavar="F",
                   help="lr noise on/off points as fractions of the schedule length, e.g. 0.42 0.9")
    g.add_argument("--lr-noise-pct", type=float, help="lr noise limit")
    g.add_argument("--lr-noise-std", type=float, help="lr noise std")
    g.add_argument("--lr-cycle-mul", type=float, help="cycle length multiplier")
    g.add_argument("--lr-cycle-decay", type=float, help="lr decay per cycle")
    g.add_argument("--lr-cycle-limit", type=int, help="number of cycles")
    g.add_argument("--lr-k-decay", type=float, help="k-decay for cosine/poly")
    g.add_argument("--warmup-lr", type=float, help="warmup start lr")
    g.add_argument("--min-lr", type=float, help="lower lr bound of cyclic schedules")
    g.add_argument("--epochs", type=int, help="epochs to train")
    g.add_argument("--start-epoch", type=int, help="override the start epoch")
    g.add_argument("--decay-milestones", type=int, nargs="+", metavar="E",
                   help="multistep milestones")
    g.add_argument("--decay-epochs", type=float, help="epochs between step decays")
    g.add_argument("--warmup-epochs", type=int, help="warmup epochs")
    g.add_argument("--warmup-prefix", action=Switch, off="--no-warmup-prefix",
                   help="warmup is not part of the decay length")
    g.add_argument("--cooldown-epochs", type=int, help="epochs at --min-lr after the schedule")
    g.add_argument("--patience-epochs", type=int, help="plateau patience")
    g.add_argument("--decay-rate", "--dr", type=float, help="step/plateau decay factor")

    g = parser.add_argument_group("augmentation and regularisation")
    g.add_argument("--no-aug", action=Switch, off="--aug", help="no training augmentation (--aug: with it)")
    g.add_argument("--scale", **_float_list(2), help="random-resized-crop area range")
    g.add_argument("--ratio", **_float_list(2), help="random-resized-crop aspect range")
    g.add_argument("--hflip", type=float, help="horizontal flip probability")
    g.add_argument("--color-jitter", type=float, help="colour jitter factor")
    g.add_argument("--aa", metavar="POLICY", help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--remode", help="random erasing mode (const, rand, pixel)")
    g.add_argument("--recount", type=int, help="random erasing count")
    g.add_argument("--mixup", type=float, help="mixup alpha (on when > 0)")
    g.add_argument("--cutmix", type=float, help="cutmix alpha (on when > 0)")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, metavar="F",
                   help="cutmix box ratio range (overrides alpha)")
    g.add_argument("--mixup-prob", type=float, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, help="probability of cutmix instead of mixup")
    g.add_argument("--mixup-mode", choices=("batch", "pair", "elem"), help="mixup granularity")
    g.add_argument("--mixup-off-epoch", type=int, help="turn mixup off from this epoch (0 = never)")
    g.add_argument("--smoothing", type=float, help="label smoothing")
    g.add_argument("--bce-loss", action=Switch, off="--no-bce-loss", help="binary cross-entropy loss")
    g.add_argument("--bce-target-thresh", type=float, help="BCE target binarisation threshold")
    g.add_argument("--train-interpolation", help="training resize interpolation")
    g.add_argument("--drop", type=float, help="dropout before the head")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate")

    g = parser.add_argument_group("model EMA")
    g.add_argument("--model-ema", action=Switch, off="--no-model-ema",
                   help="keep an exponential moving average of the weights")
    g.add_argument("--model-ema-force-cpu", action=Switch, off="--no-model-ema-force-cpu",
                   help="keep the EMA on the CPU")
    g.add_argument("--model-ema-decay", type=float, help="EMA decay")
    g.add_argument("--model-ema-warmup", action=Switch, off="--no-model-ema-warmup", help="EMA decay warmup")

    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, help="random seed")
    g.add_argument("--log-interval", type=int, help="batches between log lines")
    g.add_argument("--checkpoint-hist", type=int, help="best epochs to keep as checkpoint-<E>.pth.tar")
    g.add_argument("-j", "--workers", type=int, help="data loading processes per training process")
    g.add_argument("--amp", "--native-amp", dest="amp", action=Switch, off="--no-amp",
                   help="mixed precision (autocast)")
    g.add_argument("--amp-dtype", choices=("float16", "bfloat16"),
                   help="AMP dtype (on the CPU bfloat16 is used)")
    g.add_argument("--output", metavar="DIR", help="output root (default ./output/train)")
    g.add_argument("--experiment", help="experiment folder name (default: timestamp-model-imgsize)")
    g.add_argument("--eval-metric", choices=("top1", "top5", "loss"), help="best-checkpoint metric")
    g.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)

    g = parser.add_argument_group("timm habits")
    g.add_argument("--log-wandb", action=Switch, off="--no-log-wandb",
                   help="log args and every epoch's summary row to Weights & Biases (when wandb is installed)")
    g.add_argument("--pin-mem", action="store_true", help="pin batches in page-locked memory (on by default on CUDA)")
    g.add_argument("--no-prefetcher", action=Switch, off="--prefetcher",
                   help="normalise and erase on the CPU workers, not on the GPU (timm's prefetcher; CUDA only)")
    g.add_argument("--dist-bn", choices=("reduce", "broadcast", ""),
                   help="BatchNorm statistics before each evaluation under DDP: the ranks' mean (reduce, the "
                        "default) or rank 0's; '' (timm's no sync) averages them too, with a note; Sequencer "
                        "models have none (a note)")
    g.add_argument("--recovery-interval", type=int, metavar="N",
                   help="also write recovery.pth.tar every N batches (0: only on SIGTERM/SIGINT)")

    # Every flag defaults to "absent" so that run() can tell explicit flags from defaults: explicit flags beat
    # --config, which beats the digits-demo defaults, which beat timm's defaults (TrainConfig's, shown in --help).
    defaults = config_defaults()
    for action in parser._actions:
        if action.dest in ("help",):
            continue
        default = defaults[action.dest]
        if action.help and action.help is not argparse.SUPPRESS and default not in (None, "", False, {}):
            action.help += f" (default: {default})"
        action.default = argparse.SUPPRESS


def run(args: argparse.Namespace) -> int:
    from ..engine.train import run_training

    with failure_reported_to_launcher():
        explicit = {k: v for k, v in vars(args).items() if k not in ("_module", "command")}
        state = RunState()
        return run_training(resolve_config(explicit, state), state).exit_code
