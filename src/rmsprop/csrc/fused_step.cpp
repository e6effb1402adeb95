// The fused CPU step: the whole RMSProp rule in one pass over memory.
//
// Built on first use by rmsprop._cpp_kernels (torch.utils.cpp_extension,
// cached on disk). A step is two calls: gather_group / gather_tensors check
// every tensor and collect its addresses into a Plan (or say why they cannot),
// then run() increments the steps and applies the rule of rmsprop.functional
// to every element, the chunks spread over torch's own intra-op threads.
//
// Elements are computed in float32 (float64 for float64 tensors), op by op
// in the order of rmsprop._numba_kernels._rule, built with -ffp-contract=off:
// fused multiply-adds exactly where both write mul_add (where the machine has
// them), so the results equal the numba kernel's bit for bit.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/python_variable.h>

#ifdef __F16C__
#include <immintrin.h>
#endif

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

// Elements per work item: large enough to amortise the set-up, small enough
// to balance the threads on tensors of a few million elements.
constexpr int64_t kChunk = 1 << 16;
// Tensors per thread below which their per-tensor work (checks, step counters) stays on one thread.
constexpr int64_t kCheckGrain = 256;

enum class Storage : uint8_t { Float32, Float64, BFloat16, Float16 };

// One tensor's share of a step. Complex tensors count as twice as many reals.
struct Entry {
  Storage storage;
  int64_t size;
  void* param;
  void* grad;
  void* square_avg;
  void* grad_avg;         // nullptr unless centered
  void* momentum_buffer;  // nullptr unless momentum > 0
  void* step;
  bool step_is_double;
};

// Raw addresses, valid while the Python objects own the tensors: run() it
// right after gathering, within the same optimizer step, with the GIL held
// throughout so that no other Python thread can free or replace a tensor.
// (Holding at::Tensor copies instead costs a GIL-taking incref per tensor.)
struct Plan {
  std::vector<Entry> entries;
  std::vector<c10::TensorImpl*> params;  // their versions are bumped after the step
  bool centered = false;
  bool momentum = false;
};

// The rule's numbers in the compute type; maximize, both weight decays and
// the eps placement are folded in, as rmsprop.fused.kernel_scalars does.
template <typename C>
struct Constants {
  C lr, alpha, rate, eps_inside, eps_outside, weight_decay, decay_factor, momentum, sign;
  bool coupled_weight_decay, nesterov, lr_in_momentum;
};

struct Hyperparameters {
  double lr, alpha, eps, weight_decay, momentum;
  bool maximize, eps_in_sqrt, decoupled_weight_decay, bias_correction, nesterov, lr_in_momentum;

  template <typename C>
  Constants<C> constants() const {
    bool decoupled = decoupled_weight_decay && weight_decay != 0;
    return Constants<C>{
        C(lr),
        C(alpha),
        C(1 - alpha),
        C(eps_in_sqrt ? eps : 0.0),
        C(eps_in_sqrt ? 0.0 : eps),
        C(weight_decay),
        C(decoupled ? 1 - lr * weight_decay : 1.0),
        C(momentum),
        C(maximize ? -1.0 : 1.0),
        weight_decay != 0 && !decoupled_weight_decay,
        nesterov,
        lr_in_momentum,
    };
  }
};

template <typename S>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

// Which buffers and momentum form a kernel is compiled for: branches on them
// inside the loop made GCC's vectorised loop 9x slower.
struct Variant {
  bool centered, momentum, nesterov, lr_in_momentum;
  // The multiplications by 1 left out, for steps whose decay_factor, sign and inverse
  // correction are 1 and whose weight decay is not coupled (x * 1 == x exactly). Even
  // a float32 step on one large tensor is partly compute-bound on 2 cores: 3-4% faster.
  bool plain = false;
  // Weight decay added to the gradient. A compile-time choice: GCC vectorised no loop
  // with a fused multiply-add under a run-time condition.
  bool coupled_weight_decay = false;
};

