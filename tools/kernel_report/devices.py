"""The one table of device facts the kernel report uses (published figures unless marked measured).

Per-SM rates are per clock at `clock_ghz`, the clock at which the published dense 16-bit tensor peak is rated
(peak / (SMs x clock) = tensor flops per clock per SM), so every pipe is on the same clock. Lane rates: threads'
worth of instructions per clock per SM (a warp instruction is 32 lanes).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Device:
    arch: int
    name: str
    sms: int
    clock_ghz: float
    dense_16bit_tflops: float          # published dense bf16/fp16 tensor peak (no sparsity)
    dram_tbps: float                   # published DRAM bandwidth
    fma_lanes: int                     # FFMA/FADD/FMUL per clock per SM
    alu_lanes: int = 64                # integer/logic/compare/select/min-max
    imad_lanes: int = 64
    mufu_lanes: int = 16               # MUFU.EX2 and friends
    conv_lanes: int = 16               # F2F/F2I/I2F
    issue_warps: int = 4               # warp instructions issued per clock per SM (4 schedulers)
    shared_bytes: int = 128            # shared-memory bytes per clock per SM
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    smem_per_sm: int = 0               # bytes usable by CTAs on one SM
    smem_per_block: int = 0            # the most one CTA may use (static + dynamic)
    smem_reserved_per_block: int = 1024
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    measured: dict = dataclasses.field(default_factory=dict)

    @property
    def tensor_flops_per_clk(self) -> float:
        """Dense 16-bit tensor flops per clock per SM; tf32 runs at half, int8/fp8 at twice this."""
        return self.dense_16bit_tflops * 1e12 / (self.sms * self.clock_ghz * 1e9)


DEVICES = {
    90: Device(90, "H200 SXM (sm_90)", sms=132, clock_ghz=1.83, dense_16bit_tflops=989.4, dram_tbps=4.8,
               fma_lanes=128, smem_per_sm=233472, smem_per_block=232448,
               measured={"bf16_gemm_tflops": 790.0, "copy_tbps": 4.3,
                         "source": "a lent H200, earlier session (../shared/docs/kernels.md)"}),
    80: Device(80, "A100 SXM (sm_80)", sms=108, clock_ghz=1.41, dense_16bit_tflops=312.0, dram_tbps=2.0,
               fma_lanes=64, smem_per_sm=167936, smem_per_block=166912),
}
TENSOR_RATE = {"16": 1.0, "tf32": 0.5, "int8": 2.0, "fp8": 2.0}  # relative to the dense 16-bit rate


def device(arch: int) -> Device:
    if arch not in DEVICES:
        raise ValueError(f"--arch: sm_{arch} is not in the device table (known: "
                         f"{', '.join(f'sm_{a}' for a in sorted(DEVICES))}); add it to "
                         f"tools/kernel_report/devices.py")
    return DEVICES[arch]
