"""`sequencer.train` and `sequencer.validate` inside the caller's own 2-process gloo group (torch.multiprocessing,
CPU): the run uses the group, and the group is alive afterwards on both ranks."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import torch
from torch import nn

from run_helpers import subprocess_env
from segmentation_helpers import make_voc
from sequencer.engine.segmentation_eval import validate_segmenter

# sequencer2d_nano and its SGD steps, the same in the workers (sharded) and in the test (one process, whole batch)
NANO_STEPS = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    import sequencer

    def nano_with_random_weights():
        torch.manual_seed(0)
        model = sequencer.create_model("sequencer2d_nano", num_classes=5)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():  # the head starts at zero: perturbed so every weight moves
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        return model

    def nano_sgd_steps(model, rank=0, world=1, steps=2):
        """Global batches of 8; rank r trains on its 8 / world images. Returns the global mean loss per step."""
        g = torch.Generator().manual_seed(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for _ in range(steps):
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
            loss = F.cross_entropy(model(x.chunk(world)[rank]), y.chunk(world)[rank])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if world > 1:
                loss = loss.detach().clone()
                torch.distributed.all_reduce(loss)
            losses.append(loss.item() / world)
        return losses
''')

# each rank: make a group, train a small module on tensor Datasets in it, validate the module, then use the group
WORKER = textwrap.dedent('''
    import copy, faulthandler, json, os, sys
    # a rank that aborts (two of four CI-loaded suite runs before c1a4c9f: rank 1, SIGABRT, "terminate called without
    # an active exception", after writing its results) shows every thread's Python stack in the assertion's output
    faulthandler.enable(all_threads=True)
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    import torch.nn.functional as F
    from torch import nn
    import sequencer

    class Blobs(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.labels = torch.randint(0, 2, (n,), generator=g)
            self.images = 0.5 * torch.randn(n, 3, 8, 8, generator=g) + (self.labels * 2 - 1)[:, None, None, None]
        def __len__(self):
            return len(self.labels)
        def __getitem__(self, i):
            return self.images[i], int(self.labels[i])

    class CountingSegmenter(nn.Conv2d):  # pointwise logits for 3 classes; counts the images it is shown
        num_classes = 3
        images_seen = 0
        def forward(self, x):
            self.images_seen += x.shape[0]
            return super().forward(x)

    def sharded_steps(rank, folder):
        """sequencer2d_nano trained 2 SGD steps on this rank's half of each global batch: FSDP1 with flat parameters
        (the LSTMs' weights are then views into them) and FSDP2, each wrapping every block; rank 0 writes the loss
        and the full state dict."""
        import warnings
        from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType, fully_shard
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from sequencer.models.sequencer2d import SequencerBlock

        def fsdp1(model):
            return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({SequencerBlock}),
                                            device_id=torch.device("cpu"))

        def fsdp2(model):
            for block in [m for m in model.modules() if isinstance(m, SequencerBlock)]:
                fully_shard(block)
            return fully_shard(model)

        def fsdp1_state(model):
            with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT):
                return model.state_dict()

        def fsdp2_state(model):
            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))

        results = {}
        for name, wrap, state in (("fsdp1", fsdp1, fsdp1_state), ("fsdp2", fsdp2, fsdp2_state)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FSDP's notes about CPU devices and deprecated arguments
                model = wrap(nano_with_random_weights())
                losses = nano_sgd_steps(model, rank, world=2)
                results[name] = dict(losses=losses, state={k: v.detach().clone() for k, v in state(model).items()})
        if rank == 0:
            torch.save(results, f"{folder}/sharded.pt")

    def rank_main(rank, folder):
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
        sharded_steps(rank, folder)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(192, momentum=0.5), nn.Linear(192, 2))
        # 21 held-out images: shares of 11 and 10, batches of 8 and 3 / 8 and 2. A callback on rank 0 only (rank 1
        # once skipped their agreement's all-reduce, and both ranks hung)
        rows = []
        result = sequencer.train(model=net, data=(Blobs(64, 0), Blobs(21, 1)), epochs=2, batch_size=8, workers=0,
                                 opt="adamw", lr=1e-2, device="cpu", output=f"{folder}/out", experiment="group",
                                 model_ema=True, model_ema_decay=0.5, progress=False,
                                 callbacks=[rows.append] if rank == 0 else [])
        alive_after_train = dist.is_initialized()
        # the logged eval loss is of the EMA saved in the checkpoint, scored here in one piece by plain torch
        ema = copy.deepcopy(net).eval()
        ema.load_state_dict(torch.load(f"{folder}/out/group/last.pth.tar", weights_only=True)["state_dict_ema"])
        held_out = Blobs(21, 1)
        with torch.no_grad():
            ema_loss = F.cross_entropy(ema(held_out.images), held_out.labels).item()
        top1 = sequencer.validate(model=net, data=Blobs(32, 1), device="cpu", progress=False).top1
        torch.manual_seed(0)
        segmenter = CountingSegmenter(3, 3, 1)
        seg = sequencer.validate_segmenter(data=f"{folder}/voc", model=segmenter, eval_size=32)
        alive = dist.is_initialized()
        ranks = torch.tensor([float(rank)])
        dist.all_reduce(ranks)  # the group still works
        weights = torch.cat([t.detach().float().flatten() for t in net.state_dict().values()])  # BN's stats too
        gathered = [torch.zeros_like(weights) for _ in range(2)]
        dist.all_gather(gathered, weights)
        with open(f"{folder}/rank{rank}.json", "w") as f:
            json.dump(dict(alive_after_train=alive_after_train, alive=alive, rank_sum=ranks.item(), top1=top1,
                           same_weights=bool(torch.equal(gathered[0], gathered[1])),
                           epochs=[r["epoch"] for r in result.summary], seg=seg.as_dict(),
                           callback_epochs=[r["epoch"] for r in rows],
                           logged_eval_loss=result.summary[-1]["eval_loss"], ema_loss=ema_loss,
                           seg_images_seen=segmenter.images_seen), f)
        # both ranks done before either tears its group down: two of four CI-loaded suite runs saw rank 1 abort
        # ("terminate called without an active exception") after writing its results, while rank 0 was still alive.
        # The group's gloo threads (2 workers, 1 TCP loop) outlive destroy_process_group here (torch 2.14): FSDP2 keeps
        # 2 references to it after its modules are gone, and its backward started 8 autograd device threads; they end
        # with the interpreter. sequencer.train / validate leave none (measured in a 1-process group)
        dist.barrier()
        dist.destroy_process_group()
        # and each rank leaves without the interpreter's teardown, where those threads were still found joinable
        # (a third CI run, at 2b3bab4: rank 1 SIGABRT, "terminate called without an active exception", no Python
        # frame on any thread): everything this test checks is in the files written above, closed by now
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)

    if __name__ == "__main__":
        mp.spawn(rank_main, args=(sys.argv[1],), nprocs=2)
''')


@pytest.mark.slow
def test_train_and_validate_leave_the_callers_group_alive(tmp_path):
    """... with a BatchNorm module (its running statistics made the same on every rank before each evaluation, as
    timm's ``--dist-bn reduce``), the logged eval loss that of the EMA in the checkpoint; ... and `validate_segmenter` in the group evaluates a share of the split on each rank (each rank scored all of
    it before), its counts summed to the single-process numbers."""
    make_voc(tmp_path / "voc", n_train=1, n_val=5)
    proc, ranks = _two_ranks(NANO_STEPS + WORKER, tmp_path)
    for got in ranks:
        assert got["alive_after_train"] and got["alive"] and got["rank_sum"] == 1.0
        # trained as one DDP run: both ranks end with the same weights, and the same BatchNorm statistics (each
        # rank's own batches gave it its own, so each rank scored its share with another model: the logged loss was
        # 0.0080 where the checkpoint's model scores 0.0100 on a probe)
        assert got["same_weights"]
        assert got["logged_eval_loss"] == pytest.approx(got["ema_loss"], abs=2e-6)
        assert got["epochs"] == [0, 1]
    assert [got["callback_epochs"] for got in ranks] == [[0, 1], []]
    assert ranks[0]["top1"] == ranks[1]["top1"]  # validate's shares were reduced over the group
    torch.manual_seed(0)
    alone = validate_segmenter(data=tmp_path / "voc", model=_with_classes(nn.Conv2d(3, 3, 1)), eval_size=32).as_dict()
    assert ranks[0]["seg"] == ranks[1]["seg"] == json.loads(json.dumps(alone))  # as the ranks wrote it
    assert sorted(got["seg_images_seen"] for got in ranks) == [2, 3]  # shares of the 5 images, not 5 each
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["group"]  # rank 0 wrote the one experiment folder
    assert proc.stdout == "" and proc.stderr == ""  # progress=False on both ranks
    _sharded_training_is_single_process_training(tmp_path / "sharded.pt")


def _two_ranks(code: str, folder) -> tuple:
    """Run ``code`` (a script spawning 2 ranks, each writing ``folder/rank{r}.json``) outside any torchrun
    environment; the finished process and the ranks' records."""
    script = folder / "worker.py"
    script.write_text(code)
    env = subprocess_env()
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc, [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


def _sharded_training_is_single_process_training(results_file):
    """FSDP1 with flat parameters (each LSTM's weights views into a flat shard, swapped in and out around each
    block) and FSDP2 train nano as one process does on the whole batch, to float32 reordering."""
    namespace = {}
    exec(NANO_STEPS, namespace)
    model = namespace["nano_with_random_weights"]()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    losses = namespace["nano_sgd_steps"](model)
    for name, got in torch.load(results_file, weights_only=True).items():
        assert got["losses"] == pytest.approx(losses, abs=1e-5), name
        assert got["state"].keys() == start.keys(), name
        for key, value in model.state_dict().items():
            assert not torch.equal(value, start[key]) or "running" in key, key  # every weight trained
            torch.testing.assert_close(got["state"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def _with_classes(module: nn.Module, num_classes: int = 3) -> nn.Module:
    module.num_classes = num_classes
    return module


# each rank: train in the caller's group, rank 1's callback raising after the first epoch; then the caller's own
# all-reduce, and each rank writes what it saw
FAILING_CALLBACK = textwrap.dedent('''
    import datetime, faulthandler, json, os, sys
    faulthandler.enable(all_threads=True)
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch import nn
    import sequencer

    def fails(metrics):
        raise ValueError("the caller's callback failed")

    def rank_main(rank, folder):
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        torch.manual_seed(0)
        data = [(torch.randn(3, 4, 4), i % 2) for i in range(16)]
        try:
            sequencer.train(model=nn.Sequential(nn.Flatten(), nn.Linear(48, 2)), data=(data, data[:8]), epochs=2,
                            batch_size=4, workers=0, device="cpu", output=f"{folder}/out", progress=False,
                            callbacks=[fails] if rank == 1 else [])
            raised = None
        except Exception as e:
            raised = f"{type(e).__name__}: {e}"
        ranks = torch.tensor([float(rank)])
        dist.all_reduce(ranks)  # the caller's own collective, right after
        with open(f"{folder}/rank{rank}.json", "w") as f:
            json.dump(dict(raised=raised, rank_sum=ranks.item()), f)
        dist.barrier()  # then out without the interpreter's teardown, as WORKER (its comment says why)
        dist.destroy_process_group()
        os._exit(0)

    if __name__ == "__main__":
        mp.spawn(rank_main, (sys.argv[1],), 2)
''')


@pytest.mark.slow
def test_a_callback_raising_on_one_rank_stops_every_rank_and_leaves_the_callers_group_in_step(tmp_path):
    """In the caller's 2-process gloo group, a callback raising on rank 1 raises there and stops rank 0 with
    PeerGone naming it, both at the callbacks' agreement, so the caller's next all-reduce meets on both ranks.
    Rank 1 left, rank 0 waited in the agreement, and rank 1's all-reduce met it: gloo aborted rank 1 ('Received
    data size doesn't match expected size. 8 vs 4', SIGABRT)."""
    _, ranks = _two_ranks(FAILING_CALLBACK, tmp_path)
    assert ranks == [dict(raised="PeerGone: another process of the run stopped (rank 1's callback raised)",
                          rank_sum=1.0),
                     dict(raised="ValueError: the caller's callback failed", rank_sum=1.0)]