inline float root(float x) { return std::sqrt(x); }
inline double root(double x) { return std::sqrt(x); }

// a * b + c, rounded once where the machine has fused multiply-adds (as
// rmsprop._numba_kernels.mul_add): a float32 step on one large tensor was 4-6%
// faster with them. Without them, std::fma would be a slow library call.
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
constexpr bool kFusedMultiplyAdd = true;
inline float mul_add(float a, float b, float c) { return std::fma(a, b, c); }
inline double mul_add(double a, double b, double c) { return std::fma(a, b, c); }
#else
constexpr bool kFusedMultiplyAdd = false;
template <typename A, typename L>
inline L mul_add(A a, L b, L c) {
  return a * b + c;
}
#endif

#if defined(__AVX2__) && defined(__F16C__)
// Eight float32 lanes (GCC's vector extension, one AVX register). 16-bit tensors are
// stepped eight elements at a time, converted in registers: through blocks on the stack
// the step made 7 stores per 8 elements instead of 2, and was 15-20% slower (measured on AVX2).
constexpr int64_t kLanes = 8;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes root(Lanes x) { return _mm256_sqrt_ps(x); }
// a is a float or Lanes.
template <typename A>
inline Lanes mul_add(A a, Lanes b, Lanes c) {
  if constexpr (kFusedMultiplyAdd) return _mm256_fmadd_ps(Lanes{} + a, b, c);
  else return a * b + c;
}
#endif

// One element of the rule of rmsprop.functional (see rmsprop._numba_kernels._rule), or
// one per lane when L is a vector of C (Lanes above): the operators act lane by lane.
template <typename L, typename C, Variant V>
inline void apply_rule(L& p, L g, L& v, L& m, L& b, C inverse_correction, const Constants<C>& k) {
  if constexpr (!V.plain) {
    p = p * k.decay_factor;
    g = g * k.sign;
    if constexpr (V.coupled_weight_decay) g = mul_add(k.weight_decay, p, g);
  }
  v = mul_add(k.alpha, v, k.rate * (g * g));
  L second_moment = v;
  if constexpr (!V.plain) second_moment = second_moment * inverse_correction;
  if constexpr (V.centered) {
    m = mul_add(k.rate, g - m, m);
    L mean = m;
    if constexpr (!V.plain) mean = mean * inverse_correction;
    second_moment = mul_add(-mean, mean, second_moment);
    // clamp_min(0): NaN stays NaN. A select of a constant, not arithmetic under a
    // condition, which GCC will not vectorise without AVX-512's masks.
    second_moment = second_moment < 0 ? L{} : second_moment;
  }
  L u = g / (root(second_moment + k.eps_inside) + k.eps_outside);
  if constexpr (V.momentum && V.lr_in_momentum) {
    L lr_u = k.lr * u;
    b = mul_add(k.momentum, b, lr_u);
    p = p - (V.nesterov ? mul_add(k.momentum, b, lr_u) : b);
  } else {
    L direction = u;
    if constexpr (V.momentum) {
      b = mul_add(k.momentum, b, u);
      direction = V.nesterov ? mul_add(k.momentum, b, u) : b;
    }
    p = mul_add(-k.lr, direction, p);
  }
}

// The rule over n elements held in the compute type (m, b unused unless the variant has them).
template <typename C, Variant V>
inline void apply_rule_to(C* __restrict p, const C* __restrict g, C* __restrict v, C* __restrict m,
                          C* __restrict b, int64_t n, C inverse_correction, const Constants<C>& k) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    C pi = p[i], vi = v[i], mi = 0, bi = 0;
    if constexpr (V.centered) mi = m[i];
    if constexpr (V.momentum) bi = b[i];
    apply_rule<C, C, V>(pi, g[i], vi, mi, bi, inverse_correction, k);
    p[i] = pi;
    v[i] = vi;
    if constexpr (V.centered) m[i] = mi;
    if constexpr (V.momentum) b[i] = bi;
  }
}

