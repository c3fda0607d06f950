"""csrc/cuda/launch_plan.h -- the CUDA launchers' shared-memory and grid decisions -- compiled with the
host compiler (the header has no CUDA in it) and checked on the CPU for every hidden size from 1 to
16,384 against the limits of each architecture.

The register-cached norm backward keeps one fp32 accumulator per column (two for LayerNorm) in
dynamic shared memory next to block_sum2's static arrays (272 bytes as nvcc lays them out; the
tests also try other sizes).  A block may use 48 KiB without opting in, and up to the device's
opt-in limit after cudaFuncSetAttribute(MaxDynamicSharedMemorySize); past that the general
kernels must take the shape.  The limits below are those cudaDeviceGetAttribute reports
(MaxSharedMemoryPerBlock, ...PerBlockOptin, MaxGridDimX, MaxGridDimY)."""
import functools
import subprocess

import pytest

from tests.ops.host_driver import build

KIB = 1024
GRID_X, GRID_Y = 2 ** 31 - 1, 65535
ARCHS = {"sm_61": (48 * KIB, 48 * KIB), "sm_70": (48 * KIB, 96 * KIB), "sm_75": (48 * KIB, 64 * KIB),
         "sm_80": (48 * KIB, 163 * KIB), "sm_86": (48 * KIB, 99 * KIB), "sm_90": (48 * KIB, 227 * KIB)}
STATIC_BYTES = 272


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build("launch_plan_driver.cpp", tmp_path_factory.mktemp("launch_plan"))


@functools.lru_cache(maxsize=None)
def decisions(binary, static_bytes=STATIC_BYTES):
    """The driver's lines by kind, fields parsed (the architecture's name kept as a string)."""
    args = [f"{name}:{default}:{optin}:{GRID_X}:{GRID_Y}" for name, (default, optin) in ARCHS.items()]
    out = subprocess.run([str(binary), str(static_bytes), *args], check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        kind, *fields = line.split()
        rows.setdefault(kind, []).append([fields[0]] + [int(f) for f in fields[1:]] if kind in ("shared", "grid")
                                         else [int(f) for f in fields])
    return rows


def launched_bytes_problem(arch, static_bytes, dynamic, opted_in):
    """Why a launch of this shared memory fails on arch (None when it launches): over the opt-in
    limit, or over the default limit without the opt-in."""
    default, optin = ARCHS[arch]
    total = static_bytes + dynamic
    if total > optin:
        return f"{total} bytes > the opt-in limit {optin}"
    if total > default and not opted_in:
        return f"{total} bytes > the default limit {default} without the opt-in"
    return None


def old_decision(cols, rms):
    """The arithmetic the launcher had: the dynamic bytes alone compared with 48 KiB, the opt-in only
    above that, and every cached shape launched with the cached kernel."""
    dynamic = (1 if rms else 2) * cols * 4
    return dynamic, dynamic > 48 * KIB


@pytest.mark.parametrize("static_bytes", [0, STATIC_BYTES, 1024])
def test_cached_backward_never_exceeds_the_limits(driver, static_bytes):
    checked = 0
    for arch, rms, width, cols, cached, fits, optin, dynamic, threads, per_thread in decisions(driver, static_bytes)[
            "shared"]:
        assert dynamic == (1 if rms else 2) * cols * 4
        if not (cached and fits):
            continue   # the general kernels run
        assert launched_bytes_problem(arch, static_bytes, dynamic, optin) is None, (arch, rms, width, cols)
        assert optin == (static_bytes + dynamic > ARCHS[arch][0])   # opting in only where needed
        assert 0 < threads <= 512 and threads % 32 == 0 and threads * per_thread * width >= cols
        checked += 1
    assert checked > 10000


def test_cached_path_kept_wherever_it_fits(driver):
    """The new check is exact, not merely safe: every cached shape that fits takes the cached kernel
    (LayerNorm at 8,192 columns on sm_80/86/90 with the opt-in), and exactly the sizes that do not
    fit go to the general kernels: LayerNorm from 6,112 columns on sm_61, from 8,160 on sm_75."""
    fallback = {}
    for arch, rms, width, cols, cached, fits, optin, dynamic, _, _ in decisions(driver)["shared"]:
        assert fits == (STATIC_BYTES + dynamic <= ARCHS[arch][1])
        if cached and not fits:
            fallback.setdefault((arch, rms), []).append(cols)
    assert min(fallback[("sm_61", 0)]) == 6112 and min(fallback[("sm_75", 0)]) == 8160
    assert set(fallback) == {("sm_61", 0), ("sm_75", 0)}   # RMSNorm (one accumulator row) always fits


@pytest.mark.parametrize("cols", [6112, 6120, 6128, 6136, 6144])
def test_old_arithmetic_fails_at_hidden_6144(driver, cols):
    """At 6,112-6,144 columns LayerNorm's accumulators are 47.75-48 KiB: the old check, on the dynamic
    part alone, asked for no opt-in, and with the 272 static bytes the launch exceeds 48 KiB on every
    architecture (so it did not run, and dx stayed uninitialized).  The new plan opts in."""
    dynamic, opted_in = old_decision(cols, rms=False)
    for arch in ARCHS:
        assert launched_bytes_problem(arch, STATIC_BYTES, dynamic, opted_in) is not None
    new = {(arch, width): (fits, optin) for arch, rms, width, c, cached, fits, optin, *_ in decisions(driver)["shared"]
           if c == cols and not rms}
    for arch in ARCHS:
        fits, optin = new[(arch, 8)]
        assert (fits, optin) == ((False, True) if arch == "sm_61" else (True, True)), arch


def test_old_arithmetic_fails_above_the_opt_in_limit(driver):
    """On sm_75 (64 KiB opt-in) LayerNorm at 8,160-8,192 columns and on sm_61 (no opt-in) above 6,110
    exceed what any block may have: the old arithmetic launched them anyway; the plan sends them to
    the general kernels."""
    new = {(arch, c): fits for arch, rms, width, c, cached, fits, *_ in decisions(driver)["shared"]
           if width == 8 and not rms}
    for arch, cols in (("sm_75", 8160), ("sm_75", 8192), ("sm_61", 6112), ("sm_61", 8192)):
        dynamic, opted_in = old_decision(cols, rms=False)
        assert launched_bytes_problem(arch, STATIC_BYTES, dynamic, opted_in) is not None
        assert not new[(arch, cols)], (arch, cols)


def test_column_reduction_splits_total_for_every_shape(driver):
    """Zero columns or rows give one split (the old arithmetic divided by the zero column tiles);
    otherwise 1..256 splits, no more than the row groups of 8."""
    for rows, cols, splits in decisions(driver)["splits"]:
        assert 1 <= splits <= min(256, max(1, (rows + 7) // 8)), (rows, cols, splits)
    with pytest.raises(ZeroDivisionError):   # the old formula at cols == 0
        (1024 + 0 - 1) // ((0 + 31) // 32)


def test_grids_stay_within_the_device_limits(driver):
    rows = decisions(driver)
    for arch, count, fits in rows["grid"]:
        assert fits == (count <= GRID_X), (arch, count)
    for count, sms, per_sm, threads, blocks, max_blocks in rows["blocks"]:
        assert 1 <= blocks <= min(count, max_blocks, sms * max(per_sm, 1)), (count, per_sm, threads)
        assert blocks <= GRID_X
    for work, threads, cap, blocks in rows["stride"]:
        assert 1 <= blocks <= cap and (blocks == cap or blocks * threads >= work)
