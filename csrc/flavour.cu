// Which flavour this extension was compiled as: "cuda" (nvcc, real kernels) or "cpu-emulation" (host compiler).
#include "cuda_compat.h"
#include "launchers.h"

namespace ak {
const char* flavour() { return AK_FLAVOUR; }
}  // namespace ak