// 16-bit storage to float32 and back (round to nearest even, as c10's
// conversions), a block at a time: element by element, c10's conversions
// stay scalar and made the step 3-4x slower than torch's for-loop path.
inline void widen(const c10::BFloat16* from, float* to, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) to[i] = c10::bit_cast<float>(static_cast<uint32_t>(from[i].x) << 16);
}

inline void narrow(const float* from, c10::BFloat16* to, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = c10::bit_cast<uint32_t>(from[i]);
    const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
    to[i].x = static_cast<uint16_t>(from[i] != from[i] ? UINT32_C(0x7FC0) : rounded);
  }
}

inline void widen(const c10::Half* from, float* to, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(to + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i))));
#endif
  for (; i < n; ++i) to[i] = static_cast<float>(from[i]);
}

inline void narrow(const float* from, c10::Half* to, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) to[i] = c10::Half(from[i]);
}

// Elements per block of a 16-bit tensor converted to float32 on the stack (5 KB at most).
constexpr int64_t kConvertBlock = 256;

#if defined(__AVX2__) && defined(__F16C__)
inline Lanes widen_lanes(const c10::BFloat16* from) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline Lanes widen_lanes(const c10::Half* from) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from)));
}

// As narrow() above: round to nearest even, NaN to 0x7FC0.
inline void narrow_lanes(Lanes x, c10::BFloat16* to) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(to), packed);
}

inline void narrow_lanes(Lanes x, c10::Half* to) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(to), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

// The rule over the first multiple of kLanes of n 16-bit elements; returns how many it stepped.
template <typename S, Variant V>
int64_t step_lanes(S* p, const S* g, S* v, S* m, S* b, int64_t n, float inverse_correction,
                   const Constants<float>& k) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Lanes pi = widen_lanes(p + i), vi = widen_lanes(v + i), mi{}, bi{};
    if constexpr (V.centered) mi = widen_lanes(m + i);
    if constexpr (V.momentum) bi = widen_lanes(b + i);
    apply_rule<Lanes, float, V>(pi, widen_lanes(g + i), vi, mi, bi, inverse_correction, k);
    narrow_lanes(pi, p + i);
    narrow_lanes(vi, v + i);
    if constexpr (V.centered) narrow_lanes(mi, m + i);
    if constexpr (V.momentum) narrow_lanes(bi, b + i);
  }
  return i;
}
#endif

template <typename S, Variant V>
void step_chunk_as(const Entry& entry, int64_t start, int64_t end, double inverse_correction,
                   const Constants<typename ComputeType<S>::type>& k) {
  using C = typename ComputeType<S>::type;
  S* p = static_cast<S*>(entry.param) + start;
  const S* g = static_cast<const S*>(entry.grad) + start;
  S* v = static_cast<S*>(entry.square_avg) + start;
  S* m = V.centered ? static_cast<S*>(entry.grad_avg) + start : nullptr;
  S* b = V.momentum ? static_cast<S*>(entry.momentum_buffer) + start : nullptr;
  const int64_t n = end - start;
  if constexpr (std::is_same_v<S, C>) {
    apply_rule_to<C, V>(p, g, v, m, b, n, C(inverse_correction), k);
  } else {
    int64_t start_of_rest = 0;
#if defined(__AVX2__) && defined(__F16C__)
    start_of_rest = step_lanes<S, V>(p, g, v, m, b, n, C(inverse_correction), k);
#endif
    // The portable path, and the last elements of a chunk that fill no vector.
    alignas(64) C ps[kConvertBlock], gs[kConvertBlock], vs[kConvertBlock], ms[kConvertBlock], bs[kConvertBlock];
    for (int64_t first = start_of_rest; first < n; first += kConvertBlock) {
      const int64_t count = std::min(kConvertBlock, n - first);
      widen(p + first, ps, count);
      widen(g + first, gs, count);
      widen(v + first, vs, count);
      if constexpr (V.centered) widen(m + first, ms, count);
      if constexpr (V.momentum) widen(b + first, bs, count);
      apply_rule_to<C, V>(ps, gs, vs, ms, bs, count, C(inverse_correction), k);
      narrow(ps, p + first, count);
      narrow(vs, v + first, count);
      if constexpr (V.centered) narrow(ms, m + first, count);
      if constexpr (V.momentum) narrow(bs, b + first, count);
    }
  }
}

