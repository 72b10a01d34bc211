"""DDP training-step time with the 1x1 downsample as a matmul (now) against the conv it replaced (before).

Run under 2 CPU processes:  torchrun --standalone --nproc_per_node 2 benchmarks/ddp_step.py [--model M --img-size N]
The two variants alternate round by round in one run, so machine noise hits both alike. Prints rank 0's medians.
"""
import argparse
import statistics
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

import sequencer
from sequencer.models.sequencer2d import Downsample2d


def conv_forward(self, x):  # the layout that made DDP copy every 1x1 weight gradient into its bucket
    return self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()


def timed_steps(ddp, optimizer, images, targets, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ddp(images), targets).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sequencer2d_nano")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)  # one core per process
    torch.manual_seed(0)
    model = sequencer.create_model(args.model, num_classes=10)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    targets = torch.randint(0, 10, (args.batch_size,))
    variants = {"matmul (now)": Downsample2d.forward, "conv (before)": conv_forward}
    results = {name: [] for name in variants}
    warned = {name: False for name in variants}
    for _ in range(args.rounds):
        for name, forward in variants.items():
            Downsample2d.forward = forward
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results[name] += timed_steps(ddp, optimizer, images, targets, args.steps)[1:]
            warned[name] |= any("Grad strides" in str(w.message) for w in caught)
    if dist.get_rank() == 0:
        for name, times in results.items():
            print(f"{name:14s} median step {statistics.median(times) * 1e3:7.1f} ms over {len(times)} steps; "
                  f"DDP stride warning: {'yes' if warned[name] else 'no'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
