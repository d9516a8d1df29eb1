// pybind11 module action_kernels._C (CUDA) or action_kernels._C_cpu (CPU emulation), named by -DAK_MODULE:
// the kernel launchers, with no torch headers (survives torch upgrades).
// Pointers arrive as integers (tensor.data_ptr()), the stream as an integer handle (0 = default stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "launch_plans.h"
#include "launchers.h"
#ifdef AK_EMULATION
#include "emulation.h"
#endif

namespace py = pybind11;

namespace {
ak::RowsArg rows(uintptr_t ptr, int64_t P, int64_t sb, int64_t sp, int64_t sd) { return ak::RowsArg{ptr, P, sb, sp, sd}; }
ak::ScalesArg scales(uintptr_t rs, uintptr_t rt, uintptr_t rk) { return ak::ScalesArg{rs, rt, rk}; }

py::list plans(const std::string& op, const std::string& mode, const std::string& dtype, int64_t N, int64_t K,
               int64_t D, int64_t k) {
  std::vector<ak::LaunchPlan> out;
  try {
    out = ak::launch_plans(op, mode, dtype, N, K, D, k);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  py::list result;
  for (const auto& p : out) {
    py::dict d;
    d["kernel"] = p.kernel;
    d["grid"] = int64_t(p.grid_x) * p.grid_y;
    d["block"] = p.block;
    d["dynamic_smem"] = p.dynamic_smem;
    d["trips"] = p.trips;
    result.append(d);
  }
  return result;
}
}  // namespace

#ifndef AK_MODULE
#define AK_MODULE _C
#endif

PYBIND11_MODULE(AK_MODULE, m) {
  m.doc() = "action_kernels CUDA kernels (raw-pointer launchers)";
  m.def("flavour", &ak::flavour, "'cuda' or 'cpu-emulation'");
  m.def("uniform_rows", &ak::uniform_rows, py::arg("rows"), py::arg("nrows"), py::arg("dtype"),
        "whether a (B, P, D) view streams with cp.async (feature stride 1, rows 16-byte aligned at one stride); "
        "the operands a kernel streams in its main loop must be");
  m.def("launch_plans", &plans, py::arg("op"), py::arg("mode"), py::arg("dtype"), py::arg("N"), py::arg("K"),
        py::arg("D"), py::arg("k") = 0,
        "The kernel launches (in order) the CUDA launchers make for this op, mode ('forward', 'forward_grad', "
        "'key_grad'; 'topk'), dtype ('bf16', 'fp16', 'fp32') and shape: a list of {kernel (demangled cubin "
        "symbol), grid (CTAs), block (threads), dynamic_smem (bytes), trips (loop trip counts per CTA, "
        "outermost first)}");
  py::class_<ak::RowsArg>(m, "Rows", py::module_local()).def(py::init(&rows), py::arg("ptr"), py::arg("P"), py::arg("sb"), py::arg("sp"),
                                         py::arg("sd"));
  py::class_<ak::ScalesArg>(m, "Scales", py::module_local())
      .def(py::init(&scales), py::arg("rs"), py::arg("rt"), py::arg("rk"));
  m.def("soft_contrastive_forward", &ak::soft_contrastive_forward, py::arg("dtype"), py::arg("s"), py::arg("t"),
        py::arg("k"), py::arg("scales"), py::arg("N"), py::arg("K"), py::arg("D"), py::arg("inv_tau_s"),
        py::arg("inv_tau_t"), py::arg("loss"), py::arg("lse_s"), py::arg("lse_t"), py::arg("pivot"),
        py::arg("pivot_r"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("soft_contrastive_row_grad", &ak::soft_contrastive_row_grad, py::arg("dtype"), py::arg("s"), py::arg("t"),
        py::arg("k"), py::arg("scales"), py::arg("N"), py::arg("K"), py::arg("D"), py::arg("inv_tau_s"),
        py::arg("inv_tau_t"), py::arg("lse_s"), py::arg("lse_t"), py::arg("ds0"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("soft_contrastive_key_grad", &ak::soft_contrastive_key_grad, py::arg("dtype"), py::arg("s"), py::arg("t"),
        py::arg("k"), py::arg("scales"), py::arg("N"), py::arg("K"), py::arg("D"), py::arg("inv_tau_s"),
        py::arg("inv_tau_t"), py::arg("loss"), py::arg("lse_s"), py::arg("lse_t"), py::arg("pivot"),
        py::arg("pivot_r"), py::arg("g"), py::arg("dk"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("hard_negative_topk", &ak::hard_negative_topk, py::arg("dtype"), py::arg("a"), py::arg("k"), py::arg("ra"),
        py::arg("rk"), py::arg("ya"), py::arg("yk"), py::arg("ignore_label"), py::arg("N"), py::arg("K"),
        py::arg("D"), py::arg("k_out"), py::arg("values"), py::arg("indices"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
#ifdef AK_EMULATION
  // the primitive self-tests (csrc/selftest.cu) are built into the emulation/test module only, never into _C
  auto rel = py::call_guard<py::gil_scoped_release>();
  m.def("selftest_mma", &ak::selftest_mma, py::arg("type"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"),
        py::arg("stream"), rel);
  m.def("selftest_ldmatrix", &ak::selftest_ldmatrix, py::arg("image"), py::arg("elems"), py::arg("offsets"),
        py::arg("num"), py::arg("trans"), py::arg("out"), py::arg("stream"), rel);
  m.def("selftest_shfl", &ak::selftest_shfl, py::arg("mode"), py::arg("width"), py::arg("values"), py::arg("args"),
        py::arg("out32"), py::arg("out64"), py::arg("stream"), rel);
  m.def("selftest_vote", &ak::selftest_vote, py::arg("pred"), py::arg("ballot"), py::arg("any"), py::arg("all"),
        py::arg("stream"), rel);
  m.def("selftest_cp_async", &ak::selftest_cp_async, py::arg("src"), py::arg("src_bytes"), py::arg("early"),
        py::arg("landed"), py::arg("stream"), rel);
  m.def("selftest_convert", &ak::selftest_convert, py::arg("x"), py::arg("n"), py::arg("bf16"), py::arg("f16"),
        py::arg("tf32"), py::arg("exp2"), py::arg("stream"), rel);
  m.def("selftest_broken", &ak::selftest_broken, py::arg("which"), py::arg("out"), py::arg("stream"), rel);
  m.def("emulated_launches", [] {
    py::list out;
    for (const auto& r : ak_emu::launch_log) {
      py::dict d;
      d["grid"] = int64_t(r.grid_x) * r.grid_y * r.grid_z;
      d["block"] = r.block;
      d["dynamic_smem"] = int64_t(r.dynamic_smem);
      out.append(d);
    }
    ak_emu::launch_log.clear();
    return out;
  }, "the (grid, block, dynamic_smem) of every emulated launch since the last call (then forgotten)");
  m.def("soft_contrastive_rows_cpu", &ak::soft_contrastive_rows_cpu, py::arg("a"), py::arg("b"), py::arg("rows"),
        py::arg("K"), py::arg("loss"), py::arg("lse_a"), py::arg("lse_b"), py::arg("grad"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("cpu_rows_isa", &ak::cpu_rows_isa,
        "the instruction set of soft_contrastive_rows_cpu's sweeps: avx512, avx2 or default (ATEN_CPU_CAPABILITY "
        "caps it)");
  m.def("hard_negative_topk_rows_cpu", &ak::hard_negative_topk_rows_cpu, py::arg("sim"), py::arg("rows"),
        py::arg("K"), py::arg("row_labels"), py::arg("key_labels"), py::arg("ignore_label"), py::arg("k"),
        py::arg("values"), py::arg("indices"), py::arg("threads"), py::call_guard<py::gil_scoped_release>());
#endif
}
