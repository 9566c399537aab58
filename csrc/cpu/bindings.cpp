// Python bindings of rnnkern._cpu. Tensors stay in Python: every buffer arrives as an address
// (tensor.data_ptr()) with its sizes, checked by rnnkern/backends/cpu.py and rnnkern/decode.py,
// so this module needs no torch headers and builds in pip's isolated environment.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "api.h"
#include "buffer_pool.h"

namespace py = pybind11;
using rnnkern_cpu::Kernels;

namespace {

std::vector<const Kernels*> supported_isas() {
  std::vector<const Kernels*> out{&rnnkern_cpu::kernels_generic};
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) out.push_back(&rnnkern_cpu::kernels_avx2);
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    out.push_back(&rnnkern_cpu::kernels_avx512);
#endif
  return out;
}

const Kernels* select_isa(const std::string& name) {
  for (const Kernels* k : supported_isas())
    if (name == k->name) return k;
  std::string names;
  for (const Kernels* k : supported_isas()) names += std::string(names.empty() ? "" : ", ") + k->name;
  throw std::invalid_argument("isa must be one of the instruction sets this CPU supports (" + names +
                              "), got '" + name + "'");
}

const Kernels* default_isa() {
  // RNNKERN_CPU_ISA forces one (tests run the portable path this way); otherwise the widest
  // this CPU supports.
  const char* env = std::getenv("RNNKERN_CPU_ISA");
  if (env && *env) return select_isa(env);
  return supported_isas().back();
}