// step_chunk_as the variant of these constants: plain, with coupled weight decay, or neither.
template <typename S, Variant V>
void step_chunk(const Entry& entry, int64_t start, int64_t end, double inverse_correction,
                const Constants<typename ComputeType<S>::type>& k) {
  constexpr Variant kPlain{V.centered, V.momentum, V.nesterov, V.lr_in_momentum, true, false};
  constexpr Variant kCoupled{V.centered, V.momentum, V.nesterov, V.lr_in_momentum, false, true};
  if (k.decay_factor == 1 && k.sign == 1 && !k.coupled_weight_decay && inverse_correction == 1)
    step_chunk_as<S, kPlain>(entry, start, end, inverse_correction, k);
  else if (k.coupled_weight_decay)
    step_chunk_as<S, kCoupled>(entry, start, end, inverse_correction, k);
  else
    step_chunk_as<S, V>(entry, start, end, inverse_correction, k);
}

template <typename S, bool Centered>
void step_chunk_with_momentum_of(const Plan& plan, const Entry& entry, int64_t start, int64_t end,
                                 double inverse_correction, const Constants<typename ComputeType<S>::type>& k) {
  const bool nesterov = k.nesterov, lr_in_momentum = k.lr_in_momentum;
  if (!plan.momentum) step_chunk<S, Variant{Centered, false, false, false}>(entry, start, end, inverse_correction, k);
  else if (nesterov && lr_in_momentum) step_chunk<S, Variant{Centered, true, true, true}>(entry, start, end, inverse_correction, k);
  else if (nesterov) step_chunk<S, Variant{Centered, true, true, false}>(entry, start, end, inverse_correction, k);
  else if (lr_in_momentum) step_chunk<S, Variant{Centered, true, false, true}>(entry, start, end, inverse_correction, k);
  else step_chunk<S, Variant{Centered, true, false, false}>(entry, start, end, inverse_correction, k);
}

template <typename S>
void step_chunk_of(const Plan& plan, const Entry& entry, int64_t start, int64_t end, double inverse_correction,
                   const Constants<typename ComputeType<S>::type>& k) {
  if (plan.centered) step_chunk_with_momentum_of<S, true>(plan, entry, start, end, inverse_correction, k);
  else step_chunk_with_momentum_of<S, false>(plan, entry, start, end, inverse_correction, k);
}

// Chunks as (entry, first element) pairs.
std::vector<std::pair<int64_t, int64_t>> chunks_of(const std::vector<Entry>& entries) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (size_t e = 0; e < entries.size(); ++e)
    for (int64_t start = 0; start < entries[e].size; start += kChunk) chunks.emplace_back(e, start);
  return chunks;
}

