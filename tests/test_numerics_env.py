"""The forced-AVX2 CI step (.ci/run) is not a silent no-op: under its environment, torch runs its AVX2 kernels."""
import os

import pytest
import torch

pytestmark = pytest.mark.numerics


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY", "").lower() != "avx2",
                    reason="only under .ci/run's forced-AVX2 step (ATEN_CPU_CAPABILITY=avx2)")
def test_forced_avx2_environment_makes_torch_run_its_avx2_kernels():
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