const Kernels* active = nullptr;
const Kernels& kern() {
  if (!active) active = default_isa();
  return *active;
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

struct DecoderPlan {
  rnnkern_cpu::DecoderArgs args{};
  std::vector<uint64_t> w_ih, w_hh, b_ih, b_hh, w_hr;
  // The matrices packed by the instruction set active when the plan was made; the plan keeps
  // using that table, since the packed layout depends on its vector width.
  const Kernels* isa = nullptr;
  void* packed = nullptr;

  DecoderPlan() = default;
  DecoderPlan(const DecoderPlan&) = delete;
  DecoderPlan& operator=(const DecoderPlan&) = delete;
  ~DecoderPlan() {
    if (packed) isa->decoder_free(packed);
  }

  void step(uintptr_t h_cur, uintptr_t h_next, uintptr_t tokens, uintptr_t x, bool with_head) {
    rnnkern_cpu::DecoderArgs a = args;
    a.h_cur = ptr<float>(h_cur);
    a.h_next = ptr<float>(h_next);
    py::gil_scoped_release release;
    isa->decoder_step(a, packed, ptr<const int64_t>(tokens), ptr<const float>(x), with_head ? 1 : 0);
  }

  py::tuple generate(uintptr_t h_cur, uintptr_t h_next, uintptr_t prime, int prime_len,
                     int steps, uintptr_t out, double temperature, int64_t top_k, double top_p,
                     uint64_t seed, uint64_t first_step, uintptr_t weights, uintptr_t order) {
    rnnkern_cpu::DecoderArgs a = args;
    a.h_cur = ptr<float>(h_cur);
    a.h_next = ptr<float>(h_next);
    rnnkern_cpu::GenerateArgs g{};
    g.prime_len = prime_len;
    g.steps = steps;
    g.prime = ptr<const int64_t>(prime);
    g.out = ptr<int64_t>(out);
    g.temperature = temperature;
    g.top_k = top_k;
    g.top_p = top_p;
    g.seed = seed;
    g.first_step = first_step;
    g.weights = ptr<double>(weights);
    g.order = ptr<int32_t>(order);
    int64_t model_steps;
    {
      py::gil_scoped_release release;
      model_steps = isa->generate(a, packed, g);
    }
    return py::make_tuple(model_steps, g.error_row);
  }
};

// DLPack (v0.x ABI, the "dltensor" capsule every DLPack consumer accepts), declared here so
// that the module needs no header beyond pybind11's.
struct DLDevice {
  int32_t device_type;  // 1: CPU
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 2: float
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // null: compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

struct PooledTensor {
  DLManagedTensor managed;
  std::vector<int64_t> shape;
  size_t capacity;  // bytes of the block (at least the tensor's)
};

void pooled_deleter(DLManagedTensor* m) {
  auto* t = static_cast<PooledTensor*>(m->manager_ctx);
  rnnkern_cpu::BufferPool::instance().release(m->dl_tensor.data, t->capacity);
  delete t;
}

void unconsumed_capsule_destructor(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    m->deleter(m);
  }
}

py::capsule pooled_tensor(std::vector<int64_t> shape, int bits) {
  size_t bytes = bits / 8;
  for (int64_t n : shape) {
    if (n < 0) throw std::invalid_argument("shape must be non-negative");
    bytes *= size_t(n);
  }
  size_t capacity = 0;
  void* data = rnnkern_cpu::BufferPool::instance().acquire(bytes, &capacity);
  if (!data) throw std::bad_alloc();
  auto* t = new PooledTensor{{}, std::move(shape), capacity};
  DLTensor& d = t->managed.dl_tensor;
  d.data = data;
  d.device = {1, 0};
  d.ndim = int32_t(t->shape.size());
  d.dtype = {2, uint8_t(bits), 1};
  d.shape = t->shape.data();
  d.strides = nullptr;
  d.byte_offset = 0;
  t->managed.manager_ctx = t;
  t->managed.deleter = pooled_deleter;
  // A capsule nobody consumed still owns its buffer; a consumer renames it "used_dltensor"
  // and calls the deleter itself.
  return py::capsule(&t->managed, "dltensor", &unconsumed_capsule_destructor);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "rnnkern C++ CPU kernels (fused recurrences, decoder, sampling) on raw buffers";

  m.def("isa", [] { return std::string(kern().name); },
        "Name of the instruction set the kernels run with (generic, avx2, avx512).");
  m.def("supported_isas", [] {
    std::vector<std::string> names;
    for (const Kernels* k : supported_isas()) names.emplace_back(k->name);
    return names;
  });
  m.def("set_isa", [](const std::string& name) { active = select_isa(name); }, py::arg("name"));

  m.def(
      "pooled_empty",
      [](std::vector<int64_t> shape, int bits) {
        if (bits != 32 && bits != 64) throw std::invalid_argument("bits must be 32 or 64");
        return pooled_tensor(std::move(shape), bits);
      },
      py::arg("shape"), py::arg("bits"),
      "An uninitialised float32/float64 buffer of `shape` from the caching pool, as a DLPack "
      "capsule (torch.utils.dlpack.from_dlpack); freeing the tensor returns it to the pool.");
  m.def("pool_trim", [] { rnnkern_cpu::BufferPool::instance().trim(); },
        "Free every cached buffer of the pool.");
  m.def("pool_set_limit", [](uint64_t bytes) { rnnkern_cpu::BufferPool::instance().set_limit(bytes); },
        py::arg("bytes"), "Most bytes of freed buffers the pool keeps (0: keep none).");
  m.def("pool_info", [] {
    auto i = rnnkern_cpu::BufferPool::instance().info();
    py::dict d;
    d["cached_bytes"] = i.cached;
    d["limit_bytes"] = i.limit;
    d["hits"] = i.hits;
    d["misses"] = i.misses;
    return d;
  });

  m.def(
      "layer_forward",
      [](int elem_size, int cell, int T, int B, int H, int P, uintptr_t gx, uintptr_t h0,
         uintptr_t c0, uintptr_t w_hh, uintptr_t b_hh, uintptr_t w_hr, uintptr_t lengths,
         bool reverse, bool save, uintptr_t y, uintptr_t h_n, uintptr_t c_n, uintptr_t hs,
         uintptr_t aux, uintptr_t gates, uintptr_t gh, uintptr_t mbuf) {
        rnnkern_cpu::ForwardArgs a{cell,           T,           B,           H,
                                   P,              ptr<void>(gx), ptr<void>(h0), ptr<void>(c0),
                                   ptr<void>(w_hh), ptr<void>(b_hh), ptr<void>(w_hr),
                                   ptr<const int64_t>(lengths), reverse ? 1 : 0, save ? 1 : 0,
                                   ptr<void>(y),   ptr<void>(h_n), ptr<void>(c_n), ptr<void>(hs),
                                   ptr<void>(aux), ptr<void>(gates), ptr<void>(gh),
                                   ptr<void>(mbuf)};
        if (elem_size != 4 && elem_size != 8)
          throw std::invalid_argument("elem_size must be 4 (float32) or 8 (float64)");
        py::gil_scoped_release release;
        (elem_size == 4 ? kern().forward_f32 : kern().forward_f64)(a);
      },
      "One layer's forward recurrence on raw buffers (see csrc/cpu/api.h: ForwardArgs).");

  m.def(
      "layer_backward",
      [](int elem_size, int cell, int T, int B, int H, int P, uintptr_t hs, uintptr_t aux,
         uintptr_t gates, uintptr_t w_hh, uintptr_t w_hr, uintptr_t lengths, bool reverse,
         uintptr_t dy, uintptr_t dh_n, uintptr_t dc_n, uintptr_t dgx, uintptr_t dgh,
         uintptr_t dh_proj, uintptr_t dh0, uintptr_t dc0, uintptr_t dh_ring, uintptr_t dh_total,
         uintptr_t dpre, uintptr_t dm) {
        rnnkern_cpu::BackwardArgs a{cell,
                                    T,
                                    B,
                                    H,
                                    P,
                                    ptr<void>(hs),
                                    ptr<void>(aux),
                                    ptr<void>(gates),
                                    ptr<void>(w_hh),
                                    ptr<void>(w_hr),
                                    ptr<const int64_t>(lengths),
                                    reverse ? 1 : 0,
                                    ptr<void>(dy),
                                    ptr<void>(dh_n),
                                    ptr<void>(dc_n),
                                    ptr<void>(dgx),
                                    ptr<void>(dgh),
                                    ptr<void>(dh_proj),
                                    ptr<void>(dh0),
                                    ptr<void>(dc0),
                                    ptr<void>(dh_ring),
                                    ptr<void>(dh_total),
                                    ptr<void>(dpre),
                                    ptr<void>(dm)};
        if (elem_size != 4 && elem_size != 8)
          throw std::invalid_argument("elem_size must be 4 (float32) or 8 (float64)");
        py::gil_scoped_release release;
        (elem_size == 4 ? kern().backward_f32 : kern().backward_f64)(a);
      },
      "One layer's backward recurrence on raw buffers (see csrc/cpu/api.h: BackwardArgs).");

  m.def(
      "gemm",
      [](int elem_size, int M, int N, int K, uintptr_t a, int64_t a_rs, int64_t a_cs, uintptr_t b,
         int64_t b_rs, int64_t b_cs, uintptr_t bias, uintptr_t c, uintptr_t rowsum) {
        if (elem_size != 4 && elem_size != 8)
          throw std::invalid_argument("elem_size must be 4 (float32) or 8 (float64)");
        if (M < 0 || N < 0 || K < 0)
          throw std::invalid_argument("M, N and K must be >= 0");
        rnnkern_cpu::GemmArgs g{M, N, K, ptr<const void>(a), a_rs, a_cs, ptr<const void>(b),
                                b_rs, b_cs, ptr<const void>(bias), ptr<void>(c),
                                ptr<void>(rowsum)};
        py::gil_scoped_release release;
        (elem_size == 4 ? kern().gemm_f32 : kern().gemm_f64)(g);
      },
      "C [M, N] = A Bm (+ bias [N]) with A, Bm given by element strides; rowsum [M] = A's row "
      "sums (csrc/cpu/api.h: GemmArgs).");

  py::class_<DecoderPlan>(m, "DecoderPlan", "Packed decoder buffers (csrc/cpu/api.h: DecoderArgs)")
      .def(py::init([](int cell, int L, int B, int I, int H, int P, int V, int wdtype,
                       std::vector<uint64_t> w_ih, std::vector<uint64_t> w_hh,
                       std::vector<uint64_t> b_ih, std::vector<uint64_t> b_hh,
                       std::vector<uint64_t> w_hr, uintptr_t table, int64_t vocab_in,
                       uintptr_t head_w, uintptr_t head_b, uintptr_t c, uintptr_t gi,
                       uintptr_t gh, uintptr_t mbuf, uintptr_t logits) {
        for (auto* v : {&w_ih, &w_hh, &b_ih, &b_hh, &w_hr})
          if ((int)v->size() != L)
            throw std::invalid_argument("every per-layer pointer list must have L entries");
        if (wdtype != 0 && wdtype != 1) throw std::invalid_argument("wdtype must be 0 or 1");
        auto plan = new DecoderPlan();
        plan->w_ih = std::move(w_ih);
        plan->w_hh = std::move(w_hh);
        plan->b_ih = std::move(b_ih);
        plan->b_hh = std::move(b_hh);
        plan->w_hr = std::move(w_hr);
        rnnkern_cpu::DecoderArgs& a = plan->args;
        a.cell = cell;
        a.L = L;
        a.B = B;
        a.I = I;
        a.H = H;
        a.P = P;
        a.V = V;
        a.wdtype = wdtype;
        a.w_ih = plan->w_ih.data();
        a.w_hh = plan->w_hh.data();
        a.b_ih = plan->b_ih.data();
        a.b_hh = plan->b_hh.data();
        a.w_hr = plan->w_hr.data();
        a.table = ptr<const float>(table);
        a.vocab_in = vocab_in;
        a.head_w = ptr<const void>(head_w);
        a.head_b = ptr<const float>(head_b);
        a.c = ptr<float>(c);
        a.gi = ptr<float>(gi);
        a.gh = ptr<float>(gh);
        a.m = ptr<float>(mbuf);
        a.logits = ptr<float>(logits);
        plan->isa = &kern();
        {
          py::gil_scoped_release release;
          plan->packed = plan->isa->decoder_pack(a);
        }
        return plan;
      }))
      .def("step", &DecoderPlan::step, py::arg("h_cur"), py::arg("h_next"), py::arg("tokens"),
           py::arg("x"), py::arg("with_head"))
      .def("generate", &DecoderPlan::generate);

  m.def(
      "sample_rows",
      [](uintptr_t logits, int64_t B, int64_t V, double temperature, int64_t top_k, double top_p,
         uint64_t seed, uint64_t step, uintptr_t out, uintptr_t weights, uintptr_t order) {
        int64_t error_row = -1;
        for (int64_t b = 0; b < B; ++b) {
          int64_t tok = rnnkern_cpu::sample_row(ptr<const float>(logits) + b * V, V, temperature,
                                                top_k, top_p, seed, (uint64_t)b, step,
                                                ptr<double>(weights), ptr<int32_t>(order));
          if (tok < 0 && error_row < 0) error_row = b;
          ptr<int64_t>(out)[b] = tok;
        }
        return error_row;
      },
      "The sampling rule on float32 logits [B, V]; returns -1 or the first row with NaN/+inf.");
  m.def("uniform", &rnnkern_cpu::uniform, py::arg("seed"), py::arg("stream"), py::arg("step"));
}
