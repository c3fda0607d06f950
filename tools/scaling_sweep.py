"""Real training runs on this machine against the performance model's prediction for each.

    python -m tools.scaling_sweep --out docs/images/scaling            # the grid below, ~10 minutes on 2 cores
    python -m tools.scaling_sweep --out /tmp/sweep --smoke             # one tiny run: checks the tool

Every configuration is a real ``megalite-train`` run (``python -m torch.distributed.run --standalone
-m megalite.train``) on mock data, fp32, dropout off, each rank at the calibration file's
``threads_per_rank`` torch threads (``OMP_NUM_THREADS``; cores / 2 ranks, one on two cores): the
thread count every figure the prediction reads was measured at, one-rank runs included.  From its
``--log-json`` records (rank 0):

    step s       median ``elapsed_ms`` of the steps after the first ``WARMUP`` (the last step is left
                 out when it records the pipeline timeline)
    tokens/s     global batch x sequence / step s
    peak MiB     rank 0's peak resident set (CPU; it includes the interpreter, torch and the process
                 group: the runtime baseline the calibration measures, calibration/baseline.py)
    bubble       the last step's measured bubble fraction (``--timeline``; pipeline runs only)
    cpu step s   median CPU time of rank 0's process in a step (``cpu_ms``): the wall step less what
                 the rank waited, on its peers or for a core; with one thread per rank, what the step
                 costs rank 0's core (below the step on an idle machine by the bubble and collectives)
    load         the machine's 1-minute load average when the run started (other work on the cores)
    cpu share    CPU seconds the run's processes got over (wall seconds x ranks), start-up included:
                 about 1 on an idle machine (less by the time ranks wait on each other), lower when
                 other processes take the cores -- which the prediction, made for this machine
                 idle, does not know

and from ``megalite.scaling.predict.predict`` with the machine's calibration file (written first by
``megalite.calibration.calibrate`` if ``--calibration`` does not exist): the predicted step, bubble,
memory of the most loaded rank and of rank 0 (the calibration's runtime baseline included) and
rank 0's measured peak over rank 0's prediction (``memory_ratio``), and the activation bytes of
one layer as the prediction counts them (on a CPU calibration, as PyTorch's CPU kernels save them:
``scaling/cpu_activations.py``) and as that inventory counts them.

The runs share their calibration's allocator setting (its ``malloc_mmap_threshold``; a calibration measured
here takes ``--malloc-mmap-threshold``): glibc's default keeps freed blocks resident, so the peak exceeds
the live bytes the model counts, while a fixed threshold returns them at the price of faulting them in
again each step -- which the prediction includes only if the calibration was measured that way
(calibration/allocator.py, docs/scaling.md "Peak memory").

Groups: model size (1 rank, hidden 128 to 512) and weak scaling (DP 1 -> 2 with the batch), TP vs
PP vs DP at 2 ranks, micro-batch size under PP 2, the bubble against the micro-batch count for each
schedule, and memory under TP 2 with SP and selective / full recompute.  Writes ``sweep.csv``,
``sweep.json``, ``sweep.md`` (the table) and, with matplotlib, ``step_time.png``, ``bubble.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

from megalite.calibration.allocator import ENV, check_threshold

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP = 2

COMMON = ["--mock-data", "--vocab-size", "1024", "--make-vocab-size-divisible-by", "128", "--hidden-dropout", "0",
          "--attention-dropout", "0", "--lr", "1e-4", "--eval-iters", "0", "--log-interval", "1000", "--seed", "7"]


class Config(NamedTuple):
    group: str
    name: str
    ranks: int
    flags: List[str]


def model_flags(hidden: int, layers: int = 4, seq: int = 256) -> List[str]:
    return ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(hidden // 32),
            "--seq-length", str(seq), "--max-position-embeddings", str(seq)]


def batch_flags(micro: int, global_batch: int) -> List[str]:
    return ["--micro-batch-size", str(micro), "--global-batch-size", str(global_batch)]


def grid(smoke: bool) -> List[Config]:
    if smoke:
        return [Config("smoke", "h64 1 rank", 1, model_flags(64, layers=2, seq=32) + batch_flags(2, 4))]
    pp2 = ["--pipeline-model-parallel-size", "2"]
    configs = [Config("model size", f"h{h} 1 rank", 1, model_flags(h) + batch_flags(4, 8)) for h in (128, 256, 512)]
    configs.append(Config("weak scaling", "h256 DP2, batch x2", 2, model_flags(256) + batch_flags(4, 16)))
    layouts = (("TP2", ["--tensor-model-parallel-size", "2"], 8),
               ("PP2 1f1b", pp2 + ["--pipeline-schedule", "1f1b"], 8),
               ("DP2", [], 16))                                   # DP 2 x micro-batch 2 x 4 micro-batches
    for name, flags, global_batch in layouts:
        configs.append(Config("TP vs PP (2 ranks)", f"h256 {name}", 2,
                              model_flags(256) + batch_flags(2, global_batch) + flags))
    for micro in (1, 4):
        configs.append(Config("micro-batch (PP2 1f1b)", f"h256 PP2 b{micro}", 2,
                              model_flags(256) + batch_flags(micro, 8) + pp2 + ["--pipeline-schedule", "1f1b"]))
    for schedule in ("gpipe", "1f1b", "interleaved", "zb-h1"):
        for m in (2, 8):
            extra = ["--virtual-pipeline-model-parallel-size", "2"] if schedule == "interleaved" else []
            configs.append(Config("bubble (PP2)", f"h256 {schedule} m{m}", 2, model_flags(256) + batch_flags(2, 2 * m)
                                  + pp2 + ["--pipeline-schedule", schedule] + extra))
    tp2 = ["--tensor-model-parallel-size", "2"]
    for name, flags in (("TP2", []), ("TP2 SP", ["--sequence-parallel"]),
                        ("TP2 SP selective", ["--sequence-parallel", "--recompute-granularity", "selective"]),
                        ("TP2 SP full", ["--sequence-parallel", "--recompute-granularity", "full",
                                         "--recompute-method", "uniform"])):
        configs.append(Config("memory (TP2, seq 1024)", f"h256 {name}", 2,
                              model_flags(256, seq=1024) + batch_flags(2, 4) + tp2 + flags))
    moe = ["--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "512",
           "--moe-token-dispatcher-type", "alltoall"]
    for name, ranks, flags in (("1 rank", 1, []), ("DP2 EP2", 2, ["--expert-model-parallel-size", "2"]),
                               ("TP2 SP EP2", 2, tp2 + ["--sequence-parallel", "--expert-model-parallel-size", "2"]),
                               ("TP2 SP ETP2", 2, tp2 + ["--sequence-parallel", "--expert-tensor-parallel-size", "2"])):
        configs.append(Config("MoE (8 experts, top-2)", f"h256 MoE {name}", ranks,
                              model_flags(256) + batch_flags(2, 8) + moe + flags))
    return configs


def selected(config: Config, only: Optional[str]) -> bool:
    """Whether ``config`` is among ``--only``'s comma-separated texts (each found in its group or name)."""
    texts = [t.strip() for t in (only or "").split(",") if t.strip()]
    return not texts or any(t in config.group or t in config.name for t in texts)


