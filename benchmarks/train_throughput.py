"""Training throughput: megalite against Hugging Face transformers on the same model and tokens.

    python -m benchmarks.train_throughput                  # GPT-2 small and LLaMA-style 0.85B, bf16, on CUDA
    python -m benchmarks.train_throughput --models llama --steps 30
    python -m benchmarks.train_throughput --quick          # tiny shapes, fp32, a smoke run in seconds (CPU here)

Contenders, each in its own process (a fresh interpreter per model and contender), so that peak
memory and allocator state are each its own:

- megalite: its real training path, ``megalite.training.loop.setup`` with Megatron flags, then
  ``train_step`` per step (bf16 parameters, fp32 gradient buffer and master weights, megalite's AdamW);
- megalite-compile: the same with ``--compile`` (each transformer layer under torch.compile with
  inductor; compilation happens in the warm-up steps);
- hf-eager: ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` built from a config (random init, nothing
  from a hub) with ``attn_implementation="sdpa"``, trained as a PyTorch user would: fp32 weights
  under bf16 autocast (what ``Trainer(bf16=True)`` does), loss in fp32, clipping at 1.0, torch's
  AdamW (fused on CUDA);
- hf-compile: the same under ``torch.compile`` (compilation happens in the warm-up steps).

Every contender trains on the same token ids: megalite's mock samples (``MockGPTDataset`` with
megalite's default seed, in the sampler's order), which the peers read from the same dataset.
The optimizer hyper-parameters are megalite's defaults (lr 3e-4, betas 0.9/0.999, eps 1e-8,
weight decay 0.01, clip 1.0) on both sides.

Reported per contender: tokens/s and step time (median of the timed steps; warm-up steps are not
timed), peak memory (CUDA: max allocated; CPU: the process's peak RSS, which also counts each
side's imported libraries -- transformers adds ~100 MiB) and MFU.  MFU uses
megalite's model-FLOP count (megalite/model/flops.py) for every contender, so the MFU ratio is
the throughput ratio; it counts megalite's padded vocabulary (50304 for GPT-2), which megalite
computes and the peers (50257) do not.  The table's ratio is ours / peer (each megalite variant
against each peer): above 1 is better for megalite in tokens/s and MFU, below 1 in step time and memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import List

# name -> (Megatron flags, micro-batch); the LLaMA shape is ~0.85B parameters.
MODELS = {
    "gpt2": (["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
              "--seq-length", "1024", "--max-position-embeddings", "1024", "--vocab-size", "50257"], 8),
    "llama": (["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "16",
               "--group-query-attention", "--num-query-groups", "4", "--ffn-hidden-size", "5632", "--swiglu",
               "--normalization", "RMSNorm", "--position-embedding-type", "rope",
               "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--vocab-size", "32000",
               "--seq-length", "2048", "--max-position-embeddings", "2048"], 4),
}
# The same architectures at toy size: every code path, a few milliseconds a step.
QUICK_MODELS = {
    "gpt2": (["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--seq-length", "64", "--max-position-embeddings", "64", "--vocab-size", "512"], 2),
    "llama": (["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
               "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "176", "--swiglu",
               "--normalization", "RMSNorm", "--position-embedding-type", "rope",
               "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--vocab-size", "512",
               "--seq-length", "64", "--max-position-embeddings", "64"], 2),
}
OURS = ("megalite", "megalite-compile")
PEERS = ("hf-eager", "hf-compile")
# What the table shows per metric: (key in a worker's result, label, format).
METRICS = [("tokens_per_s", "tokens/s", "{:,.0f}"), ("step_ms", "step ms (median)", "{:.1f}"),
           ("peak_mib", "peak memory MiB", "{:,.0f}"), ("mfu", "MFU %", "{:.2f}")]


def megalite_argv(model: str, quick: bool, steps: int, bf16: bool) -> List[str]:
    flags, micro_batch = (QUICK_MODELS if quick else MODELS)[model]
    argv = flags + ["--micro-batch-size", str(micro_batch), "--global-batch-size", str(micro_batch),
                    "--mock-data", "--train-iters", str(steps), "--eval-iters", "0",
                    "--hidden-dropout", "0", "--attention-dropout", "0", "--lr-decay-style", "constant",
                    "--log-interval", str(10 ** 6)]
    return argv + (["--bf16"] if bf16 else [])


# -- one contender, in its own process ---------------------------------------------------------------
def _device():
    import torch
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _synchronize(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device) -> float:
    import resource

    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _time_steps(step, warmup: int, steps: int, device) -> List[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def run_megalite(argv: List[str], warmup: int, steps: int) -> dict:
    import torch

    from megalite.training.loop import setup, train_step
    run = setup(argv)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    losses = []
    times = _time_steps(lambda: losses.append(train_step(run)["loss"]), warmup, steps, run.device)
    return {"step_s": times, "peak_mib": _peak_mib(run.device), "first_loss": losses[0], "last_loss": losses[-1]}


def _hf_model(model_cfg):
    """The transformers model with megalite's architecture, built from a config (random init)."""
    import transformers

    common = dict(vocab_size=model_cfg.vocab_size,
                  tie_word_embeddings=not model_cfg.untie_embeddings_and_output_weights)
    if model_cfg.position_embedding_type == "learned_absolute":
        config = transformers.GPT2Config(n_embd=model_cfg.hidden_size, n_layer=model_cfg.num_layers,
                                         n_head=model_cfg.num_attention_heads, n_inner=model_cfg.ffn_hidden_size,
                                         n_positions=model_cfg.max_position_embeddings,
                                         layer_norm_epsilon=model_cfg.norm_epsilon, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, **common)
        model_class = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(hidden_size=model_cfg.hidden_size, num_hidden_layers=model_cfg.num_layers,
                                          num_attention_heads=model_cfg.num_attention_heads,
                                          num_key_value_heads=model_cfg.num_query_groups,
                                          intermediate_size=model_cfg.ffn_hidden_size, hidden_act="silu",
                                          max_position_embeddings=model_cfg.max_position_embeddings,
                                          rms_norm_eps=model_cfg.norm_epsilon, rope_theta=model_cfg.rotary_base,
                                          attention_bias=False, mlp_bias=False, attention_dropout=0.0, **common)
        model_class = transformers.LlamaForCausalLM
    config._attn_implementation = "sdpa"
    return model_class(config)


