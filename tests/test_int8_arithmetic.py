"""The CPU's INT8 arithmetic itself, independent of any model: one fused Q/DQ MatMul with extreme
operands against exact integer arithmetic, on the machine the test runs on (runtime/int8_arithmetic.py)."""

from __future__ import annotations

import numpy as np
import pytest
from jfexport.export.quantize.qdq import quantize_weight
from jfexport.runtime.int8_arithmetic import LEGACY_WEIGHT_MAX, MATMUL_TOLERANCE, WEIGHT_MAX, describe_cpu, int8_isa, matmul_error

# Kernel families that sum u8 x s8 pairs in a saturating int16 (vpmaddubsw): full-range weights overflow there.
SATURATING = ("avx2", "avx512", "sse")


def test_the_scheme_the_build_uses_is_exact_on_this_cpu():
    assert matmul_error(WEIGHT_MAX) <= MATMUL_TOLERANCE, describe_cpu()


def test_the_probe_catches_saturation_on_a_cpu_without_int32_dot_products():
    # On AVX2 / AVX-512 without VNNI the full-range scheme must come out far off, or the probe guards nothing.
    # Elsewhere (VNNI, AMX, ARM dot product) ORT documents no saturation; the runtime trusts the probe there too.
    cpu = describe_cpu()
    if cpu["isa"] not in SATURATING:
        pytest.skip(f"{cpu['model']} ({cpu['isa']}) has int32 dot products: nothing saturates to catch")
    assert matmul_error(LEGACY_WEIGHT_MAX) > 0.1, cpu


def test_weight_bound_is_the_largest_that_cannot_overflow_an_int16_pair_sum():
    # u8 activations reach 255; two products of one pair must stay within int16.
    assert 2 * 255 * WEIGHT_MAX <= 32767 < 2 * 255 * (WEIGHT_MAX + 1)


def test_quantized_weights_stay_within_the_bound_and_keep_the_extremes():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32) * rng.uniform(0.01, 10, 32).astype(np.float32)
    q, scale = quantize_weight(w)
    assert q.dtype == np.int8 and np.abs(q).max() == WEIGHT_MAX
    assert (np.abs(q).max(axis=0) == WEIGHT_MAX).all()  # each channel's largest weight maps onto the bound
    assert (np.abs(q * scale - w) <= scale * (0.5 + 1e-5)).all()  # round to nearest: half a step at most


@pytest.mark.parametrize("machine,flags,isa", [
    ("x86_64", {"avx2"}, "avx2"),
    ("x86_64", {"avx2", "avx512bw"}, "avx512"),
    ("x86_64", {"avx2", "avx512bw", "avx512_vnni"}, "avx512-vnni"),
    ("x86_64", {"avx2", "avx_vnni"}, "avx-vnni"),
    ("x86_64", {"avx2", "avx512bw", "avx512_vnni", "amx_int8"}, "amx"),
    ("x86_64", set(), "sse"),
    ("aarch64", {"asimd", "asimddp"}, "arm64-dotprod"),
    ("aarch64", {"asimd"}, "arm64"),
])
def test_isa_names_the_integer_kernel_family(machine, flags, isa):
    assert int8_isa(machine, flags) == isa


def test_this_cpu_is_described_for_the_manifest():
    cpu = describe_cpu()
    assert set(cpu) == {"machine", "model", "isa", "flags"} and all(cpu[k] for k in ("machine", "model", "isa"))
