"""One transformer layer's forward and backward on one rank, measured against ``compute.layer_times``.

    python -m benchmarks.layer_time --calibration docs/images/scaling/calibration.json [--hidden 128 256 512]

Builds megalite's ``TransformerLayer`` (no parallelism, fp32, dropout off, sequence 256, micro-batch
4, heads = hidden / 32: the sweep's one-rank models) and times, at the calibration's
``threads_per_rank`` torch threads, the process CPU time of the forward and of forward + backward
(median of ``--repeats`` after 3 s of warm-up calls; CPU time, so other processes on the cores do not
count, though they still share caches and memory bandwidth).  Prints each against the model's
``forward`` and ``forward + backward_input + backward_weight`` with that calibration file, the
host's fixed cost per layer included (as ``predict`` adds it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def cpu_seconds(fn, repeats: int, warmup_s: float = 3.0) -> float:
    """Median process CPU time of ``fn`` after warm-up calls for ``warmup_s`` wall seconds (at least two:
    the first shapes timed in a fresh process have run up to 10x slower than later here, cause not
    established)."""
    started = time.perf_counter()
    for calls in range(1000):
        fn()
        if calls >= 1 and time.perf_counter() - started > warmup_s:
            break
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    from megalite.config.settings import ModelConfig
    from megalite.model.transformer import TransformerLayer
    from megalite.scaling.compute import layer_times
    from megalite.scaling.hardware import from_calibration
    from megalite.scaling.predict import with_host_overhead

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", required=True, help="calibration JSON (megalite.calibration.calibrate)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    with open(args.calibration) as f:
        document = json.load(f)
    hardware = from_calibration(document, args.calibration)
    torch.set_num_threads(int(document.get("threads_per_rank", 1)))
    torch.manual_seed(0)
    print(f"{'hidden':>6} {'forward ms':>11} {'model':>7} {'ratio':>6} {'fwd+bwd ms':>11} {'model':>7} {'ratio':>6}")
    for hidden in args.hidden:
        model = ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=hidden // 32,
                            seq_length=args.seq, max_position_embeddings=args.seq, hidden_dropout=0.0,
                            attention_dropout=0.0)
        layer = TransformerLayer(model)
        x = torch.randn(args.seq, args.micro_batch, hidden, requires_grad=True)
        grad = torch.randn_like(x)

        def forward():
            return layer(x)

        def forward_backward():
            layer(x).backward(grad)
        forward_s = cpu_seconds(forward, args.repeats)
        total_s = cpu_seconds(forward_backward, args.repeats)
        predicted = with_host_overhead(layer_times(model, args.micro_batch, hardware, "float32"),
                                       hardware.layer_overhead_s)
        predicted_total = predicted.forward + predicted.backward_input + predicted.backward_weight
        print(f"{hidden:>6} {forward_s * 1e3:>11.2f} {predicted.forward * 1e3:>7.2f} "
              f"{forward_s / predicted.forward:>6.2f} {total_s * 1e3:>11.2f} {predicted_total * 1e3:>7.2f} "
              f"{total_s / predicted_total:>6.2f}")


if __name__ == "__main__":
    main()