void run(Plan& plan, const Hyperparameters& hp) {
  const int64_t count = static_cast<int64_t>(plan.entries.size());
  std::vector<double> inverse_corrections(count);
  // On the threads too: with many small tensors, a cache miss per step tensor adds up.
  at::parallel_for(0, count, kCheckGrain, [&](int64_t first, int64_t last) {
    for (int64_t e = first; e < last; ++e) {
      const Entry& entry = plan.entries[e];
      double step;
      if (entry.step_is_double) step = *static_cast<double*>(entry.step) += 1;
      else step = *static_cast<float*>(entry.step) += 1;
      // 1 / (1 - alpha^t) in float64, then rounded to the compute type: a product per
      // element instead of a quotient (a division is the loop's costliest operation),
      // exact without bias correction and within a rounding of the for-loop path's quotient with it.
      inverse_corrections[e] = hp.bias_correction ? 1.0 / (1.0 - std::pow(hp.alpha, step)) : 1.0;
    }
  });
  const auto chunks = chunks_of(plan.entries);
  const auto single = hp.constants<float>();
  const auto dbl = hp.constants<double>();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const auto [e, start] = chunks[c];
      const Entry& entry = plan.entries[e];
      const int64_t end = std::min(start + kChunk, entry.size);
      switch (entry.storage) {
        case Storage::Float32: step_chunk_of<float>(plan, entry, start, end, inverse_corrections[e], single); break;
        case Storage::Float64: step_chunk_of<double>(plan, entry, start, end, inverse_corrections[e], dbl); break;
        case Storage::BFloat16: step_chunk_of<c10::BFloat16>(plan, entry, start, end, inverse_corrections[e], single); break;
        case Storage::Float16: step_chunk_of<c10::Half>(plan, entry, start, end, inverse_corrections[e], single); break;
      }
    }
  });
  // Writes through raw pointers are invisible to autograd's check that saved tensors are unchanged.
  for (c10::TensorImpl* param : plan.params)
    if (!param->is_inference()) param->bump_version();
}

// --- gathering and checking ---------------------------------------------------

PyTypeObject* tensor_type = nullptr;
PyTypeObject* parameter_type = nullptr;

std::optional<Storage> storage_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: case at::kComplexFloat: return Storage::Float32;
    case at::kDouble: case at::kComplexDouble: return Storage::Float64;
    case at::kBFloat16: return Storage::BFloat16;
    case at::kHalf: return Storage::Float16;
    default: return std::nullopt;
  }
}

// The tensor of a Python object if it is a plain torch.Tensor or nn.Parameter.
const at::Tensor* plain_tensor(PyObject* object) {
  if (object == nullptr || (Py_TYPE(object) != tensor_type && Py_TYPE(object) != parameter_type)) return nullptr;
  return &THPVariable_Unpack(object);
}

// Why the kernel cannot update ``tensor`` in place as the ``what`` of ``param``.
std::optional<std::string> misfit(const at::Tensor* tensor, const at::Tensor& param, const char* what) {
  auto problem = [what](const char* text) { return std::string(what) + text; };
  if (tensor == nullptr) return problem(" is not a plain tensor");
  if (!tensor->defined()) return problem(" is missing");
  if (tensor->layout() != at::kStrided) return problem(" is not a dense (strided) tensor");
  if (!tensor->device().is_cpu()) return problem(" is not on the CPU");
  if (tensor->scalar_type() != param.scalar_type()) return problem(" has another dtype than the parameter");
  if (tensor->sizes() != param.sizes()) return problem(" has another shape than the parameter");
  if (!tensor->is_contiguous()) return problem(" is not contiguous");
  // A lazy view: its memory holds the values before conjugation or negation.
  if (tensor->is_conj() || tensor->is_neg()) return problem(" has its conjugate or negative bit set");
  return std::nullopt;
}

bool step_fits(const at::Tensor* step) {
  return step != nullptr && step->defined() && step->device().is_cpu() && step->layout() == at::kStrided &&
         (step->scalar_type() == at::kFloat || step->scalar_type() == at::kDouble) && step->numel() == 1;
}

// One parameter's tensors as found (nullptr: not a plain tensor, or absent), before any check.
struct Candidate {
  size_t index;  // in the group or lists, for messages
  const at::Tensor* param;
  const at::Tensor* grad;
  const at::Tensor* square_avg;
  const at::Tensor* grad_avg;
  const at::Tensor* momentum_buffer;
  const at::Tensor* step;
};

