// Python bindings of rnnkern._cuda. Tensors stay in Python: every buffer arrives as a device
// address (tensor.data_ptr()) and the stream as torch.cuda.current_stream().cuda_stream, checked
// by rnnkern/backends/cuda.py, so this file needs neither torch nor CUDA headers and is compiled
// by the host C++ compiler; recurrence.cu (nvcc) holds the kernels and launchers (api.h).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "api.h"
#ifdef RNNKERN_CUDA_EMULATION
#include "emulation.h"
#endif

namespace py = pybind11;
using namespace rnnkern_cuda;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

py::dict info_dict(const LaunchInfo& i) {
  py::dict d;
  d["blocks"] = i.blocks;
  d["threads"] = i.threads;
  d["units_per_block"] = i.units_per_block;
  d["state_per_block"] = i.state_per_block;
  d["batch_chunk"] = i.batch_chunk;
  d["weights_in_smem"] = static_cast<bool>(i.weights_in_smem);
  d["smem_bytes"] = i.smem_bytes;
  d["batch_groups"] = i.batch_groups;
  d["batch_per_group"] = i.batch_per_group;
  d["running_in_smem"] = static_cast<bool>(i.running_in_smem);
  static const char* const kMatvecNames[] = {"simple", "tiled", "mma"};
  d["matvec"] = kMatvecNames[i.matvec];
  return d;
}

py::dict generate_info_dict(const GenerateInfo& i) {
  py::dict d;
  d["blocks"] = i.blocks;
  d["threads"] = i.threads;
  d["units_per_block"] = i.units_per_block;
  d["state_per_block"] = i.state_per_block;
  d["head_per_block"] = i.head_per_block;
  d["batch_chunk"] = i.batch_chunk;
  d["sample_warps"] = i.sample_warps;
  d["weights_in_smem"] = static_cast<bool>(i.weights_in_smem);
  d["sync"] = i.flags ? "flags" : "barrier";
  d["carry"] = static_cast<bool>(i.carry);
  d["smem_bytes"] = i.smem_bytes;
  return d;
}

// GenerateArgs from Python: model geometry and buffers as a dict of ints / floats (device
// addresses for buffers; 0 for null), the keys being the field names of GenerateArgs.
GenerateArgs generate_args(const py::dict& d) {
  auto i = [&](const char* k) { return d[k].cast<int>(); };
  auto p = [&](const char* k) { return d[k].cast<uintptr_t>(); };
  GenerateArgs a{};
  a.cell = i("cell");
  a.wdtype = i("wdtype");
  a.proj = i("proj");
  a.L = i("L");
  a.B = i("B");
  a.I = i("I");
  a.H = i("H");
  a.P = i("P");
  a.V = i("V");
  a.vocab_in = i("vocab_in");
  a.layers = ptr<const LayerWeights>(p("layers"));
  a.table = ptr<const float>(p("table"));
  a.head_w = ptr<const void>(p("head_w"));
  a.head_b = ptr<const float>(p("head_b"));
  a.h = ptr<float>(p("h"));
  a.parity = i("parity");
  a.c = ptr<float>(p("c"));
  a.m = ptr<float>(p("m"));
  a.logits = ptr<float>(p("logits"));
  a.feed = i("feed");
  a.prime = ptr<const int64_t>(p("prime"));
  a.x = ptr<const float>(p("x"));
  a.steps = i("steps");
  a.out = ptr<int64_t>(p("out"));
  a.temperature = d["temperature"].cast<double>();
  a.top_p = d["top_p"].cast<double>();
  a.top_k = i("top_k");
  a.seed = d["seed"].cast<uint64_t>();
  a.first_step = d["first_step"].cast<uint64_t>();
  a.sync = ptr<unsigned long long>(p("sync"));
  a.flags = i("flags");
  a.carry = i("carry");
  a.spin_sleep_ns = i("spin_sleep_ns");
  a.tag_base = d["tag_base"].cast<uint64_t>();
  a.xh = ptr<unsigned long long>(p("xh"));
  a.xm = ptr<unsigned long long>(p("xm"));
  a.xl = ptr<unsigned long long>(p("xl"));
  a.trace = ptr<long long>(p("trace"));
  a.trace_steps = i("trace_steps");
  return a;
}

}  // namespace

