"""The CPU norms' output cache (csrc/cpu/output_cache.h): outputs of 4 MiB and more come from kept,
2 MiB-aligned blocks, reused for the next output of the same rounded size; small ones from PyTorch."""
import os
import subprocess
import sys

import pytest
import torch

from megalite.ops import layer_norm, reference, rms_norm

native = pytest.importorskip("megalite._C", reason="the C++ CPU extension is not built")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cache maps memory on Linux only")

BLOCK = 2 << 20
ROWS, COLS = 1024, 1536          # fp32: 6 MiB, a cached size (rounded to 3 blocks)


@pytest.fixture
def cache():
    """The cache, emptied first and given back its limit after the test."""
    limit = native.output_cache_stats()["limit_bytes"]
    native.set_output_cache_limit(0)
    native.set_output_cache_limit(limit)
    yield native
    native.set_output_cache_limit(limit)


def forward(x, weight, bias):
    return torch.ops.megalite.layer_norm_forward(x, weight, bias, 1e-5)[0]


def inputs(rows=ROWS, cols=COLS, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for shape in ((rows, cols), (cols,), (cols,))]


def test_a_freed_output_is_reused_for_the_same_size(cache):
    x, weight, bias = inputs()
    y = forward(x, weight, bias)
    first, before = y.data_ptr(), cache.output_cache_stats()
    assert first % BLOCK == 0
    del y
    after_free = cache.output_cache_stats()
    assert after_free["cached_blocks"] == before["cached_blocks"] + 1
    assert after_free["cached_bytes"] == before["cached_bytes"] + 3 * BLOCK
    y = forward(x, weight, bias)
    assert y.data_ptr() == first
    assert cache.output_cache_stats()["hits"] == before["hits"] + 1


def test_small_outputs_come_from_pytorch(cache):
    x, weight, bias = inputs(rows=64)                       # 384 KiB
    before = cache.output_cache_stats()
    y = forward(x, weight, bias)
    del y
    after = cache.output_cache_stats()
    assert (after["hits"], after["misses"], after["cached_blocks"]) == \
           (before["hits"], before["misses"], before["cached_blocks"])


def test_the_limit_bounds_the_unused_blocks(cache):
    x, weight, bias = inputs()
    cache.set_output_cache_limit(3 * BLOCK)                 # room for one output
    outputs = [forward(x, weight, bias) for _ in range(3)]
    del outputs
    stats = cache.output_cache_stats()
    assert stats["cached_blocks"] == 1 and stats["cached_bytes"] == 3 * BLOCK
    cache.set_output_cache_limit(0)
    assert cache.output_cache_stats()["cached_bytes"] == 0
    with pytest.raises(ValueError, match="-1"):
        cache.set_output_cache_limit(-1)


def test_reused_blocks_give_the_reference_results_for_every_output(cache):
    """A reused block holds the last output's values: every element must be written again."""
    for seed, dtype in enumerate((torch.float32, torch.bfloat16, torch.float32)):
        x, weight, bias = inputs(cols=4096, dtype=dtype, seed=seed)    # 16 / 8 MiB
        x.requires_grad_()
        weight.requires_grad_()
        bias.requires_grad_()
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        for norm, ref, args in ((layer_norm, reference.layer_norm, (weight, bias)),
                                (rms_norm, reference.rms_norm, (weight,))):
            y = norm(x, *args, 1e-5)
            y.backward(dy)
            got = [y.detach(), x.grad]
            x.grad = None
            y_ref = ref(x, *args, 1e-5)
            y_ref.backward(dy)
            want = [y_ref.detach(), x.grad]
            x.grad = weight.grad = bias.grad = None
            # bf16: one unit in the last place (2^-7 relative), which fp32 round-off can tip either way
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **tol)
    assert cache.output_cache_stats()["hits"] > 0


def test_a_cached_output_is_an_ordinary_tensor(cache, tmp_path):
    x, weight, bias = inputs()
    y = forward(x, weight, bias)
    expected = y.clone()
    y.resize_(ROWS + 512, COLS)                             # a larger storage, through the same allocator
    torch.testing.assert_close(y[:ROWS], expected, rtol=0, atol=0)
    z = forward(x, weight, bias).share_memory_()
    assert z.is_shared()
    torch.testing.assert_close(z, expected, rtol=0, atol=0)
    torch.save(z, tmp_path / "y.pt")
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("value, error", [("512", None), ("-5", "'-5' is not a whole number of MiB")])
def test_the_environment_sets_the_limit(value, error):
    """Read once per process, at the cache's first use: checked in a fresh interpreter.  A bad value is
    a RuntimeError from the norm and from the cache's own functions, not a crash."""
    script = ("import torch, megalite._C as C\n"
              "for call in (lambda: torch.ops.megalite.rms_norm_forward(torch.ones(1024, 2048), torch.ones(2048), 1e-5),\n"  # noqa: E501 (a script)
              "             lambda: print(C.output_cache_stats()['limit_bytes'])):\n"
              "    try:\n"
              "        call()\n"
              "    except RuntimeError as e:\n"
              "        print('error:', e)\n")
    env = dict(os.environ, MEGALITE_CPU_OUTPUT_CACHE_MB=value)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if error is None:
        assert int(result.stdout) == int(value) << 20
    else:
        lines = result.stdout.splitlines()
        assert len(lines) == 2 and all(line.startswith("error:") and error in line for line in lines), lines