def run_hf(argv: List[str], warmup: int, steps: int, compiled: bool) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from megalite.data.gpt_dataset import MockGPTDataset
    from megalite.training.arguments import parse_args
    model_cfg, _, opt_cfg, _, train_cfg = parse_args(argv, world_size=1)
    device = _device()
    torch.manual_seed(model_cfg.seed)
    model = _hf_model(model_cfg).to(device).train()
    # Same tokens as megalite: its mock dataset with its seed, read in the sampler's order (one DP rank).
    micro_batch = train_cfg.micro_batch_size
    dataset = MockGPTDataset(model_cfg.vocab_size, model_cfg.seq_length, micro_batch * (warmup + steps), model_cfg.seed)
    samples = iter(range(len(dataset)))

    def next_batch():
        items = [dataset[next(samples)] for _ in range(micro_batch)]
        return [torch.from_numpy(np.stack([item[key] for item in items])).to(device) for key in ("tokens", "labels")]

    def loss_of(tokens, labels):
        logits = model(input_ids=tokens).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1))
    forward = torch.compile(loss_of) if compiled else loss_of
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.adam_beta1, opt_cfg.adam_beta2),
                                  eps=opt_cfg.adam_eps, weight_decay=opt_cfg.weight_decay,
                                  fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opt_cfg.bf16)
    losses = []

    def step():
        tokens, labels = next_batch()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = forward(tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_grad)
        optimizer.step()
        losses.append(float(loss))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = _time_steps(step, warmup, steps, device)
    return {"step_s": times, "peak_mib": _peak_mib(device), "first_loss": losses[0], "last_loss": losses[-1]}


def worker(args) -> None:
    argv = json.loads(args.worker_argv)
    if args.worker in OURS:
        result = run_megalite(argv + (["--compile"] if args.worker == "megalite-compile" else []),
                              args.warmup, args.steps)
    else:
        result = run_hf(argv, args.warmup, args.steps, compiled=args.worker == "hf-compile")
    print("RESULT " + json.dumps(result), flush=True)


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # where -m finds benchmarks