// Checks one candidate and fills its entry. Touches no Python object, so it
// runs on torch's threads: most of a gather's time is cache misses on tensors.
std::optional<std::string> check(const Candidate& c, bool centered, bool momentum, Entry& entry) {
  const at::Tensor& param = *c.param;
  auto storage = storage_of(param.scalar_type());
  if (!storage) return std::string("its dtype is not float32, float64, bfloat16, float16 or complex");
  if (auto why = misfit(c.param, param, "the parameter")) return why;
  if (auto why = misfit(c.grad, param, "its gradient")) return why;
  if (auto why = misfit(c.square_avg, param, "its 'square_avg'")) return why;
  if (centered)
    if (auto why = misfit(c.grad_avg, param, "its 'grad_avg'")) return why;
  if (momentum)
    if (auto why = misfit(c.momentum_buffer, param, "its 'momentum_buffer'")) return why;
  if (!step_fits(c.step)) return std::string("its 'step' is not a 1-element float32 or float64 CPU tensor");
  entry = Entry{
      *storage,
      param.numel() * (param.is_complex() ? 2 : 1),
      param.data_ptr(),
      c.grad->data_ptr(),
      c.square_avg->data_ptr(),
      centered ? c.grad_avg->data_ptr() : nullptr,
      momentum ? c.momentum_buffer->data_ptr() : nullptr,
      c.step->data_ptr(),
      c.step->scalar_type() == at::kDouble,
  };
  return std::nullopt;
}

struct Gathered {
  std::optional<Plan> plan;
  std::string reason;
};

Gathered refuse(size_t index, const std::string& reason) {
  return Gathered{std::nullopt, "parameter " + std::to_string(index) + ": " + reason};
}

// The plan of the candidates, or why the first unfit one (in order) cannot be stepped.
Gathered checked_plan(const std::vector<Candidate>& candidates, bool centered, bool momentum) {
  const int64_t count = static_cast<int64_t>(candidates.size());
  Plan plan;
  plan.centered = centered;
  plan.momentum = momentum;
  plan.entries.resize(count);
  plan.params.resize(count);
  std::vector<std::optional<std::string>> problems(count);
  at::parallel_for(0, count, kCheckGrain, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const Candidate& c = candidates[i];
      problems[i] = check(c, centered, momentum, plan.entries[i]);
      plan.params[i] = c.param->unsafeGetTensorImpl();
    }
  });
  for (int64_t i = 0; i < count; ++i)
    if (problems[i]) return refuse(candidates[i].index, *problems[i]);
  return Gathered{std::move(plan), ""};
}

// The state's keys, made once: PyDict_GetItemString would build and hash a new str per lookup.
PyObject* square_avg_key = nullptr;
PyObject* grad_avg_key = nullptr;
PyObject* momentum_buffer_key = nullptr;
PyObject* step_key = nullptr;
// Whether hash(tensor) is its address (Tensor.__hash__ returns id(self), a Python call per lookup).
bool hash_is_address = false;

PyObject* state_of(PyObject* state, PyObject* param) {
#if PY_VERSION_HEX < 0x030D0000
  if (hash_is_address)
    return _PyDict_GetItem_KnownHash(state, param, static_cast<Py_hash_t>(reinterpret_cast<uintptr_t>(param)));
#endif
  return PyDict_GetItemWithError(state, param);
}

const at::Tensor* entry_of(PyObject* state, PyObject* key) {
  PyObject* value = PyDict_GetItemWithError(state, key);
  if (value == nullptr && PyErr_Occurred()) throw py::error_already_set();
  return plain_tensor(value);
}

// Starts loading what the gather of later params will read (the objects
// behind the objects behind a param), so that their cache misses overlap.
void prefetch_ahead(PyObject* params, size_t i, size_t count) {
  constexpr size_t kObjects = 12, kImpls = 8, kMetas = 4;
  if (i + kObjects < count) __builtin_prefetch(PyList_GET_ITEM(params, i + kObjects));
  if (i + kImpls < count) {
    if (const at::Tensor* tensor = plain_tensor(PyList_GET_ITEM(params, i + kImpls))) {
      const char* impl = reinterpret_cast<const char*>(tensor->unsafeGetTensorImpl());
      __builtin_prefetch(impl);
      __builtin_prefetch(impl + 64);
    }
  }
  if (i + kMetas < count) {
    if (const at::Tensor* tensor = plain_tensor(PyList_GET_ITEM(params, i + kMetas)))
      __builtin_prefetch(tensor->unsafeGetTensorImpl()->autograd_meta());
  }
}

