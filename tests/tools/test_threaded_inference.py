"""One loaded model served from several threads at once (a web server's request threads): each thread's outputs are
those of the same calls made one after another, on every inference path, and a thread that trains a copy meanwhile
changes nothing."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

import sequencer
from sequencer.engine.inference import eval_transform, load_model, read_images

from .conftest import TINY_ARCH, TINY_KWARGS, tiny_model

THREADS = 4


def in_threads(work) -> list:
    """``[work(0), ..., work(THREADS - 1)]``, each on its own thread, all started together."""
    results, errors = [None] * THREADS, []
    start = threading.Barrier(THREADS)

    def run(k):
        try:
            start.wait()
            results[k] = work(k)
        except BaseException as e:  # re-raised below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # streams need two intra-op threads (the suite runs on one)
    yield
    torch.set_num_threads(before)


def test_four_threads_get_the_outputs_of_sequential_calls(tiny_checkpoint, image_folder):
    """Eager (oneDNN's LSTM and the `cpu` backend, fp32 and bf16 autocast), optimize_for_inference (batches on two
    streams, fp32 and bf16) and the predict command's pieces (load_model, eval_transform, read_images): 3 calls
    per thread on inputs of their own, equal bit for bit to the same calls made one by one, while a fifth thread
    trains a copy of the model. (One intra-op thread, as the suite runs: two, on a loaded 2-core machine, made
    the eager calls 20x slower.)"""
    model = tiny_model()
    cpu_backend = sequencer.create_model(TINY_ARCH, lstm_backend="cpu", **TINY_KWARGS).eval()
    cpu_backend.load_state_dict(model.state_dict())
    loaded = load_model(str(tiny_checkpoint))
    transform = eval_transform(loaded)
    files = sorted(image_folder.glob("val/*/*.png"))[:THREADS]
    g = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(batch, 3, 32, 32, generator=g) for batch in (1, 3, 4)] for _ in range(THREADS)]

    def eager(module, autocast=False):
        def call(x):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return module(x).float()
        return call

    def predict(k, _):  # as `sequencer predict` runs a file
        _, tensors, _ = read_images([files[k]], transform)
        with torch.inference_mode():
            return loaded.model(torch.stack(tensors))

    paths = {"eager": eager(model), "eager bf16": eager(model, True), "cpu backend": eager(cpu_backend),
             "cpu backend bf16": eager(cpu_backend, True),
             "optimized": sequencer.optimize_for_inference(model, streams=2),
             "optimized bf16": sequencer.optimize_for_inference(model, torch.bfloat16, streams=2)}
    calls = {name: (lambda k, x, fn=fn: fn(x)) for name, fn in paths.items()}
    calls["predict"] = predict
    expected = {name: [[call(k, x) for x in inputs[k]] for k in range(THREADS)] for name, call in calls.items()}
    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)

    def train_a_copy():
        for _ in range(2):
            optimizer.zero_grad()
            trained(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
            optimizer.step()

    trainer = threading.Thread(target=train_a_copy)
    trainer.start()
    try:
        for name, call in calls.items():
            got = in_threads(lambda k: [call(k, x) for x in inputs[k]])
            for k in range(THREADS):
                for i, (a, b) in enumerate(zip(got[k], expected[name][k])):
                    assert torch.equal(a, b), f"{name}: thread {k} call {i}"
    finally:
        trainer.join()
    assert not model.training


def test_streamed_calls_leave_later_threads_the_callers_thread_count(two_threads):
    """torch.set_num_threads on a stream's worker also set the process's default count: every thread started after
    the first batch (a web server's next request thread) ran torch on one thread, and its batches on one stream."""

    def count_on_a_new_thread():
        counts = []
        thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return counts[0]

    fast = sequencer.optimize_for_inference(tiny_model())
    fast(torch.randn(2, 3, 32, 32))
    assert torch.get_num_threads() == 2 and count_on_a_new_thread() == 2
