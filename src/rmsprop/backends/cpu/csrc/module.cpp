// rmsprop._cpu_kernel: the fused CPU step as a CPython extension.
//
// Python hands over the tensors as addresses (int64 buffers) with their
// element counts, checked beforehand (rmsprop.backends.cpu.kernel). Here the steps are
// incremented, each tensor's bias correction and noise seeds computed, and the
// chunks of every tensor spread over a small pool of threads, each running
// the chunk function of the instruction set chosen at import (isa_*.cpp).
// No torch headers: the extension builds with the Python headers alone.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernel.h"

namespace rmsprop_kernel {
namespace {

struct InstructionSet {
  const char* name;
  ChunkFunction (*chunk_function)(Storage, Format, unsigned);
  CodeFunction (*code_function)();
  bool (*supported)();
};

bool has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool always() { return true; }

// Best first.
const InstructionSet kInstructionSets[] = {
    {"avx512", chunk_function_avx512, code_function_avx512, has_avx512},
    {"avx2", chunk_function_avx2, code_function_avx2, has_avx2},
    {"portable", chunk_function_portable, code_function_portable, always},
};

bool compiled(const InstructionSet& set) { return set.chunk_function(Storage::Float32, Format::Same, 0) != nullptr; }

const InstructionSet* selected = nullptr;

// --- threads ------------------------------------------------------------------

// A pool of threads that sleep between steps (no spinning against torch's
// intra-op threads); the calling thread takes a share of every task.
class Pool {
 public:
  void run(int threads, const std::function<void()>& task) {
    const int helpers = std::max(threads, 1) - 1;
    if (helpers == 0) {
      task();
      return;
    }
    // One task at a time: steps of two Python threads (the GIL released) take turns.
    std::lock_guard<std::mutex> one_at_a_time(running_);
    {
      std::unique_lock<std::mutex> lock(mutex_);
      while (int(workers_.size()) < helpers) workers_.emplace_back([this, index = int(workers_.size())] { work(index); });
      task_ = &task;
      helpers_ = helpers;
      pending_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    task();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  void work(int index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= helpers_) continue;
      const std::function<void()>* task = task_;
      lock.unlock();
      (*task)();
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_, running_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void()>* task_ = nullptr;
  int helpers_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

Pool* pool = new Pool;

// A forked child has none of its parent's threads: it starts a pool of its own (the old one is
// abandoned, its mutex possibly held by a thread that does not exist there).
void after_fork_in_child() { pool = new Pool; }

// Below this many elements a step stays on the calling thread: waking the pool costs more.
constexpr int64_t kElementsPerThread = 1 << 15;

// Runs chunk(entry, start, end) over every chunk of every entry, spread over up to `threads` threads.
void for_each_chunk(const std::vector<Entry>& entries, int threads,
                    const std::function<void(const Entry&, int64_t, int64_t)>& chunk) {
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (entry, first element)
  int64_t total = 0;
  for (size_t e = 0; e < entries.size(); ++e) {
    total += entries[e].size;
    for (int64_t start = 0; start < entries[e].size; start += kChunk) chunks.emplace_back(int64_t(e), start);
  }
  const int64_t useful = std::max<int64_t>(1, std::min<int64_t>(int64_t(chunks.size()), total / kElementsPerThread));
  std::atomic<size_t> next{0};
  const std::function<void()> task = [&] {
    for (size_t c = next++; c < chunks.size(); c = next++) {
      const Entry& entry = entries[chunks[c].first];
      const int64_t start = chunks[c].second;
      chunk(entry, start, std::min(start + kChunk, entry.size));
    }
  };
  pool->run(int(std::min<int64_t>(threads, useful)), task);
}

// --- arguments ------------------------------------------------------------------

// A read-only view of an int64 buffer argument (numpy array, array.array), or of None.
class Int64s {
 public:
  bool open(PyObject* object, Py_ssize_t count, const char* what) {
    if (object == Py_None) return true;
    if (PyObject_GetBuffer(object, &view_, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return false;
    held_ = true;
    if (view_.itemsize != 8 || (view_.format && std::strchr("qlQL", view_.format[0]) == nullptr) ||
        view_.len / 8 != count) {
      PyErr_Format(PyExc_ValueError, "%s must hold %zd int64 values", what, count);
      return false;
    }
    return true;
  }
  ~Int64s() {
    if (held_) PyBuffer_Release(&view_);
  }
  bool present() const { return held_; }
  int64_t operator[](Py_ssize_t i) const { return held_ ? static_cast<const int64_t*>(view_.buf)[i] : 0; }
  void* address(Py_ssize_t i) const { return reinterpret_cast<void*>(static_cast<intptr_t>((*this)[i])); }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

// The maps of 8-bit state, copied once by set_maps.
std::vector<float> signed_map, unsigned_map;

bool copy_buffer(PyObject* object, void* into, size_t bytes, const char* what) {
  Py_buffer view;
  if (PyObject_GetBuffer(object, &view, PyBUF_C_CONTIGUOUS) != 0) return false;
  const bool fits = size_t(view.len) == bytes;
  if (fits) std::memcpy(into, view.buf, bytes);
  else PyErr_Format(PyExc_ValueError, "%s must hold %zu bytes, not %zd", what, bytes, view.len);
  PyBuffer_Release(&view);
  return fits;
}

constexpr size_t kMapSize = 256;

// Whether map has the layout the encoding computes codes for (kernel.h, MapLayout): its ends,
// and each bin's midpoint where the layout puts it, within far less than the margin.
bool has_layout(const std::vector<float>& map, bool is_signed) {
  const MapLayout& layout = is_signed ? kSignedLayout : kUnsignedLayout;
  const size_t zero = is_signed ? 127 : 0, first = zero + 1;
  if (map[zero] != 0.0f || map[kMapSize - 1] != 1.0f || (is_signed && map[0] != -1.0f)) return false;
  for (int k = 0; k < kDecades; ++k)
    for (int32_t b = 0; b < layout.bins[k]; ++b) {
      const double midpoint = (0.1 + (b + 0.5) * 0.9 / layout.bins[k]) * kDecadeTops[k];
      const size_t index = first + size_t(layout.base[k] + b);
      if (std::abs(map[index] - midpoint) > 1e-5 * midpoint) return false;
      // The negative half mirrors the positive one, but for the smallest midpoint.
      if (is_signed && index > first && map[2 * zero - (index - 1)] != -map[index]) return false;
    }
  return true;
}

PyObject* set_maps(PyObject*, PyObject* args) {
  PyObject *signed_values, *unsigned_values;
  if (!PyArg_ParseTuple(args, "OO", &signed_values, &unsigned_values)) return nullptr;
  std::vector<float> new_signed(kMapSize), new_unsigned(kMapSize);
  if (!copy_buffer(signed_values, new_signed.data(), kMapSize * 4, "the signed map") ||
      !copy_buffer(unsigned_values, new_unsigned.data(), kMapSize * 4, "the unsigned map"))
    return nullptr;
  if (!has_layout(new_signed, true) || !has_layout(new_unsigned, false)) {
    PyErr_SetString(PyExc_ValueError, "the maps are not the dynamic maps (7 decades) whose codes the kernel computes");
    return nullptr;
  }
  signed_map.swap(new_signed);
  unsigned_map.swap(new_unsigned);
  Py_RETURN_NONE;
}

// rmsprop.formats.noise.rounding_seed: buffer key of parameter param_index at step.
uint64_t rounding_seed(int64_t param_index, int64_t key, int64_t step) {
  uint64_t seed = random_bits(uint64_t(param_index), 0);
  seed = random_bits(seed ^ uint64_t(key), 0);
  return random_bits(seed ^ uint64_t(step), 0);
}

const InstructionSet* instruction_set_named(PyObject* name) {
  const char* text = PyUnicode_AsUTF8(name);
  if (text == nullptr) return nullptr;
  for (const InstructionSet& set : kInstructionSets)
    if (std::strcmp(set.name, text) == 0) {
      if (!compiled(set) || !set.supported()) {
        PyErr_Format(PyExc_ValueError, "instruction set %R is not available here (see available_instruction_sets())",
                     name);
        return nullptr;
      }
      return &set;
    }
  PyErr_Format(PyExc_ValueError, "unknown instruction set %R (avx512, avx2 or portable)", name);
  return nullptr;
}

// step(storage, format, variant, scalars, alpha, bias_correction, sizes, params, grads, squares,
//      square_absmaxes, grad_avgs, grad_avg_absmaxes, momenta, momentum_absmaxes, steps,
//      step_is_double, param_indices, keys, threads, instruction_set)
PyObject* step(PyObject*, PyObject* args) {
  int storage, format, threads, bias_correction, step_is_double, nesterov, lr_in_momentum;
  unsigned variant;
  Scalars s{};
  double alpha;
  PyObject *sizes_object, *lists[9], *indices_object, *isa_name;
  long long keys[3];
  if (!PyArg_ParseTuple(args, "iiI(dddddddddpp)dpOOOOOOOOOOpO(LLL)iO", &storage, &format, &variant, &s.lr, &s.alpha,
                        &s.rate, &s.eps_inside, &s.eps_outside, &s.weight_decay, &s.decay_factor, &s.momentum, &s.sign,
                        &nesterov, &lr_in_momentum, &alpha, &bias_correction, &sizes_object, &lists[0], &lists[1],
                        &lists[2], &lists[3], &lists[4], &lists[5], &lists[6], &lists[7], &lists[8], &step_is_double,
                        &indices_object, &keys[0], &keys[1], &keys[2], &threads, &isa_name))
    return nullptr;
  s.nesterov = nesterov;
  s.lr_in_momentum = lr_in_momentum;
  const InstructionSet* isa = isa_name == Py_None ? selected : instruction_set_named(isa_name);
  if (isa == nullptr) return nullptr;
  if (storage < 0 || storage > 3 || format < 0 || format > 3 || variant >= kVariants) {
    PyErr_SetString(PyExc_ValueError, "storage, format or variant out of range");
    return nullptr;
  }
  Job job{Storage(storage), Format(format), normalized(variant), s, {}, {}};
  const ChunkFunction chunk = isa->chunk_function(job.storage, job.format, job.variant);
  if (chunk == nullptr) {
    PyErr_SetString(PyExc_ValueError, "no kernel for this storage and state format");
    return nullptr;
  }
  const bool blockwise = job.format == Format::Blockwise8bit;
  if (blockwise) {
    if (signed_map.empty()) {
      PyErr_SetString(PyExc_RuntimeError, "set_maps() has not been called");
      return nullptr;
    }
    job.maps = Maps{signed_map.data(), unsigned_map.data()};
  }
  Py_buffer sizes_view;
  if (PyObject_GetBuffer(sizes_object, &sizes_view, PyBUF_C_CONTIGUOUS) != 0) return nullptr;
  const Py_ssize_t count = sizes_view.len / 8;
  PyBuffer_Release(&sizes_view);
  Int64s sizes, params, grads, squares, square_absmaxes, grad_avgs, grad_avg_absmaxes, momenta, momentum_absmaxes,
      steps, indices;
  const bool centered = job.variant & kCentered, momentum = job.variant & kMomentum;
  struct Required {
    Int64s* view;
    PyObject* object;
    bool needed;
    const char* what;
  };
  const Required required[] = {
      {&sizes, sizes_object, true, "sizes"},
      {&params, lists[0], true, "params"},
      {&grads, lists[1], true, "grads"},
      {&squares, lists[2], true, "square buffers"},
      {&square_absmaxes, lists[3], blockwise, "square absmaxes"},
      {&grad_avgs, lists[4], centered, "grad_avgs"},
      {&grad_avg_absmaxes, lists[5], blockwise && centered, "grad_avg absmaxes"},
      {&momenta, lists[6], momentum, "momentum buffers"},
      {&momentum_absmaxes, lists[7], blockwise && momentum, "momentum absmaxes"},
      {&steps, lists[8], true, "steps"},
      {&indices, indices_object, job.format == Format::BFloat16 || blockwise, "param_indices"},
  };
  for (const Required& r : required) {
    if (r.needed && r.object == Py_None) {
      PyErr_Format(PyExc_ValueError, "%s are needed by this step", r.what);
      return nullptr;
    }
    if (r.needed && !r.view->open(r.object, count, r.what)) return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS;
  job.entries.resize(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    Entry& e = job.entries[i];
    e.size = sizes[i];
    e.param = params.address(i);
    e.grad = grads.address(i);
    e.square = squares.address(i);
    e.square_absmax = static_cast<float*>(square_absmaxes.address(i));
    e.grad_avg = grad_avgs.address(i);
    e.grad_avg_absmax = static_cast<float*>(grad_avg_absmaxes.address(i));
    e.momentum = momenta.address(i);
    e.momentum_absmax = static_cast<float*>(momentum_absmaxes.address(i));
    double t;
    if (step_is_double) t = ++*static_cast<double*>(steps.address(i));
    else t = ++*static_cast<float*>(steps.address(i));
    // In float64, then rounded to the compute type by the chunk function.
    e.inverse_correction = bias_correction ? 1.0 / (1.0 - std::pow(alpha, t)) : 1.0;
    e.weight_after = e.inverse_correction;
    e.weight_before = bias_correction && t > 1 ? 1.0 / (1.0 - std::pow(alpha, t - 1)) : 1.0;
    for (int slot = 0; slot < 3; ++slot) e.seeds[slot] = rounding_seed(indices[i], keys[slot], int64_t(t));
  }
  for_each_chunk(job.entries, threads,
                 [&](const Entry& entry, int64_t start, int64_t end) { chunk(job, entry, start, end); });
  Py_END_ALLOW_THREADS;
  Py_RETURN_NONE;
}

// encode_codes(signed, scaled, noise, codes, instruction_set): the 8-bit encoding's codes of
// float32 values already divided by their block's absmax, rounded up where noise / 2^16 (uint16)
// is below the fraction (as a step finds them; for tests against the reference).
PyObject* encode_codes(PyObject*, PyObject* args) {
  int is_signed;
  PyObject *scaled_object, *noise_object, *codes_object, *isa_name;
  if (!PyArg_ParseTuple(args, "pOOOO", &is_signed, &scaled_object, &noise_object, &codes_object, &isa_name))
    return nullptr;
  const InstructionSet* isa = isa_name == Py_None ? selected : instruction_set_named(isa_name);
  if (isa == nullptr) return nullptr;
  if (signed_map.empty()) {
    PyErr_SetString(PyExc_RuntimeError, "set_maps() has not been called");
    return nullptr;
  }
  Py_buffer views[3];
  PyObject* objects[3] = {scaled_object, noise_object, codes_object};
  const int flags[3] = {PyBUF_C_CONTIGUOUS, PyBUF_C_CONTIGUOUS, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE};
  int opened = 0;
  for (; opened < 3; ++opened)
    if (PyObject_GetBuffer(objects[opened], &views[opened], flags[opened]) != 0) break;
  const Py_ssize_t count = opened == 3 ? views[0].len / 4 : 0;
  const bool fits = opened == 3 && views[0].len == count * 4 && views[1].len == count * 2 && views[2].len == count;
  if (opened == 3 && !fits) PyErr_SetString(PyExc_ValueError, "scaled: float32, noise: uint16, codes: uint8, of one length");
  if (fits) {
    const float* map = is_signed ? signed_map.data() : unsigned_map.data();
    isa->code_function()(is_signed, static_cast<const float*>(views[0].buf), static_cast<const uint16_t*>(views[1].buf),
                         count, map, static_cast<uint8_t*>(views[2].buf));
  }
  for (int k = 0; k < opened; ++k) PyBuffer_Release(&views[k]);
  if (!fits) return nullptr;
  Py_RETURN_NONE;
}

// The memory traffic of a float32 step and nothing else (the benchmark's bound):
// reads the gradient, reads and writes back the parameter and each buffer.
// Adding g - g keeps finite values but cannot be optimised away without fast-math.
PyObject* stream_step_traffic(PyObject*, PyObject* args) {
  PyObject *sizes_object, *lists[5];
  int threads;
  if (!PyArg_ParseTuple(args, "OOOOOOi", &sizes_object, &lists[0], &lists[1], &lists[2], &lists[3], &lists[4], &threads))
    return nullptr;
  Py_buffer sizes_view;
  if (PyObject_GetBuffer(sizes_object, &sizes_view, PyBUF_C_CONTIGUOUS) != 0) return nullptr;
  const Py_ssize_t count = sizes_view.len / 8;
  PyBuffer_Release(&sizes_view);
  Int64s sizes, views[5];
  if (!sizes.open(sizes_object, count, "sizes")) return nullptr;
  for (int k = 0; k < 5; ++k)
    if (!views[k].open(lists[k], count, "addresses")) return nullptr;
  std::vector<Entry> entries(count);
  for (Py_ssize_t i = 0; i < count; ++i)
    entries[i] = Entry{sizes[i], views[0].address(i), views[1].address(i), views[2].address(i), views[3].address(i),
                       views[4].address(i), nullptr, nullptr, nullptr, 0, 0, 0, {0, 0, 0}};
  Py_BEGIN_ALLOW_THREADS;
  for_each_chunk(entries, threads, [](const Entry& e, int64_t start, int64_t end) {
    float* __restrict p = static_cast<float*>(e.param) + start;
    const float* __restrict g = static_cast<const float*>(e.grad) + start;
    float* __restrict v = static_cast<float*>(e.square) + start;
    float* __restrict m = e.grad_avg ? static_cast<float*>(e.grad_avg) + start : nullptr;
    float* __restrict b = e.momentum ? static_cast<float*>(e.momentum) + start : nullptr;
    const int64_t n = end - start;
    for (int64_t i = 0; i < n; ++i) {
      const float nothing = g[i] - g[i];
      p[i] += nothing;
      v[i] += nothing;
    }
    if (m)
      for (int64_t i = 0; i < n; ++i) m[i] += g[i] - g[i];
    if (b)
      for (int64_t i = 0; i < n; ++i) b[i] += g[i] - g[i];
  });
  Py_END_ALLOW_THREADS;
  Py_RETURN_NONE;
}


// --- gathering a group from the optimizer's state -------------------------------

// torch's objects, given once by set_torch: the gather compares against them.
struct Torch {
  PyTypeObject *tensor, *parameter;
  PyObject *strided, *float32, *float64, *bfloat16, *float16, *complex64, *complex128;
} torch_objects{};
bool torch_set = false;

PyObject *name_grad, *name_layout, *name_dtype, *name_shape, *name_is_cpu, *name_is_contiguous, *name_is_neg,
    *name_is_conj, *name_data_ptr, *name_numel, *name_version;

PyObject* set_torch(PyObject*, PyObject* args) {
  Torch t{};
  PyObject *tensor, *parameter;
  if (!PyArg_ParseTuple(args, "O!O!OOOOOOO", &PyType_Type, &tensor, &PyType_Type, &parameter, &t.strided, &t.float32,
                        &t.float64, &t.bfloat16, &t.float16, &t.complex64, &t.complex128))
    return nullptr;
  t.tensor = reinterpret_cast<PyTypeObject*>(tensor);
  t.parameter = reinterpret_cast<PyTypeObject*>(parameter);
  for (PyObject* object : {tensor, parameter, t.strided, t.float32, t.float64, t.bfloat16, t.float16, t.complex64,
                           t.complex128})
    Py_INCREF(object);  // kept for the life of the process
  torch_objects = t;
  torch_set = true;
  Py_RETURN_NONE;
}

// The value of a bool attribute or no-argument method; -1 with an exception set on failure.
int truth(PyObject* object, PyObject* name, bool method) {
  PyObject* value = method ? PyObject_CallMethodNoArgs(object, name) : PyObject_GetAttr(object, name);
  if (value == nullptr) return -1;
  const int result = value == Py_True;
  Py_DECREF(value);
  return result;
}

// Same, for an attribute compared by identity with expected (dtype, layout).
int is_attribute(PyObject* object, PyObject* name, PyObject* expected) {
  PyObject* value = PyObject_GetAttr(object, name);
  if (value == nullptr) return -1;
  const int result = value == expected;
  Py_DECREF(value);
  return result;
}

// The value of an int no-argument method (numel, data_ptr) or attribute (_version).
bool integer_of(PyObject* object, PyObject* name, long long& out, bool method = true) {
  PyObject* value = method ? PyObject_CallMethodNoArgs(object, name) : PyObject_GetAttr(object, name);
  if (value == nullptr) return false;
  out = PyLong_AsLongLong(value);
  Py_DECREF(value);
  return !(out == -1 && PyErr_Occurred());
}

bool plain_tensor(PyObject* object) {
  return object != nullptr && (Py_TYPE(object) == torch_objects.tensor || Py_TYPE(object) == torch_objects.parameter);
}

// The storage of a parameter dtype (complex as its real type), or -1.
int storage_of(PyObject* dtype, bool& complex) {
  const Torch& t = torch_objects;
  complex = dtype == t.complex64 || dtype == t.complex128;
  if (dtype == t.float32 || dtype == t.complex64) return int(Storage::Float32);
  if (dtype == t.float64 || dtype == t.complex128) return int(Storage::Float64);
  if (dtype == t.bfloat16) return int(Storage::BFloat16);
  if (dtype == t.float16) return int(Storage::Float16);
  return -1;
}

// A refusal: a reason (owned), or an exception already set when reason is null.
struct Refusal {
  PyObject* reason;
};

// What a param's tensors must match: its dtype and shape objects (borrowed from the check).
struct Shape {
  PyObject* dtype;
  PyObject* shape;
  bool complex;
};

// Checks that tensor can be updated in place as a buffer of a param of `like`; sets ptr. 1 fits, 0 not, -1 error.
int fits(PyObject* tensor, const Shape& like, void*& ptr) {
  if (!plain_tensor(tensor)) return 0;
  int ok = is_attribute(tensor, name_layout, torch_objects.strided);
  if (ok != 1) return ok;
  if ((ok = truth(tensor, name_is_cpu, false)) != 1) return ok;
  if ((ok = is_attribute(tensor, name_dtype, like.dtype)) != 1) return ok;
  PyObject* shape = PyObject_GetAttr(tensor, name_shape);
  if (shape == nullptr) return -1;
  ok = PyObject_RichCompareBool(shape, like.shape, Py_EQ);
  Py_DECREF(shape);
  if (ok != 1) return ok;
  if ((ok = truth(tensor, name_is_contiguous, true)) != 1) return ok;
  // A lazy view: its memory holds the values before negation or conjugation.
  if ((ok = truth(tensor, name_is_neg, true)) != 0) return ok == 1 ? 0 : -1;
  if (like.complex && (ok = truth(tensor, name_is_conj, true)) != 0) return ok == 1 ? 0 : -1;
  long long address;
  if (!integer_of(tensor, name_data_ptr, address)) return -1;
  ptr = reinterpret_cast<void*>(static_cast<intptr_t>(address));
  return 1;
}

// A parameter's share of a gathered step.
struct Gathered {
  Entry entry;
  Storage storage;
  void* step;
  bool step_is_double;
};

// What the last gather of a group found at one position of its params: the objects
// checked (owned references) and their addresses. The next gather trusts an object
// that is the same, at the same address, without checking it again.
struct Checked {
  PyObject* objects[5] = {};  // param, square, grad_avg, momentum, step
  void* addresses[5] = {};
  PyObject* dtype = nullptr;  // the param's
  PyObject* shape = nullptr;  // the param's (owned)
  Py_hash_t hash = -1;        // the param's
  long long numel = 0;
  bool step_is_double = false;
  // The gradient, by a weak reference: holding it would keep the memory of a gradient that
  // zero_grad() set to None. Trusted while it is the same object at the same address with
  // the same version (torch bumps it at every in-place change, of values or of shape and strides).
  PyObject* grad = nullptr;  // weak reference (owned)
  void* grad_address = nullptr;
  long long grad_version = 0;
};

// The steps of a group, as gather_group found them: one Job per storage and step dtype.
struct PlanObject {
  PyObject_HEAD
  std::vector<Gathered>* items;
  std::vector<Checked>* checked;
  PyObject* params;  // the params stepped (a list), for the caller to bump their versions
};

void release(std::vector<Checked>* checked) {
  if (checked == nullptr) return;
  for (Checked& c : *checked) {
    for (PyObject* object : c.objects) Py_XDECREF(object);
    Py_XDECREF(c.shape);
    Py_XDECREF(c.grad);
  }
  delete checked;
}

void plan_dealloc(PyObject* self) {
  PlanObject* plan = reinterpret_cast<PlanObject*>(self);
  delete plan->items;
  release(plan->checked);
  Py_XDECREF(plan->params);
  Py_TYPE(self)->tp_free(self);
}

Py_ssize_t plan_length(PyObject* self) { return Py_ssize_t(reinterpret_cast<PlanObject*>(self)->items->size()); }

PySequenceMethods plan_sequence = {plan_length};

PyObject* plan_params(PyObject* self, void*) {
  PyObject* params = reinterpret_cast<PlanObject*>(self)->params;
  Py_INCREF(params);
  return params;
}

PyGetSetDef plan_getset[] = {
    {"params", plan_params, nullptr, "The params the plan steps (those with gradients), in order.", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyTypeObject plan_type = [] {
  PyTypeObject type{PyVarObject_HEAD_INIT(nullptr, 0)};
  type.tp_name = "rmsprop.backends.cpu._cpu_kernel.Plan";
  type.tp_basicsize = sizeof(PlanObject);
  type.tp_dealloc = plan_dealloc;
  type.tp_flags = Py_TPFLAGS_DEFAULT;
  type.tp_doc = "The checked tensors of one group's step (gather_group); run_plan() steps them.";
  type.tp_as_sequence = &plan_sequence;
  type.tp_getset = plan_getset;
  return type;
}();

PyObject* refuse(Py_ssize_t index, const char* reason) {
  return PyUnicode_FromFormat("parameter %zd: %s", index, reason);
}

// The address of tensor, or null with an exception set.
bool address_of(PyObject* tensor, void*& address) {
  long long value;
  if (!integer_of(tensor, name_data_ptr, value)) return false;
  address = reinterpret_cast<void*>(static_cast<intptr_t>(value));
  return true;
}

// Whether object is the one checked last time, still at the same address (-1: error).
int unchanged(const Checked* c, int slot, PyObject* object, void*& address) {
  if (c == nullptr || object == nullptr || c->objects[slot] != object) return 0;
  if (!address_of(object, address)) return -1;
  return address == c->addresses[slot];
}

// state[param] (borrowed), or null, with an exception set if the lookup failed.
PyObject* state_of(PyObject* state, PyObject* param, Py_hash_t hash) {
#if PY_VERSION_HEX < 0x030D0000
  return _PyDict_GetItem_KnownHash(state, param, hash);
#else
  (void)hash;
  return PyDict_GetItemWithError(state, param);
#endif
}

// Whether weak reference `reference` refers to object.
bool refers_to(PyObject* reference, PyObject* object) {
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* referent = nullptr;
  if (PyWeakref_GetRef(reference, &referent) < 0) PyErr_Clear();
  Py_XDECREF(referent);  // compared by address only
  return referent == object;
#else
  return PyWeakref_GetObject(reference) == object;
#endif
}

// Whether grad, at version, is the gradient checked last time, unchanged since (-1: error).
int unchanged_grad(const Checked* c, PyObject* grad, long long version, void*& address) {
  if (c == nullptr || c->grad == nullptr || version != c->grad_version || !refers_to(c->grad, grad)) return 0;
  if (!address_of(grad, address)) return -1;
  return address == c->grad_address;
}

// gather_group(params, state, centered, momentum, keys, previous): a Plan of the params with
// gradients and their state in the optimizer's mapping `state`, or why there is none (a str): a
// missing or unfit tensor anywhere leaves the whole group to the Python paths. previous (a Plan
// of the same group, or None) spares checking again the tensors it checked.
PyObject* gather_group(PyObject*, PyObject* args) {
  PyObject *params, *state, *keys[4], *previous_object;
  int centered, momentum;
  if (!PyArg_ParseTuple(args, "O!O!pp(OOOO)O", &PyList_Type, &params, &PyDict_Type, &state, &centered, &momentum,
                        &keys[0], &keys[1], &keys[2], &keys[3], &previous_object))
    return nullptr;
  const std::vector<Checked>* previous = nullptr;
  if (previous_object != Py_None) {
    if (Py_TYPE(previous_object) != &plan_type) {
      PyErr_SetString(PyExc_TypeError, "previous must be a Plan or None");
      return nullptr;
    }
    previous = reinterpret_cast<PlanObject*>(previous_object)->checked;
  }
  if (!torch_set) {
    PyErr_SetString(PyExc_RuntimeError, "set_torch() has not been called");
    return nullptr;
  }
  auto items = std::make_unique<std::vector<Gathered>>();
  const Py_ssize_t count = PyList_GET_SIZE(params);
  items->reserve(count);
  std::unique_ptr<std::vector<Checked>, void (*)(std::vector<Checked>*)> checked(new std::vector<Checked>(count),
                                                                                release);
  PyObject* stepped = PyList_New(0);
  if (stepped == nullptr) return nullptr;
  std::unique_ptr<PyObject, void (*)(PyObject*)> stepped_owner(stepped, [](PyObject* list) { Py_DECREF(list); });
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* param = PyList_GET_ITEM(params, i);
    if (!plain_tensor(param)) return refuse(i, "not a plain tensor");
    PyObject* grad = PyObject_GetAttr(param, name_grad);
    if (grad == nullptr) return nullptr;
    Py_DECREF(grad);  // the param holds it
    if (grad == Py_None) continue;
    const Checked* before = previous != nullptr && i < Py_ssize_t(previous->size()) ? &(*previous)[i] : nullptr;
    Checked& now = (*checked)[i];
    // Not state[param]: the optimizer's defaultdict would add an entry. A tensor's hash (its id,
    // computed by a Python method) is kept with the object checked.
    now.hash = before != nullptr && before->objects[0] == param ? before->hash : PyObject_Hash(param);
    if (now.hash == -1) return nullptr;
    PyObject* param_state = state_of(state, param, now.hash);
    if (param_state == nullptr) return PyErr_Occurred() ? nullptr : refuse(i, "has no state yet");
    if (!PyDict_Check(param_state)) return refuse(i, "its state is not a dict");
    PyObject* found[5] = {param, nullptr, nullptr, nullptr, nullptr};
    const bool used[5] = {true, true, bool(centered), bool(momentum), true};
    for (int k = 1; k < 5; ++k) {
      if (!used[k]) continue;
      found[k] = PyDict_GetItemWithError(param_state, keys[k - 1]);
      if (found[k] == nullptr && PyErr_Occurred()) return nullptr;
    }
    Gathered item{};
    void* addresses[5] = {};
    // The param first: a param at another address (its .data replaced) may have another dtype
    // or shape, so then nothing of the last check holds.
    int same = unchanged(before, 0, param, addresses[0]);
    if (same < 0) return nullptr;
    PyObject* dtype;
    PyObject* shape;
    bool complex = false;
    int storage;
    long long numel = 0;
    const char* what = "the parameter";
    int ok = 1;
    if (same) {
      dtype = before->dtype;
      storage = storage_of(dtype, complex);
      numel = before->numel;
      shape = before->shape;
      Py_INCREF(shape);
    } else {
      if ((dtype = PyObject_GetAttr(param, name_dtype)) == nullptr) return nullptr;
      Py_DECREF(dtype);  // torch's dtype objects live as long as torch
      storage = storage_of(dtype, complex);
      if ((shape = PyObject_GetAttr(param, name_shape)) == nullptr) return nullptr;
    }
    now.shape = shape;  // owned by now from here on
    Shape like{dtype, shape, complex};
    if (!same) ok = storage < 0 ? 0 : fits(param, like, addresses[0]);
    if (ok == 1 && !same) ok = integer_of(param, name_numel, numel) ? 1 : -1;
    void* grad_ptr = nullptr;
    long long grad_version = 0;
    if (ok == 1 && !integer_of(grad, name_version, grad_version, false)) ok = -1;
    if (ok == 1) {
      const int kept = same ? unchanged_grad(before, grad, grad_version, grad_ptr) : 0;
      if (kept < 0) ok = -1;
      else if (!kept && (ok = fits(grad, like, grad_ptr)) != 1) what = "its gradient";
    }
    const char* names[5] = {"", "its 'square_avg'", "its 'grad_avg'", "its 'momentum_buffer'", ""};
    for (int k = 1; k < 4 && ok == 1; ++k) {
      if (!used[k]) continue;
      const int kept = same ? unchanged(before, k, found[k], addresses[k]) : 0;
      if (kept < 0) ok = -1;
      else if (!kept && (ok = found[k] == nullptr ? 0 : fits(found[k], like, addresses[k])) != 1) what = names[k];
    }
    if (ok == 1) {
      PyObject* step = found[4];
      const int kept = same ? unchanged(before, 4, step, addresses[4]) : 0;
      if (kept < 0) return nullptr;
      long long elements = 0;
      int is_double = 0, is_float = 0;
      if (kept) {
        item.step_is_double = before->step_is_double;
      } else if (plain_tensor(step) && truth(step, name_is_cpu, false) == 1 &&
          (is_double = is_attribute(step, name_dtype, torch_objects.float64)) >= 0 &&
          (is_float = is_attribute(step, name_dtype, torch_objects.float32)) >= 0 &&
          integer_of(step, name_numel, elements) && elements == 1 && (is_double || is_float)) {
        if (!address_of(step, addresses[4])) return nullptr;
        item.step_is_double = is_double;
      } else {
        if (PyErr_Occurred()) return nullptr;
        return refuse(i, "its 'step' is not a 1-element float32 or float64 CPU tensor");
      }
    }
    if (ok < 0) return nullptr;
    if (ok == 0) {
      if (storage < 0) return refuse(i, "its dtype is not float32, float64, bfloat16, float16 or complex");
      return PyUnicode_FromFormat("parameter %zd: %s is not a contiguous CPU tensor of the parameter's dtype and shape",
                                  i, what);
    }
    // A weak reference without a callback is shared by everyone who asks for one: most steps
    // find the one made for the last step.
    if ((now.grad = PyWeakref_NewRef(grad, nullptr)) == nullptr) return nullptr;
    if (PyList_Append(stepped, param) < 0) return nullptr;
    item.storage = Storage(storage);
    item.entry.size = numel * (complex ? 2 : 1);
    item.entry.param = addresses[0];
    item.entry.grad = grad_ptr;
    item.entry.square = addresses[1];
    item.entry.grad_avg = addresses[2];
    item.entry.momentum = addresses[3];
    item.step = addresses[4];
    items->push_back(item);
    for (int k = 0; k < 5; ++k) {
      Py_XINCREF(found[k]);
      now.objects[k] = found[k];
      now.addresses[k] = addresses[k];
    }
    now.dtype = dtype;
    now.numel = numel;
    now.step_is_double = item.step_is_double;
    now.grad_address = grad_ptr;
    now.grad_version = grad_version;
  }
  PlanObject* plan = PyObject_New(PlanObject, &plan_type);
  if (plan == nullptr) return nullptr;
  plan->items = items.release();
  plan->checked = checked.release();
  plan->params = stepped_owner.release();
  return reinterpret_cast<PyObject*>(plan);
}

// run_plan(plan, variant, scalars, alpha, bias_correction, threads): the step of a gathered group
// (state of the parameters' dtype), one job per storage.
PyObject* run_plan(PyObject*, PyObject* args) {
  PyObject* plan_object;
  unsigned variant;
  Scalars s{};
  double alpha;
  int bias_correction, threads, nesterov, lr_in_momentum;
  if (!PyArg_ParseTuple(args, "O!I(dddddddddpp)dpi", &plan_type, &plan_object, &variant, &s.lr, &s.alpha, &s.rate,
                        &s.eps_inside, &s.eps_outside, &s.weight_decay, &s.decay_factor, &s.momentum, &s.sign,
                        &nesterov, &lr_in_momentum, &alpha, &bias_correction, &threads))
    return nullptr;
  s.nesterov = nesterov;
  s.lr_in_momentum = lr_in_momentum;
  std::vector<Gathered>& items = *reinterpret_cast<PlanObject*>(plan_object)->items;
  Py_BEGIN_ALLOW_THREADS;
  for (int storage = 0; storage < 4; ++storage) {
    Job job{Storage(storage), Format::Same, normalized(variant % kVariants), s, {}, {}};
    for (Gathered& item : items) {
      if (item.storage != job.storage) continue;
      double t;
      if (item.step_is_double) t = ++*static_cast<double*>(item.step);
      else t = ++*static_cast<float*>(item.step);
      item.entry.inverse_correction = bias_correction ? 1.0 / (1.0 - std::pow(alpha, t)) : 1.0;
      job.entries.push_back(item.entry);
    }
    if (job.entries.empty()) continue;
    const ChunkFunction chunk = selected->chunk_function(job.storage, job.format, job.variant);
    for_each_chunk(job.entries, threads, [&](const Entry& e, int64_t start, int64_t end) { chunk(job, e, start, end); });
  }
  Py_END_ALLOW_THREADS;
  Py_RETURN_NONE;
}

PyObject* names(bool only_supported) {
  PyObject* list = PyList_New(0);
  for (const InstructionSet& set : kInstructionSets)
    if (compiled(set) && (!only_supported || set.supported())) {
      PyObject* name = PyUnicode_FromString(set.name);
      PyList_Append(list, name);
      Py_DECREF(name);
    }
  return list;
}

PyObject* compiled_instruction_sets(PyObject*, PyObject*) { return names(false); }
PyObject* available_instruction_sets(PyObject*, PyObject*) { return names(true); }
PyObject* selected_instruction_set(PyObject*, PyObject*) { return PyUnicode_FromString(selected->name); }

PyObject* select_instruction_set(PyObject*, PyObject* name) {
  const InstructionSet* set = instruction_set_named(name);
  if (set == nullptr) return nullptr;
  selected = set;
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"step", step, METH_VARARGS, "Increment the steps and apply the rule to every element of the tensors."},
    {"set_torch", set_torch, METH_VARARGS, "Give torch's Tensor, Parameter, strided and dtype objects (for gather_group)."},
    {"gather_group", gather_group, METH_VARARGS, "A Plan of a group's params with gradients and their state, or why not."},
    {"run_plan", run_plan, METH_VARARGS, "Increment the steps and apply the rule to every tensor of a Plan."},
    {"set_maps", set_maps, METH_VARARGS, "Copy the signed and unsigned maps (8-bit state)."},
    {"encode_codes", encode_codes, METH_VARARGS, "The 8-bit encoding's codes of scaled values with given noise."},
    {"stream_step_traffic", stream_step_traffic, METH_VARARGS, "The memory traffic of a float32 step, nothing else."},
    {"compiled_instruction_sets", compiled_instruction_sets, METH_NOARGS, "The instruction sets built in, best first."},
    {"available_instruction_sets", available_instruction_sets, METH_NOARGS,
     "The instruction sets built in that this CPU runs, best first."},
    {"selected_instruction_set", selected_instruction_set, METH_NOARGS, "The instruction set steps run with."},
    {"select_instruction_set", select_instruction_set, METH_O, "Run steps with the named instruction set."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_definition = {PyModuleDef_HEAD_INIT, "_cpu_kernel", "The fused CPU step (rmsprop.backends.cpu.kernel).",
                                 -1, methods};

}  // namespace
}  // namespace rmsprop_kernel

PyMODINIT_FUNC PyInit__cpu_kernel() {
  using namespace rmsprop_kernel;
  for (const InstructionSet& set : kInstructionSets)
    if (compiled(set) && set.supported()) {
      selected = &set;
      break;
    }
  pthread_atfork(nullptr, nullptr, after_fork_in_child);
  struct Name {
    PyObject** slot;
    const char* text;
  };
  for (const Name& name : {Name{&name_grad, "grad"}, Name{&name_layout, "layout"}, Name{&name_dtype, "dtype"},
                           Name{&name_shape, "shape"}, Name{&name_is_cpu, "is_cpu"},
                           Name{&name_is_contiguous, "is_contiguous"}, Name{&name_is_neg, "is_neg"},
                           Name{&name_is_conj, "is_conj"}, Name{&name_data_ptr, "data_ptr"}, Name{&name_numel, "numel"},
                           Name{&name_version, "_version"}})
    if ((*name.slot = PyUnicode_InternFromString(name.text)) == nullptr) return nullptr;
  if (PyType_Ready(&plan_type) < 0) return nullptr;
  PyObject* module = PyModule_Create(&module_definition);
  if (module == nullptr) return nullptr;
  Py_INCREF(&plan_type);
  if (PyModule_AddObject(module, "Plan", reinterpret_cast<PyObject*>(&plan_type)) < 0) return nullptr;
  return module;
}