# -- the driver ----------------------------------------------------------------------------------------
def run_contender(name: str, argv: List[str], args) -> dict:
    command = [sys.executable, "-m", "benchmarks.train_throughput", "--worker", name, "--worker-argv", json.dumps(argv),
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.contender_timeout, cwd=REPOSITORY)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within --contender-timeout {args.contender_timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        return {"error": f"exit status {done.returncode}:\n{tail}"}
    return json.loads(lines[-1][len("RESULT "):])


def summarize(result: dict, tokens_per_step: int, flops_per_step: float, peak_tflops: float) -> dict:
    step_s = statistics.median(result["step_s"])
    return {"tokens_per_s": tokens_per_step / step_s, "step_ms": 1e3 * step_s, "peak_mib": result["peak_mib"],
            "mfu": 100 * flops_per_step / step_s / 1e12 / peak_tflops}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_line(bf16: bool, args) -> str:
    import torch
    if torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    else:
        where = f"{_cpu_name()}, {torch.get_num_threads()} threads"
    try:
        import transformers
        peer = f"transformers {transformers.__version__}"
    except ImportError:
        peer = "transformers not installed"
    return (f"# machine: {where}; torch {torch.__version__}, {peer}, Python {platform.python_version()}; "
            f"{'bf16' if bf16 else 'fp32'}; median of {args.steps} timed steps after {args.warmup} warm-up steps")


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    if args.worker:
        worker(args)
        return 0

    import torch

    models = _chosen_models(parser, args)
    # --quick on a CPU stays in fp32 (bf16 matmuls on a CPU without AMX are slow emulation).
    bf16 = not args.quick or torch.cuda.is_available()
    peers = _chosen_peers(parser, args)
    ours = _chosen_ours(parser, args)
    print(machine_line(bf16, args))
    rows = []
    failed = False
    for model in models:
        results, model_failed = _run_model(model, ours, peers, bf16, args)
        failed = failed or model_failed
        rows += _ratio_rows(model, results, ours, peers)
    _print_table(rows)
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt2,llama", help="comma-separated: gpt2, llama")
    parser.add_argument("--ours", default=None,
                        help=f"comma-separated from {OURS} (default: all; megalite with --quick)")
    parser.add_argument("--peers", default=None,
                        help=f"comma-separated from {PEERS} (default: all; hf-eager with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="toy shapes in fp32: a smoke run")
    parser.add_argument("--contender-timeout", type=float, default=None,
                        help="seconds per contender process; one that takes longer is reported as failed and "
                             "the others' rows still print (scripts/gpu_check.sh uses it)")
    parser.add_argument("--worker", choices=OURS + PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-argv", help=argparse.SUPPRESS)
    return parser


def _chosen_models(parser, args) -> List[str]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models {','.join(unknown)}: not one of {','.join(MODELS)}")
    return models


def _chosen_peers(parser, args) -> List[str]:
    if args.peers is None:
        peers = ["hf-eager"] if args.quick else list(PEERS)
        if args.quick:
            print("note: --quick leaves out hf-compile (its compilation would take longer than the run; "
                  "--peers hf-eager,hf-compile to include it)")
        return peers
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if any(p not in PEERS for p in peers):
        parser.error(f"--peers {args.peers}: each must be one of {','.join(PEERS)}")
    return peers


def _chosen_ours(parser, args) -> List[str]:
    ours = ["megalite"] if args.quick else list(OURS)
    if args.ours is not None:
        ours = [o.strip() for o in args.ours.split(",") if o.strip()]
        if not ours or any(o not in OURS for o in ours):
            parser.error(f"--ours {args.ours}: each must be one of {','.join(OURS)}")
    return ours


def _run_model(model: str, ours: List[str], peers: List[str], bf16: bool, args) -> tuple:
    """(contender -> its summarized metrics, whether any contender failed) of one model; a line per contender."""
    from megalite.model.flops import default_peak_tflops, flops_per_iteration
    from megalite.training.arguments import parse_args
    argv = megalite_argv(model, args.quick, args.warmup + args.steps, bf16)
    model_cfg, parallel_cfg, _, _, train_cfg = parse_args(argv, world_size=1)
    tokens_per_step = train_cfg.global_batch_size * model_cfg.seq_length
    flops = flops_per_iteration(model_cfg, train_cfg.global_batch_size, tp=parallel_cfg.tensor_model_parallel_size)
    peak = default_peak_tflops(bf16)
    results = {}
    failed = False
    # megalite's eager path and the peers first: the hand-written path against HF compiled is the
    # comparison the targets name, so under a step's time limit --compile's row is the one cut.
    for name in [o for o in ours if o == "megalite"] + peers + [o for o in ours if o != "megalite"]:
        started = time.perf_counter()
        raw = run_contender(name, argv, args)
        if "error" in raw:
            print(f"{model} {name} failed ({time.perf_counter() - started:.0f} s): {raw['error']}")
            failed = True
            continue
        results[name] = summarize(raw, tokens_per_step, flops, peak)
        print(f"{model} {name}: " + ", ".join(f"{fmt.format(results[name][key])} {label}"
                                               for key, label, fmt in METRICS)
              + f"; loss {raw['first_loss']:.3f} -> {raw['last_loss']:.3f}, "
              f"{time.perf_counter() - started:.0f} s in all", flush=True)
    return results, failed


def _ratio_rows(model: str, results: dict, ours: List[str], peers: List[str]) -> List[tuple]:
    """The table's rows of one model: each metric of each megalite variant against each peer that ran."""
    rows = []
    for mine in ours:
        for peer in peers:
            if mine not in results or peer not in results:
                continue
            for key, label, fmt in METRICS:
                value, theirs = results[mine][key], results[peer][key]
                rows.append((model, label, mine, fmt.format(value), peer, fmt.format(theirs),
                             f"{value / theirs:.2f}" if theirs else "-"))
    return rows


def _print_table(rows: List[tuple]) -> None:
    header = ("model", "what", "ours", "value", "peer", "peer value", "ratio")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
    print("ratio = ours / peer: above 1 is better for megalite in tokens/s and MFU, below 1 in step ms and memory")


if __name__ == "__main__":
    sys.exit(main())