// The step of every parameter of ``params`` that has a gradient, with the
// state it has in ``state`` (the optimizer's mapping), or why there is none:
// a missing or unfit tensor anywhere leaves the whole group to the Python paths.
Gathered gather_group(const py::list& params, const py::dict& state, bool centered, bool momentum) {
  std::vector<Candidate> candidates;
  const size_t count = params.size();
  candidates.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    prefetch_ahead(params.ptr(), i, count);
    PyObject* param_object = PyList_GET_ITEM(params.ptr(), i);
    const at::Tensor* param = plain_tensor(param_object);
    if (param == nullptr) return refuse(i, "not a plain tensor");
    const at::Tensor& grad = param->grad();
    if (!grad.defined()) continue;
    // Not state[param]: the optimizer's defaultdict would add an entry.
    PyObject* param_state = state_of(state.ptr(), param_object);
    if (param_state == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return refuse(i, "has no state yet");
    }
    if (!PyDict_Check(param_state)) return refuse(i, "its state is not a dict");
    candidates.push_back(Candidate{i, param, &grad, entry_of(param_state, square_avg_key),
                                   centered ? entry_of(param_state, grad_avg_key) : nullptr,
                                   momentum ? entry_of(param_state, momentum_buffer_key) : nullptr,
                                   entry_of(param_state, step_key)});
  }
  return checked_plan(candidates, centered, momentum);
}

// The same from lists, as rmsprop.functional passes them (empty lists for unused state).
Gathered gather_tensors(const py::list& params, const py::list& grads, const py::list& square_avgs,
                        const py::list& grad_avgs, const py::list& momentum_buffers, const py::list& steps) {
  const bool centered = !grad_avgs.empty(), momentum = !momentum_buffers.empty();
  const size_t count = params.size();
  if (grads.size() != count || square_avgs.size() != count || steps.size() != count ||
      (centered && grad_avgs.size() != count) || (momentum && momentum_buffers.size() != count))
    return Gathered{std::nullopt, "the lists of tensors differ in length"};
  std::vector<Candidate> candidates;
  candidates.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    auto item = [i](const py::list& list) { return plain_tensor(PyList_GET_ITEM(list.ptr(), i)); };
    if (item(params) == nullptr) return refuse(i, "not a plain tensor");
    candidates.push_back(Candidate{i, item(params), item(grads), item(square_avgs),
                                   centered ? item(grad_avgs) : nullptr, momentum ? item(momentum_buffers) : nullptr,
                                   item(steps)});
  }
  return checked_plan(candidates, centered, momentum);
}

py::object as_python(Gathered gathered) {
  if (gathered.plan) return py::cast(std::move(*gathered.plan));
  return py::str(gathered.reason);
}

// The memory traffic of a step and nothing else (the benchmark's bound): reads
// the gradient and reads and writes back the parameter and each buffer the
// variant has, chunked and threaded as run(). Adding ``g - g`` keeps finite
// values but cannot be optimised away without fast-math.
template <Variant V>
void stream_chunk(const Entry& entry, int64_t start, int64_t end) {
  float* __restrict p = static_cast<float*>(entry.param) + start;
  const float* __restrict g = static_cast<const float*>(entry.grad) + start;
  float* __restrict v = static_cast<float*>(entry.square_avg) + start;
  float* __restrict m = V.centered ? static_cast<float*>(entry.grad_avg) + start : nullptr;
  float* __restrict b = V.momentum ? static_cast<float*>(entry.momentum_buffer) + start : nullptr;
  const int64_t n = end - start;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float nothing = g[i] - g[i];
    p[i] = p[i] + nothing;
    v[i] = v[i] + nothing;
    if constexpr (V.centered) m[i] = m[i] + nothing;
    if constexpr (V.momentum) b[i] = b[i] + nothing;
  }
}