def run_config(config: Config, folder: str, iters: int, timeout: float, threads: int = 1,
               mmap_threshold: Optional[int] = None) -> dict:
    """Train ``config`` for ``iters`` steps at ``threads`` torch threads per rank (glibc's mmap threshold
    fixed at ``mmap_threshold`` bytes if given); the measured figures from its --log-json records."""
    slug = config.name.replace(" ", "_").replace(",", "")
    log = os.path.join(folder, f"{slug}.jsonl")
    pipeline = "--pipeline-model-parallel-size" in config.flags
    argv = config.flags + COMMON + ["--train-iters", str(iters), "--log-json", log]
    if pipeline:
        argv += ["--timeline", os.path.join(folder, f"{slug}_timeline.png")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.ranks}",
               "-m", "megalite.train"] + argv
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(ENV, None)          # the calibration's setting, not whatever this shell exported
    if mmap_threshold is not None:
        env[ENV] = str(mmap_threshold)
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=folder)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{config.name}: megalite-train exited {done.returncode}:\n{done.stderr[-3000:]}")
    with open(log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    timed = records[WARMUP:-1] if pipeline else records[WARMUP:]
    step = statistics.median(r["elapsed_ms"] for r in timed) / 1e3
    last = records[-1]
    return {"step_s": step, "step_min_s": min(r["elapsed_ms"] for r in timed) / 1e3,
            "cpu_step_s": statistics.median(r["cpu_ms"] for r in timed) / 1e3,
            "tokens_per_s": last["global_batch_size"] * seq_length(config.flags) / step,
            "peak_mib": max(r["peak_memory_mb"] for r in records), "bubble": last.get("bubble_fraction"),
            "wall_s": wall, "cpu_share": cpu_seconds / (wall * config.ranks), "load": load_before, "argv": argv}


def seq_length(flags: Sequence[str]) -> int:
    return int(flags[list(flags).index("--seq-length") + 1])


def predicted(config: Config, hardware) -> dict:
    """``predict()`` on the configuration's own flags, and the CPU inventory of one layer's activations."""
    from megalite.scaling.cpu_activations import cpu_activation_bytes_per_layer
    from megalite.scaling.predict import predict
    from megalite.training.arguments import parse_args

    model, parallel, optimizer, _data, training = parse_args(config.flags + COMMON + ["--train-iters", "1"],
                                                             world_size=config.ranks)
    p = predict(model, parallel, training, optimizer, hardware, config.ranks)
    tp = parallel.tensor_model_parallel_size
    cpu_layer = cpu_activation_bytes_per_layer(
        model.seq_length, training.micro_batch_size, model.hidden_size, model.num_attention_heads, element_size=4,
        tp=tp, sequence_parallel=parallel.sequence_parallel, recompute=model.recompute_granularity,
        ffn=model.ffn_hidden_size, hidden_dropout=model.hidden_dropout > 0,
        attention_dropout=model.attention_dropout > 0)
    pipeline = parallel.pipeline_model_parallel_size > 1
    return {"pred_step_s": p.iteration_time_s, "pred_bubble": p.bubble_fraction if pipeline else None,
            "pred_memory_mib": p.memory_gb_per_gpu * 1024, "pred_rank0_mib": p.memory_gb_per_stage[0] * 1024,
            "pred_layer_act_mib": p.activation_bytes_per_layer / 2**20, "cpu_layer_act_mib": cpu_layer / 2**20,
            "pred_breakdown_s": p.breakdown}


def load_calibration(path: str, ranks: int, mmap_threshold: Optional[int] = None):
    """(Hardware, threads per rank, glibc's mmap threshold) of the calibration file at ``path``, measured
    first if missing (under ``mmap_threshold`` if given).  The runs take the file's threshold: a step's
    allocations cost what the calibration measured only under the same setting (calibration/allocator.py);
    a different ``mmap_threshold`` is a ValueError naming both."""
    from megalite.calibration.allocator import fix_threshold
    from megalite.scaling.hardware import from_calibration

    if not os.path.exists(path):
        from megalite.calibration.calibrate import calibrate
        print(f"measuring this machine -> {path}", flush=True)
        if mmap_threshold is not None:
            fix_threshold(mmap_threshold)
        calibrate(path, ranks)
    with open(path) as f:
        document = json.load(f)
    calibrated = document.get("malloc_mmap_threshold")
    if mmap_threshold is not None and mmap_threshold != calibrated:
        setting = f"with glibc's mmap threshold fixed at {calibrated}" if calibrated is not None else \
            "with glibc's default mmap threshold"
        raise ValueError(f"--malloc-mmap-threshold {mmap_threshold}: the calibration {path} was measured {setting}; "
                         f"calibrate under the runs' setting (python -m megalite.calibration.calibrate FILE "
                         f"--malloc-mmap-threshold {mmap_threshold}) or leave the flag out")
    return from_calibration(document, path), int(document.get("threads_per_rank", 1)), calibrated


COLUMNS = ["group", "name", "ranks", "step_s", "pred_step_s", "step_ratio", "tokens_per_s", "bubble", "pred_bubble",
           "peak_mib", "pred_memory_mib", "pred_rank0_mib", "memory_ratio", "pred_layer_act_mib", "cpu_layer_act_mib",
           "cpu_step_s", "cpu_ratio", "load", "cpu_share"]


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_outputs(rows: List[dict], out: str, machine: str, mmap_threshold: Optional[int] = None) -> None:
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"machine": machine, "malloc_mmap_threshold": mmap_threshold, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    allocator = "glibc's default" if mmap_threshold is None else f"fixed at {mmap_threshold} bytes"
    lines = [f"machine: {machine}", f"glibc mmap threshold (runs and calibration): {allocator}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    within = [r for r in rows if abs(r["step_ratio"] - 1) <= 0.25]
    memory_within = [r for r in rows if abs(r["memory_ratio"] - 1) <= 0.25]
    lines += ["", f"step time within 25% of the prediction: {len(within)} of {len(rows)} configurations",
              f"peak memory within 25% of the prediction: {len(memory_within)} of {len(rows)} configurations"]
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: List[dict], out: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    groups = sorted({r["group"] for r in rows}, key=[r["group"] for r in rows].index)
    for group in groups:
        mine = [r for r in rows if r["group"] == group]
        ax.scatter([r["pred_step_s"] for r in mine], [r["step_s"] for r in mine], label=group, s=22)
    top = max(max(r["step_s"], r["pred_step_s"]) for r in rows) * 1.15
    low = min(min(r["step_s"], r["pred_step_s"]) for r in rows) / 1.15
    ax.plot([low, top], [low, top], "k-", lw=0.8, label="measured = predicted")
    ax.fill_between([low, top], [0.75 * low, 0.75 * top], [1.25 * low, 1.25 * top], color="grey", alpha=0.15,
                    label="within 25%")
    ax.set(xscale="log", yscale="log", xlim=(low, top), ylim=(low, top), xlabel="predicted step (s)",
           ylabel="measured step (s, median)", title="step time: measured against predict() (calibrated)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "step_time.png"), dpi=110)
    plt.close(fig)
    bubbles = [r for r in rows if r.get("bubble") is not None]
    if bubbles:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels = [r["name"].replace("h256 ", "") for r in bubbles]
        x = range(len(bubbles))
        ax.bar([i - 0.2 for i in x], [r["bubble"] for r in bubbles], width=0.4, label="measured")
        ax.bar([i + 0.2 for i in x], [r["pred_bubble"] for r in bubbles], width=0.4, label="predicted")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set(ylabel="bubble fraction", title="pipeline bubble: measured (last step) against predicted")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "bubble.png"), dpi=110)
        plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for sweep.csv/.json/.md, plots and the runs' logs")
    parser.add_argument("--calibration", help="calibration JSON (default OUT/calibration.json; measured if missing)")
    parser.add_argument("--iters", type=int, default=8, help=f"steps per run ({WARMUP} warm-up steps are not timed)")
    parser.add_argument("--smoke", action="store_true", help="one tiny configuration: checks the tool, not the model")
    parser.add_argument("--only", help="run only the configurations whose group or name contains this text "
                                       "(several: separated by commas, e.g. 'memory,model size,zb-h1')")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="fix glibc's mmap threshold in the runs (MALLOC_MMAP_THRESHOLD_): every freed block of "
                             "at least BYTES goes back to the system, so the peak resident set follows the live "
                             "bytes (docs/scaling.md). Default: the calibration file's setting, which the runs must "
                             "share (a calibration measured here takes the flag's)")
    args = parser.parse_args(argv)
    if args.iters < WARMUP + 2:
        parser.error(f"--iters {args.iters}: at least {WARMUP + 2} (the first {WARMUP} are warm-up)")
    args.out = os.path.abspath(args.out)   # the runs start in OUT/runs: every path they get is absolute
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    try:
        if args.malloc_mmap_threshold is not None:
            check_threshold(args.malloc_mmap_threshold, "--malloc-mmap-threshold")
        hardware, threads, mmap_threshold = load_calibration(
            args.calibration or os.path.join(args.out, "calibration.json"), 2, args.malloc_mmap_threshold)
    except ValueError as error:
        parser.error(str(error))
    configs = [c for c in grid(args.smoke) if selected(c, args.only)]
    rows: List[Dict] = []
    for config in configs:
        row = {"group": config.group, "name": config.name, "ranks": config.ranks}
        for attempt in (1, 2):   # one retry: a run that aborts once (seen: at exit, after its last step) is rerun
            try:
                row.update(run_config(config, os.path.join(args.out, "runs"), args.iters, timeout=600, threads=threads,
                                      mmap_threshold=mmap_threshold))
                break
            except RuntimeError as error:
                if attempt == 2:
                    raise
                print(f"{config.name}: failed, rerunning once: {str(error).splitlines()[1:2]}", flush=True)
        row["attempts"] = attempt
        row["threads_per_rank"] = threads
        row["malloc_mmap_threshold"] = mmap_threshold
        row.update(predicted(config, hardware))
        row["step_ratio"] = row["step_s"] / row["pred_step_s"]
        row["cpu_ratio"] = row["cpu_step_s"] / row["pred_step_s"]
        row["memory_ratio"] = row["peak_mib"] / row["pred_rank0_mib"]   # rank 0's peak: rank 0's prediction
        print(f"{config.name:28s} measured {row['step_s']:.3f} s  predicted {row['pred_step_s']:.3f} s  "
              f"({row['step_ratio']:.2f}x)  [{row['wall_s']:.0f} s]", flush=True)
        rows.append(row)
    write_outputs(rows, args.out, hardware.name, mmap_threshold)
    plot(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
