"""The machine a run is planned for: one accelerator and the two networks between accelerators.

A :class:`Hardware` holds what the performance model reads, each figure from a data sheet:

    peak_tflops[dtype]     dense tensor-core (or vector) peak of one device
    hbm_gb, hbm_gbs        device memory: capacity and bandwidth
    intra_node             Link(bandwidth per direction per device in GB/s, latency in us): NVLink
    inter_node             Link(...): the network card(s) of one device (InfiniBand)
    gpus_per_node          devices that share the intra-node link
    num_sms                streaming multiprocessors (for GEMM tile and wave quantization); 0 = none
    gemm_efficiency        the fraction of peak a large, well-shaped GEMM reaches
    memory_efficiency      the fraction of the HBM bandwidth a streaming kernel reaches
    attention_efficiency   the fraction of peak the device's default fused attention kernel reaches on its FLOPs;
                           flash_attention_efficiency the same for FlashAttention-2 (``--attention-backend flash``)
    sustained_fraction     the share of the tensor-core rates (gemm_efficiency, attention_efficiency) a device
                           keeps through whole training steps; fitted to published runs (scaling/fit.py)
    matmul                 optional measured GEMM throughput by shape: (m, n, k, dtype, tflops, layout),
                           layout "nn", "nt" or "tn" (compute.Gemm)
    optimizer_bytes_per_s  optional measured Adam throughput: bytes per second, counting (32 + e) bytes per
                           parameter updated (fp32 grad, master, m, v, and the e-byte model copy)
    attention              optional measured attention core (SDPA and its copies) by shape:
                           (heads, s, d, dtype, forward_tflops, backward_tflops), calibration/ops.py
    elementwise            optional measured elementwise ops by size: (op, dtype, bytes, forward_gbs,
                           backward_gbs), effective GB/s on the bytes compute.py counts, calibration/ops.py
    overlaps_communication whether a collective issued beside compute costs no compute time (a GPU);
                           False for a calibrated CPU, whose collectives run on the ranks' own cores
    layer_overhead_s, micro_batch_overhead_s, step_overhead_s
                           the host's fixed cost per layer and micro-batch, per micro-batch and per
                           step, beyond the tables (calibration/overhead.py); 0 for the GPU presets

Presets: ``a100-40gb``, ``a100-80gb``, ``h100-sxm``, ``h200``; ``cpu`` is read from a calibration
JSON file (the schema of :func:`from_calibration`), and ``--cluster FILE.yaml`` overrides any field
of a preset (``load_hardware``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

__all__ = ["Link", "Hardware", "PRESETS", "from_calibration", "load_hardware", "with_overrides"]


@dataclass(frozen=True)
class Link:
    """A network as one device sees it: GB/s per direction, and the latency of one message (us).

    ``measured`` optionally holds (collective, gap s, GB/s, us) fitted to each collective alone on a
    machine whose library does not run the model's rings (gloo on a CPU, ``calibrate.py``), after
    ``gap`` seconds of compute: ranks drift apart while they compute, so a collective that follows
    a longer stretch of it waits longer for its peer.  A collective found there uses its own figures
    at the gap before it (``for_collective``: latency and seconds per byte linear in the gap between
    the measured gaps, constant beyond them), any other the link's.
    """

    bandwidth_gbs: float
    latency_us: float
    measured: Tuple[Tuple[str, float, float, float], ...] = ()

    def for_collective(self, name: str, gap_s: float = 0.0) -> "Link":
        rows = sorted((gap, 1.0 / bandwidth, latency) for collective, gap, bandwidth, latency in self.measured
                      if collective == name)
        if not rows:
            return self
        low = next((row for row in reversed(rows) if row[0] <= gap_s), rows[0])
        high = next((row for row in rows if row[0] >= gap_s), rows[-1])
        t = (gap_s - low[0]) / (high[0] - low[0]) if high[0] > low[0] else 0.0
        inverse_bw, latency = (a + t * (b - a) for a, b in zip(low[1:], high[1:]))
        return Link(1.0 / inverse_bw, latency)


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: Dict[str, float]
    hbm_gb: float
    hbm_gbs: float
    intra_node: Link
    inter_node: Link
    gpus_per_node: int = 8
    num_sms: int = 0
    gemm_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    # A fused (flash) attention kernel's share of peak on its FLOPs, forward and backward alike
    # (compute.py): the kernel ``--attention-backend`` auto and fused run on the device; a calibration's
    # measured SDPA table replaces it.
    attention_efficiency: float = 0.5
    # The same for Tri Dao's FlashAttention-2 (``--attention-backend flash``) where it differs from the
    # kernel above (0: the same).
    flash_attention_efficiency: float = 0.0
    # The share of the SMs an overlapped communication kernel holds while it runs (overlap.py): the
    # compute beside it runs on the rest.  0 where nothing overlaps.
    overlap_sm_fraction: float = 0.0
    # Whether the fused attention kernel applies attention dropout itself (GPU flash kernels do); where
    # not (torch's CPU SDPA), attention with dropout runs unfused, scores kept.
    fused_attention_dropout: bool = True
    # FP8 GEMMs' share of the FP8 peak, where it differs from gemm_efficiency's (0: the same).
    fp8_gemm_efficiency: float = 0.0
    # The share of the tensor-core rates above (GEMMs in any dtype, fused attention) that the device keeps
    # through whole training steps, which a kernel benchmark does not see: the clock a GPU holds at its
    # power limit under a sustained load, gaps between kernels, the small kernels the model does not list.
    # Not measured but fitted, once per chip, to one source of published end-to-end runs on it (scaling/fit.py);
    # 1 on a calibrated CPU, whose rates are measured on the machine.  Memory-bound work and communication
    # keep their own rates.
    sustained_fraction: float = 1.0
    matmul: Tuple[Tuple[int, int, int, str, float, str], ...] = field(default=())
    optimizer_bytes_per_s: Optional[float] = None
    attention: Tuple[Tuple[int, int, int, str, float, float], ...] = field(default=())
    elementwise: Tuple[Tuple[str, str, int, float, float], ...] = field(default=())
    # Whether communication can run beside compute without slowing it: a GPU's collectives run on
    # their own SMs and copy engines; a CPU rank's gloo threads share the rank's cores.
    overlaps_communication: bool = True
    # The host's fixed cost of a step beyond the tables' ops, in seconds (calibration/overhead.py):
    # per layer and micro-batch, per micro-batch, per step.  0 on a GPU, whose launches run ahead.
    layer_overhead_s: float = 0.0
    micro_batch_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    # A calibrated CPU: the runtime's own resident memory per rank (calibration/baseline.py), counted
    # with the model's bytes; and activations as PyTorch's CPU kernels save them (cpu_activations.py).
    # 0 and False on a GPU (its equivalent of the baseline, the CUDA context, is outside torch's
    # allocator and what megalite reports there; docs/scaling.md).
    runtime_bytes: float = 0.0
    cpu_activations: bool = False

    def fused_attention_efficiency(self, attention_backend: str) -> float:
        """The fused attention kernel's share of peak: FlashAttention-2's for ``flash`` where the device
        has its own figure, else the device's default fused kernel's."""
        if attention_backend == "flash" and self.flash_attention_efficiency:
            return self.flash_attention_efficiency
        return self.attention_efficiency

    def peak(self, dtype: str) -> float:
        """Peak TFLOP/s for ``dtype`` (float16 falls back to bfloat16's and the other way round)."""
        for name in (dtype, {"float16": "bfloat16", "bfloat16": "float16"}.get(dtype, dtype)):
            if name in self.peak_tflops:
                return self.peak_tflops[name]
        raise ValueError(f"hardware {self.name} has no peak TFLOP/s for {dtype}; "
                         f"add peak_tflops.{dtype} to the --cluster file")


# What `python -m megalite.scaling.fit` prints (rounded to 3 places), each chip's fraction fitted to one
# source: the A100's to Narayanan et al. 2021, Table 1; the H100's to Megatron-LM's H100 weak-scaling table.
# The tests refit both.
SUSTAINED_FRACTION_A100 = 0.896
SUSTAINED_FRACTION_H100 = 0.786

# Shared by the A100 SXM4 presets.  Sources: NVIDIA A100 Tensor Core GPU data sheet (2021):
# 312 TFLOP/s dense BF16/FP16 tensor core, 19.5 TFLOP/s FP32 (no TF32: torch's default), 108 SMs
# (A100 architecture white paper); NVLink 3 with NVSwitch: 600 GB/s total = 300 GB/s per direction;
# DGX A100 / Selene node: 8 GPUs and 8 x 200 Gb/s HDR InfiniBand = 25 GB/s per GPU (DGX A100 user
# guide).  Latencies: an NVLink/NVSwitch hop and an InfiniBand hop as NCCL's ring steps see them
# (order of magnitude from the NCCL tests' small-message times: ~5 us and ~10 us) -- assumed.
_A100 = dict(peak_tflops={"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
             intra_node=Link(300.0, 5.0), inter_node=Link(25.0, 10.0), gpus_per_node=8, num_sms=108,
             # Set once for the whole A100 family (not per model): cuBLAS's large bf16/fp16 GEMMs on an
             # A100 reach ~80% of the 312 TFLOP/s peak (NVIDIA's "Matrix Multiplication Background" guide
             # shows the plateau near 250 TFLOP/s); the value below is that plateau.
             gemm_efficiency=0.80,
             # Streaming kernels reach ~90% of the HBM bandwidth on A100 (the STREAM-like copy
             # figures vendors quote: ~1.8 of 2.0 TB/s) -- assumed, not fitted.
             memory_efficiency=0.90,
             # FlashAttention-2 (Dao 2023, Sec. 4.1) reaches 50-73% of the A100's peak on its own FLOPs
             # (causal half skipped), forward and backward together at head dim 64-128; the low end of that
             # range plus a margin for shorter sequences -- an assumption, not a fit to any table row.
             attention_efficiency=0.55,
             # NCCL runs one thread block per channel on an SM of its own; 16 channels (assumed: NCCL's
             # count on an 8-GPU NVLink node with one network card per GPU) of the 108 SMs.
             overlap_sm_fraction=16 / 108,
             # Fitted (scaling/fit.py) so that the median of Narayanan et al.'s Table 1 runs is predicted at
             # its published TFLOP/s; Korthikanti et al.'s rows and OPT-175B are held out of the fit.
             sustained_fraction=SUSTAINED_FRACTION_A100)


# Shared by the Hopper presets.  Data sheet (H100 SXM5, 2023): 989 TFLOP/s dense BF16/FP16, 1,979 dense
# FP8 (a hardware property: --fp8-format runs the linear layers' GEMMs there), 67 FP32, 132 SMs, NVLink 4
# at 900 GB/s total = 450 per direction; DGX H100: 8 x 400 Gb/s NDR per node = 50 GB/s per GPU.
_HOPPER = dict(peak_tflops={"bfloat16": 989.0, "float16": 989.0, "float32": 67.0, "fp8": 1979.0},
               intra_node=Link(450.0, 5.0), inter_node=Link(50.0, 10.0), gpus_per_node=8, num_sms=132,
               # Public measurements of the best torch.matmul over a brute-force search of shapes
               # ("Maximum Achievable Matmul FLOPS", Bekman, "Machine Learning Engineering", accelerator
               # chapter): A100 SXM 271.2 of 312 TFLOP/s (86.9%), H100 SXM 794.5 of 989 (80.3%) in BF16
               # and 1,402.6 of 1,979 (70.9%) in FP8.  The A100 presets' 0.80 is 0.92 of the A100's
               # best; the same 0.92 of the H100's: 0.74 BF16, 0.65 FP8 (the best shape is not every
               # shape a layer runs).  The A100's 0.80 itself is not reused.
               gemm_efficiency=0.74, fp8_gemm_efficiency=0.65,
               # Streaming copies reach ~90% of HBM3's 3.35 TB/s (~3.0-3.1 TB/s in public device-to-device
               # copy measurements), as on the A100.
               memory_efficiency=0.90,
               # Fused attention on H100 (Shah et al. 2024, "FlashAttention-3", backward speed at head
               # dimension 128, sequence 4k): cuDNN's fused kernel reaches 499 TFLOP/s, 0.50 of peak; it is
               # what Transformer Engine runs on Hopper when both it and FlashAttention apply (NeMo's
               # memory-optimization guide), so Megatron-LM's default.  FlashAttention-2 reaches 310,
               # 0.31.  The backward figures serve both passes, as on the A100; none is fitted to a row.
               attention_efficiency=0.50, flash_attention_efficiency=0.31,
               # Fitted (scaling/fit.py) so that the median of Megatron-LM's nine H100 weak-scaling runs
               # (README table, published.py) is predicted at its published TFLOP/s; the other H100 runs of
               # published.py are held out of the fit (docs/scaling.md).
               sustained_fraction=SUSTAINED_FRACTION_H100,
               overlap_sm_fraction=16 / 132)      # as on the A100: 16 channels, of the 132 SMs

PRESETS: Dict[str, Hardware] = {
    # A100 SXM4 40GB: HBM2, 1,555 GB/s (data sheet).
    "a100-40gb": Hardware("a100-40gb", hbm_gb=40.0, hbm_gbs=1555.0, **_A100),
    # A100 SXM4 80GB: HBM2e, 2,039 GB/s (data sheet).
    "a100-80gb": Hardware("a100-80gb", hbm_gb=80.0, hbm_gbs=2039.0, **_A100),
    # H100 SXM5 and H200 SXM: their own figures, not the A100's (_HOPPER below).
    "h100-sxm": Hardware("h100-sxm", hbm_gb=80.0, hbm_gbs=3350.0, **_HOPPER),
    # H200 SXM: the H100's compute with 141 GB HBM3e at 4.8 TB/s (H200 data sheet); same NVLink and NDR.
    "h200": Hardware("h200", hbm_gb=141.0, hbm_gbs=4800.0, **_HOPPER),
}


def from_calibration(document: dict, name: str = "cpu", memory_gb: Optional[float] = None) -> Hardware:
    """A Hardware from a calibration file's JSON::

        {"name": str, "peak_tflops": {"float32": f, "bfloat16": f},
         "matmul": [{"m": int, "n": int, "k": int, "dtype": "float32"|"bfloat16", "tflops": f,
                     "layout": "nn"|"nt"|"tn" (optional, default "nn")}, ...],
         "memory_bandwidth_gbs": f,
         "network": {"intra_node": {"bandwidth_gbs": f, "latency_us": f},
                     "inter_node": {"bandwidth_gbs": f, "latency_us": f}},
         "gpus_per_node": int, "optimizer_bytes_per_s": f (optional),
         "attention": [{"heads": int, "s": int, "d": int, "dtype": str, "forward_tflops": f,
                        "backward_tflops": f}, ...] (optional),
         "elementwise": [{"op": str, "dtype": str, "bytes": int, "forward_gbs": f, "backward_gbs": f}, ...]
                        (optional),
         "collectives": {"all_reduce": [{"gap_s": f, "bandwidth_gbs": f, "latency_us": f}, ...],
                         "all_gather": [...], "reduce_scatter": [...], "send_recv": [...]} (optional;
                         one fit per gap of compute before the call),
         "host_overhead": {"layer_s": f, "micro_batch_s": f, "step_s": f} (optional),
         "runtime_baseline": {"mib": f, ...} (optional; calibration/baseline.py),
         "memory_gb": f (optional; default the machine's RAM)}

    The measured figures ARE the efficiencies: gemm_efficiency and memory_efficiency stay 1.  Files
    without the optional tables load as before (the model then counts bytes at the memory bandwidth,
    and every collective at the network's joint fit).  The machine is one node: both links carry the
    per-collective fits.  Its ranks' collectives run on their cores, so nothing overlaps.
    """
    try:
        network = document["network"]
        matmul = _matmul_rows(document.get("matmul", []))
        attention = _attention_rows(document.get("attention", []))
        elementwise = _elementwise_rows(document.get("elementwise", []))
        measured = _collective_fits(document.get("collectives", {}))
        overhead = document.get("host_overhead", {})
        if memory_gb is None:
            memory_gb = float(document.get("memory_gb") or _system_memory_gb())
        return Hardware(
            name=str(document.get("name", name)),
            peak_tflops={k: float(v) for k, v in document["peak_tflops"].items()},
            hbm_gb=memory_gb, hbm_gbs=float(document["memory_bandwidth_gbs"]),
            intra_node=Link(float(network["intra_node"]["bandwidth_gbs"]), float(network["intra_node"]["latency_us"]),
                            measured),
            inter_node=Link(float(network["inter_node"]["bandwidth_gbs"]), float(network["inter_node"]["latency_us"]),
                            measured),
            gpus_per_node=int(document.get("gpus_per_node", 1)), num_sms=0, matmul=matmul,
            attention=attention, elementwise=elementwise, overlaps_communication=False,
            fused_attention_dropout=False,
            layer_overhead_s=float(overhead.get("layer_s", 0.0)),
            micro_batch_overhead_s=float(overhead.get("micro_batch_s", 0.0)),
            step_overhead_s=float(overhead.get("step_s", 0.0)),
            runtime_bytes=float(document.get("runtime_baseline", {}).get("mib", 0.0)) * 2**20, cpu_activations=True,
            optimizer_bytes_per_s=(float(document["optimizer_bytes_per_s"])
                                   if document.get("optimizer_bytes_per_s") else None))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"calibration file {name}: missing or malformed field {error}; expected the schema in "
                         f"megalite/scaling/hardware.py from_calibration") from None


def _collective_fits(collectives) -> tuple:
    """(name, gap s, GB/s, us) of each fit; a file from before the gaps holds one fit per collective
    (read at gap 0: the back-to-back timing it was)."""
    fits = tuple((str(name), float(fit.get("gap_s", 0.0)), float(fit["bandwidth_gbs"]), float(fit["latency_us"]))
                 for name, listed in collectives.items() for fit in (listed if isinstance(listed, list) else [listed]))
    for fit in fits:
        if not (fit[2] > 0 and fit[3] >= 0 and fit[1] >= 0):
            raise ValueError(f"collective fit {fit}: bandwidth must be positive, latency and gap not negative")
    return fits


def _matmul_rows(rows) -> tuple:
    return tuple((int(r["m"]), int(r["n"]), int(r["k"]), str(r["dtype"]), float(r["tflops"]),
                   str(r.get("layout", "nn"))) for r in rows)


def _attention_rows(rows) -> tuple:
    table = tuple((int(r["heads"]), int(r["s"]), int(r["d"]), str(r["dtype"]), float(r["forward_tflops"]),
                   float(r["backward_tflops"])) for r in rows)
    for row in table:
        if min(row[4:]) <= 0:
            raise ValueError(f"attention row {row}: rates must be positive")
    return table


def _elementwise_rows(rows) -> tuple:
    table = tuple((str(r["op"]), str(r["dtype"]), int(r["bytes"]), float(r["forward_gbs"]), float(r["backward_gbs"]))
                  for r in rows)
    for row in table:
        if min(row[2:]) <= 0:
            raise ValueError(f"elementwise row {row}: bytes and rates must be positive")
    return table


def _system_memory_gb() -> float:
    try:
        import os
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 16.0


def with_overrides(hardware: Hardware, overrides: dict, source: str = "--cluster") -> Hardware:
    """``hardware`` with the fields of ``overrides`` replaced (links and peaks as nested mappings; a link
    given there replaces a calibration's per-collective fits too: its figures are then the link's)."""
    known = {f.name for f in dataclasses.fields(Hardware)}
    changes = {}
    for key, value in overrides.items():
        key = str(key).replace("-", "_")
        if key not in known:
            raise ValueError(f"{source}: {key!r} is not a hardware field; use one of {', '.join(sorted(known))}")
        if key in ("intra_node", "inter_node"):
            old = getattr(hardware, key)
            value = Link(float(value.get("bandwidth_gbs", old.bandwidth_gbs)),
                         float(value.get("latency_us", old.latency_us)))
        elif key == "peak_tflops":
            value = {**hardware.peak_tflops, **{k: float(v) for k, v in value.items()}}
        elif key == "matmul":
            value = _matmul_rows(value)
        elif key == "attention":
            value = _attention_rows(value)
        elif key == "elementwise":
            value = _elementwise_rows(value)
        changes[key] = value
    return dataclasses.replace(hardware, **changes)


def load_hardware(gpu: str, gpus_per_node: Optional[int] = None, cluster: Optional[str] = None,
                  calibration: Optional[str] = None) -> Hardware:
    """The preset ``gpu`` (or, for ``cpu``, the calibration file), then ``--cluster`` YAML overrides."""
    if gpu == "cpu":
        if calibration is None:
            raise ValueError("--gpu cpu reads its figures from a calibration file: pass --calibration FILE.json "
                             "(write one with --calibrate FILE.json)")
        try:
            with open(calibration) as f:
                hardware = from_calibration(json.load(f), calibration)
        except OSError as error:
            raise ValueError(f"--calibration {calibration}: {error.strerror}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"--calibration {calibration} is not JSON: {error}") from None
    elif gpu in PRESETS:
        hardware = PRESETS[gpu]
    else:
        raise ValueError(f"--gpu {gpu} is not known; choose one of {', '.join(list(PRESETS) + ['cpu'])}, "
                         f"or describe it with --cluster FILE.yaml over the nearest preset")
    if cluster is not None:
        import yaml
        try:
            with open(cluster) as f:
                document = yaml.safe_load(f) or {}
        except OSError as error:
            raise ValueError(f"--cluster {cluster}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise ValueError(f"--cluster {cluster} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(document, dict):
            raise ValueError(f"--cluster {cluster} must hold a mapping of hardware fields")
        hardware = with_overrides(hardware, document, f"--cluster {cluster}")
    if gpus_per_node is not None:
        if gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node {gpus_per_node} must be at least 1")
        hardware = dataclasses.replace(hardware, gpus_per_node=gpus_per_node)
    return hardware