void stream_step_traffic(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& square_avgs, const std::vector<at::Tensor>& grad_avgs,
                         const std::vector<at::Tensor>& momentum_buffers) {
  const bool centered = !grad_avgs.empty(), momentum = !momentum_buffers.empty();
  std::vector<Entry> entries;
  for (size_t i = 0; i < params.size(); ++i)
    entries.push_back(Entry{Storage::Float32, params[i].numel(), params[i].data_ptr(), grads[i].data_ptr(),
                            square_avgs[i].data_ptr(), centered ? grad_avgs[i].data_ptr() : nullptr,
                            momentum ? momentum_buffers[i].data_ptr() : nullptr, nullptr, false});
  const auto chunks = chunks_of(entries);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const auto [e, start] = chunks[c];
      const Entry& entry = entries[e];
      const int64_t end = std::min(start + kChunk, entry.size);
      if (centered && momentum) stream_chunk<Variant{true, true, false, false}>(entry, start, end);
      else if (centered) stream_chunk<Variant{true, false, false, false}>(entry, start, end);
      else if (momentum) stream_chunk<Variant{false, true, false, false}>(entry, start, end);
      else stream_chunk<Variant{false, false, false, false}>(entry, start, end);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  tensor_type = reinterpret_cast<PyTypeObject*>(py::module_::import("torch").attr("Tensor").ptr());
  parameter_type = reinterpret_cast<PyTypeObject*>(py::module_::import("torch.nn").attr("Parameter").ptr());
  square_avg_key = PyUnicode_InternFromString("square_avg");
  grad_avg_key = PyUnicode_InternFromString("grad_avg");
  momentum_buffer_key = PyUnicode_InternFromString("momentum_buffer");
  step_key = PyUnicode_InternFromString("step");
  py::object probe = py::module_::import("torch").attr("zeros")(1);
  hash_is_address = PyObject_Hash(probe.ptr()) == static_cast<Py_hash_t>(reinterpret_cast<uintptr_t>(probe.ptr()));

  py::class_<Plan>(module, "Plan", "The checked tensors of one step (see gather_group); run() steps them.")
      .def_property_readonly("size", [](const Plan& plan) { return plan.entries.size(); });
  py::class_<Hyperparameters>(module, "Hyperparameters")
      .def(py::init<double, double, double, double, double, bool, bool, bool, bool, bool, bool>(), py::arg("lr"),
           py::arg("alpha"), py::arg("eps"), py::arg("weight_decay"), py::arg("momentum"), py::arg("maximize"),
           py::arg("eps_in_sqrt"), py::arg("decoupled_weight_decay"), py::arg("bias_correction"),
           py::arg("nesterov"), py::arg("lr_in_momentum"));
  module.def(
      "gather_group",
      [](const py::list& params, const py::dict& state, bool centered, bool momentum) {
        return as_python(gather_group(params, state, centered, momentum));
      },
      "A Plan of the group's params with gradients and their state, or why there is none (a str).");
  module.def(
      "gather_tensors",
      [](const py::list& params, const py::list& grads, const py::list& square_avgs, const py::list& grad_avgs,
         const py::list& momentum_buffers, const py::list& steps) {
        return as_python(gather_tensors(params, grads, square_avgs, grad_avgs, momentum_buffers, steps));
      },
      "A Plan of these tensors, or why there is none (a str).");
  module.def("run", &run, "Increment the steps and apply the rule to every element of the plan.");
  module.def("stream_step_traffic", &stream_step_traffic,
             "The memory traffic of a step over float32 tensors, nothing else (the benchmark's bound); "
             "empty grad_avgs / momentum_buffers for a step without them.");
}