#ifdef RNNKERN_CUDA_EMULATION
// The same bindings over the CPU emulation of the kernels (csrc/cuda/emulation.h; tests).
#define RNNKERN_CUDA_MODULE _cuda_emulated
#else
#define RNNKERN_CUDA_MODULE _cuda
#endif

PYBIND11_MODULE(RNNKERN_CUDA_MODULE, m) {
  m.doc() = "rnnkern CUDA kernels (persistent cooperative recurrences) on raw device buffers";

  m.def(
      "layer_forward",
      [](int cell, int dtype, int T, int B, int H, int P, bool reverse, bool save, uintptr_t gx,
         uintptr_t h0, uintptr_t c0, uintptr_t w_hh, uintptr_t b_hh, uintptr_t w_hr,
         uintptr_t lengths, uintptr_t y, uintptr_t h_n, uintptr_t c_n, uintptr_t hs,
         uintptr_t aux, uintptr_t gates, uintptr_t mbuf, uintptr_t sync, uintptr_t stream,
         int64_t timeout_ns, bool debug, bool tf32, uintptr_t trace, int trace_steps) {
        ForwardArgs a{cell, dtype, T, B, H, P, reverse ? 1 : 0, save ? 1 : 0,
                      ptr<const void>(gx), ptr<const float>(h0), ptr<const float>(c0),
                      ptr<const void>(w_hh), ptr<const void>(b_hh), ptr<const void>(w_hr),
                      ptr<const int64_t>(lengths), ptr<void>(y), ptr<float>(h_n),
                      ptr<float>(c_n), ptr<float>(hs), ptr<float>(aux), ptr<float>(gates),
                      ptr<float>(mbuf), ptr<unsigned long long>(sync), tf32 ? 1 : 0,
                      ptr<long long>(trace), trace_steps};
        LaunchInfo info;
        {
          py::gil_scoped_release release;
          info = layer_forward(a, ptr<void>(stream), timeout_ns, debug);
        }
        return info_dict(info);
      },
      "Enqueue one layer's forward recurrence (see csrc/cuda/api.h: ForwardArgs).");

  m.def(
      "layer_backward",
      [](int cell, int dtype, int T, int B, int H, int P, bool reverse, uintptr_t hs,
         uintptr_t aux, uintptr_t gates, uintptr_t w_t, uintptr_t wr_t, uintptr_t lengths,
         uintptr_t dy, uintptr_t dh_n, uintptr_t dc_n, uintptr_t dgx, uintptr_t dgh,
         uintptr_t dh_proj, uintptr_t dh0, uintptr_t dc0, uintptr_t dpre, uintptr_t dht,
         uintptr_t dloc, uintptr_t sync, uintptr_t stream, int64_t timeout_ns, bool debug,
         bool tf32, uintptr_t trace, int trace_steps) {
        BackwardArgs a{cell, dtype, T, B, H, P, reverse ? 1 : 0,
                       ptr<const float>(hs), ptr<const float>(aux), ptr<const float>(gates),
                       ptr<const void>(w_t), ptr<const void>(wr_t), ptr<const int64_t>(lengths),
                       ptr<const void>(dy), ptr<const float>(dh_n), ptr<const float>(dc_n),
                       ptr<float>(dgx), ptr<float>(dgh), ptr<float>(dh_proj), ptr<float>(dh0),
                       ptr<float>(dc0), ptr<float>(dpre), ptr<float>(dht), ptr<float>(dloc),
                       ptr<unsigned long long>(sync), tf32 ? 1 : 0, ptr<long long>(trace),
                       trace_steps};
        LaunchInfo info;
        {
          py::gil_scoped_release release;
          info = layer_backward(a, ptr<void>(stream), timeout_ns, debug);
        }
        return info_dict(info);
      },
      "Enqueue one layer's backward recurrence (see csrc/cuda/api.h: BackwardArgs).");

  m.def(
      "plan",
      [](bool backward, int cell, int dtype, int B, int H, int P, bool proj, bool tf32) {
        return info_dict(backward ? plan_backward(cell, dtype, B, H, P, proj, tf32)
                                  : plan_forward(cell, dtype, B, H, P, proj, tf32));
      },
      py::arg("backward"), py::arg("cell"), py::arg("dtype"), py::arg("B"), py::arg("H"),
      py::arg("P"), py::arg("proj"), py::arg("tf32") = false,
      "The launch layout a call would use on the current device, without launching (tf32: "
      "float32 with TF32 products allowed).");

  m.def(
      "generate",
      [](const py::dict& args, uintptr_t stream, int64_t timeout_ns, bool debug) {
        const GenerateArgs a = generate_args(args);
        GenerateInfo info{};
        int64_t model_steps;
        {
          py::gil_scoped_release release;
          model_steps = generate(a, ptr<void>(stream), timeout_ns, debug, &info);
        }
        return py::make_tuple(model_steps, generate_info_dict(info));
      },
      py::arg("args"), py::arg("stream"), py::arg("timeout_ns"), py::arg("debug"),
      "Enqueue whole-sequence generation (see csrc/cuda/api.h: GenerateArgs; `args` holds its "
      "fields by name, buffers as device addresses). Returns (model steps run, layout).");
  m.def(
      "plan_generate_on",
      [](const py::dict& args, int sms, int64_t smem_budget) {
        return generate_info_dict(plan_generate_on(generate_args(args), sms, smem_budget));
      },
      py::arg("args"), py::arg("sms"), py::arg("smem_budget"),
      "The generate layout for a device with `sms` SMs and `smem_budget` bytes of shared "
      "memory per block (host arithmetic only: works without a GPU).");

  m.def("device_info", [] {
    const DeviceInfo d = device_info();
    py::dict out;
    out["device"] = d.device;
    out["sms"] = d.sms;
    out["smem_optin"] = d.smem_optin;
    out["cooperative"] = static_cast<bool>(d.cooperative);
    out["capability"] = py::make_tuple(d.major, d.minor);
    return out;
  });
  m.def("dtype_compiled", &dtype_compiled, py::arg("dtype"));
#ifdef RNNKERN_CUDA_EMULATION
  m.attr("EMULATED") = true;
  m.def("configure_emulation", &rnnkern_emu::configure, py::arg("sms"), py::arg("smem_optin"),
        py::arg("schedule_seed"),
        "Give the emulated device `sms` multiprocessors, `smem_optin` bytes of shared memory "
        "per block and a schedule (0: threads in order; else a seed of random rounds); a new "
        "device ordinal. Defaults 4, 232448, 0 (csrc/cuda/emulation.h).");
  m.def(
      "convert_16bit",
      [](uintptr_t src, uintptr_t bits, uintptr_t back, int64_t n, int dtype) {
        rnnkern_emu::convert_16bit(ptr<const float>(src), ptr<uint16_t>(bits), ptr<float>(back),
                                   n, dtype);
      },
      "Round n float32 values to float16 (dtype 1) or bfloat16 (2) and back (a test of the "
      "emulation's conversions).");
  m.def("launch_divergent_barrier", &rnnkern_emu::launch_divergent_barrier,
        "A launch that deadlocks at a barrier (a test of the emulation's detection).");
  m.def("launch_smem_overrun", &rnnkern_emu::launch_smem_overrun,
        "A launch that writes past its shared memory (a test of the emulation's canaries).");
  m.def("launch_misaligned_load", &rnnkern_emu::launch_misaligned_load,
        "A launch with a misaligned float4 load (a test of the emulation's alignment check).");
#else
  m.attr("EMULATED") = false;
#endif

  m.attr("CELLS") = py::make_tuple("lstm", "gru", "rnn_tanh", "rnn_relu");
  m.attr("TRAIN_SYNC_WORDS") = kTrainSyncWords;
  m.attr("TRACE_POINTS") = kTracePoints;
  m.def("generate_trace_points", &generate_trace_points, py::arg("layers"),
        "Trace points per model step of a generate launch of `layers` layers (api.h).");
  m.attr("ERR_BARRIER_TIMEOUT") = static_cast<unsigned long long>(kErrBarrierTimeout);
  m.attr("ERR_BAD_LENGTH") = static_cast<unsigned long long>(kErrBadLength);
  m.attr("ERR_NON_FINITE") = static_cast<unsigned long long>(kErrNonFinite);
  m.attr("ERR_BAD_TOKEN") = static_cast<unsigned long long>(kErrBadToken);
}
