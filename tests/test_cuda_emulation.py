"""The CPU emulation of the CUDA kernels (csrc/cuda/emulation.h, rnnkern._cuda_emulated) itself:
what the kernel tests run on must be right before they can mean anything.

- Its float16 / bfloat16 conversions are bit-exact against torch's round-to-nearest-even
  (every float16 and bfloat16 value, the midpoints between neighbours, overflow, subnormals,
  NaN), since the kernels read 16-bit inputs and write 16-bit outputs through them.
- A barrier that not every thread of a block reaches is an error naming the block, not a hang;
  a write past a block's shared memory is an error too, and so is a misaligned load (a fault
  on the GPU).
- Emulated device properties reach the launchers' plans, and an emulated launch checks the
  grid against them as a cooperative launch does.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_KERNELS_REASON

from rnnkern.backends import cuda_emulation

pytestmark = pytest.mark.skipif(
    CUDA_KERNELS_REASON is not None and cuda_emulation.unavailable_reason() is not None,
    reason=f"the emulation cannot be built here: {cuda_emulation.unavailable_reason()}",
)


def _float32_probe() -> torch.Tensor:
    """Every 16-bit value widened to float32, the midpoints just around neighbouring values,
    and edge cases (largest, overflow, subnormals, zeros, infinities, NaN)."""
    bits16 = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    halves = bits16.view(torch.float16).float()
    bfloats = bits16.view(torch.bfloat16).float()
    base = torch.cat([halves, bfloats])
    base = base[torch.isfinite(base)]
    u = base.view(torch.int32)
    near = torch.cat([(u + d).view(torch.float32) for d in (-1, 1, 1 << 12, (1 << 12) + 1,
                                                         1 << 15, (1 << 15) + 1)])  # fmt: skip
    rnd = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 1e3
    edges = torch.tensor([65504.0, 65519.0, 65520.0, 1e30, -1e30, 6e-8, 3e-8, 2.9e-8, 1e-45,
                          0.0, -0.0, float("inf"), float("-inf"), float("nan")])  # fmt: skip
    return torch.cat([base, near, rnd, edges]).contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_conversions_round_like_torch(dtype):
    module = cuda_emulation.load()
    x = _float32_probe()
    bits = torch.empty(x.shape, dtype=torch.int16)
    back = torch.empty_like(x)
    module.convert_16bit(x.data_ptr(), bits.data_ptr(), back.data_ptr(), x.numel(),
                         1 if dtype == torch.float16 else 2)  # fmt: skip
    want = x.to(dtype)
    nan = torch.isnan(x)
    assert torch.equal(bits[~nan], want.view(torch.int16)[~nan])
    assert torch.isnan(back[nan]).all()
    assert torch.equal(back[~nan], want.float()[~nan])


def test_a_barrier_not_every_thread_reaches_is_an_error():
    module = cuda_emulation.load()
    for _ in range(2):  # the failed launch cleaned up: the next one runs (and fails) alike
        with pytest.raises(RuntimeError, match=r"deadlock: block 1 waits at __syncthreads with 63"):
            module.launch_divergent_barrier()


def test_a_write_past_shared_memory_is_an_error():
    module = cuda_emulation.load()
    with pytest.raises(RuntimeError, match=r"block 0 wrote outside its 256 bytes of dynamic "
                       r"shared memory \(past the end\)"):  # fmt: skip
        module.launch_smem_overrun()


def test_a_misaligned_vector_load_is_an_error():
    """On the GPU a misaligned load faults and ends the CUDA context; on x86 it would just
    read, so the emulation checks every __ldcg / __ldg and the kernels' vector accesses."""
    module = cuda_emulation.load()
    with pytest.raises(RuntimeError, match=r"block 0 thread 5: misaligned __ldcg at 0x[0-9a-f]+ "
                       r"\(4 bytes past a 16-byte boundary"):  # fmt: skip
        module.launch_misaligned_load()


def test_emulated_device_properties_reach_the_plans():
    module = cuda_emulation.load()
    cuda_emulation.configure(3, 48 * 1024)
    info = module.device_info()
    assert (info["sms"], info["smem_optin"], info["capability"]) == (3, 48 * 1024, (9, 0))
    plan = module.plan(False, 0, 0, 4, 100, 100, False)  # LSTM forward, fp32, B=4, H=100
    assert plan["blocks"] == 3 and plan["units_per_block"] == 34
    # the block's W_hh slice, 4 x 34 x 100 float32 = 54,400 bytes, does not fit in 48 KB
    assert plan["smem_bytes"] <= 48 * 1024 and not plan["weights_in_smem"]
    cuda_emulation.configure(3, 232448)
    assert module.plan(False, 0, 0, 4, 100, 100, False)["weights_in_smem"]
    with pytest.raises(ValueError, match="sms must be >= 1"):
        cuda_emulation.configure(0, 232448)
    cuda_emulation.configure()
