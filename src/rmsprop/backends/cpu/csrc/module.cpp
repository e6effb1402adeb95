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

#include <dlfcn.h>
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
#include <type_traits>
#include <vector>

#include "kernel.h"

namespace rmsprop_kernel {
namespace {

struct InstructionSet {
  const char* name;
  ChunkFunction (*chunk_function)(Storage, Format, unsigned);
  CodeFunction (*code_function)();
  ChunkFunction (*traffic_function)(int state_bytes);
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
    {"avx512", chunk_function_avx512, code_function_avx512, traffic_function_avx512, has_avx512},
    {"avx2", chunk_function_avx2, code_function_avx2, traffic_function_avx2, has_avx2},
    {"portable", chunk_function_portable, code_function_portable, traffic_function_portable, always},
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

// torch's OpenMP runtime, where use_openmp found it: a step then runs on the team of threads
// torch's own operations run on. After one of them (backward, say), those threads spin-wait for
// a while on the cores; a pool of our own would share the cores with them.
using ParallelFunction = void (*)(void (*)(void*), void*, unsigned, unsigned);  // libgomp's GOMP_parallel
ParallelFunction openmp_parallel = nullptr;

void run_task(void* task) { (*static_cast<const std::function<void()>*>(task))(); }

// Runs task on `threads` threads at once (the calling one among them), each taking work until none is left.
void run_on_threads(int threads, const std::function<void()>& task) {
  if (openmp_parallel != nullptr && threads > 1) {
    openmp_parallel(run_task, const_cast<std::function<void()>*>(&task), unsigned(threads), 0);
    return;
  }
  pool->run(threads, task);
}

// A forked child has none of its parent's threads: it starts a pool of its own (the old one is
// abandoned, its mutex possibly held by a thread that does not exist there), and leaves the
// OpenMP runtime, whose team of threads it has lost too.
void after_fork_in_child() {
  pool = new Pool;
  openmp_parallel = nullptr;
}

// Below this many elements a step stays on the calling thread: waking the pool costs more.
constexpr int64_t kElementsPerThread = 1 << 15;

// Elements a thread claims at least at a time: runs of consecutive chunks, so that a step over
// many small tensors does not contend for the counter once per tensor.
constexpr int64_t kElementsPerClaim = 1 << 14;

// Runs chunk(entry, start, end) over every chunk of every entry, spread over up to `threads` threads.
void for_each_chunk(const std::vector<Entry>& entries, int threads,
                    const std::function<void(const Entry&, int64_t, int64_t)>& chunk) {
  struct Chunk {
    const Entry* entry;
    int64_t start, end;
  };
  // Kept from one step to the next, as the plans' vectors are (SpareVectors), one per calling
  // thread; the task reaches the caller's through these references.
  static thread_local std::vector<Chunk> kept_chunks;
  static thread_local std::vector<size_t> kept_claim_ends;
  std::vector<Chunk>& chunks = kept_chunks;
  std::vector<size_t>& claim_ends = kept_claim_ends;  // one past the last chunk of each claim
  chunks.clear();
  claim_ends.clear();
  int64_t total = 0, claimed = 0;
  for (const Entry& entry : entries) {
    total += entry.size;
    for (int64_t start = 0; start < entry.size; start += kChunk) {
      chunks.push_back({&entry, start, std::min(start + kChunk, entry.size)});
      claimed += chunks.back().end - start;
      if (claimed >= kElementsPerClaim) {
        claim_ends.push_back(chunks.size());
        claimed = 0;
      }
    }
  }
  if (claimed > 0) claim_ends.push_back(chunks.size());
  const int64_t useful = std::max<int64_t>(1, std::min<int64_t>(int64_t(claim_ends.size()), total / kElementsPerThread));
  std::atomic<size_t> next{0};
  const std::function<void()> task = [&] {
    for (size_t claim = next++; claim < claim_ends.size(); claim = next++)
      for (size_t c = claim == 0 ? 0 : claim_ends[claim - 1]; c < claim_ends[claim]; ++c)
        chunk(*chunks[c].entry, chunks[c].start, chunks[c].end);
  };
  run_on_threads(int(std::min<int64_t>(threads, useful)), task);
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

// The numbers of an entry's step t that do not depend on its elements: the bias correction and the
// weights of grad_avg^2 in centered low-precision state, in float64 (the chunk function rounds them
// to its compute type).
void set_step_numbers(Entry& e, double t, bool bias_correction, double alpha) {
  e.inverse_correction = bias_correction ? 1.0 / (1.0 - std::pow(alpha, t)) : 1.0;
  e.weight_after = e.inverse_correction;
  e.weight_before = bias_correction && t > 1 ? 1.0 / (1.0 - std::pow(alpha, t - 1)) : 1.0;
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
    set_step_numbers(e, t, bias_correction, alpha);
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

// stream_step_traffic(sizes, state_bytes, params, grads, squares, grad_avgs, momenta, threads):
// the benchmark's bound, the selected instruction set's traffic loop (traffic.h) over the tensors.
// int64 arrays, one value per tensor (state_bytes: 4, 2 or 1; addresses 0 where a buffer is absent).
PyObject* stream_step_traffic(PyObject*, PyObject* args) {
  PyObject *sizes_object, *state_bytes_object, *lists[5];
  int threads;
  if (!PyArg_ParseTuple(args, "OOOOOOOi", &sizes_object, &state_bytes_object, &lists[0], &lists[1], &lists[2], &lists[3],
                        &lists[4], &threads))
    return nullptr;
  Py_buffer sizes_view;
  if (PyObject_GetBuffer(sizes_object, &sizes_view, PyBUF_C_CONTIGUOUS) != 0) return nullptr;
  const Py_ssize_t count = sizes_view.len / 8;
  PyBuffer_Release(&sizes_view);
  Int64s sizes, state_bytes, views[5];
  if (!sizes.open(sizes_object, count, "sizes") || !state_bytes.open(state_bytes_object, count, "state_bytes")) return nullptr;
  for (int k = 0; k < 5; ++k)
    if (!views[k].open(lists[k], count, "addresses")) return nullptr;
  std::vector<Entry> entries(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (state_bytes[i] != 4 && state_bytes[i] != 2 && state_bytes[i] != 1) {
      PyErr_Format(PyExc_ValueError, "state_bytes must be 4, 2 or 1, not %lld", static_cast<long long>(state_bytes[i]));
      return nullptr;
    }
    entries[i] = Entry{sizes[i], views[0].address(i), views[1].address(i), views[2].address(i), views[3].address(i),
                       views[4].address(i), nullptr, nullptr, nullptr, 0, 0, 0, {0, 0, 0}};
  }
  const Job unused{};
  const ChunkFunction loops[] = {selected->traffic_function(1), selected->traffic_function(2), nullptr,
                                 selected->traffic_function(4)};
  Py_BEGIN_ALLOW_THREADS;
  for_each_chunk(entries, threads, [&](const Entry& e, int64_t start, int64_t end) {
    loops[state_bytes[&e - entries.data()] - 1](unused, e, start, end);
  });
  Py_END_ALLOW_THREADS;
  Py_RETURN_NONE;
}

// use_openmp(library): steps run on the OpenMP team of `library` (a path: torch's libtorch_cpu,
// already loaded), whose OpenMP runtime is found among its dependencies; None: on the kernel's own
// pool. True where it was found.
PyObject* use_openmp(PyObject*, PyObject* library) {
  if (library == Py_None) {
    openmp_parallel = nullptr;
    Py_RETURN_FALSE;
  }
  PyObject* path = nullptr;
  if (!PyUnicode_FSConverter(library, &path)) return nullptr;
  // RTLD_NOLOAD: only a library the process has loaded, never a second copy of it.
  void* handle = dlopen(PyBytes_AS_STRING(path), RTLD_NOW | RTLD_NOLOAD);
  Py_DECREF(path);
  // Searched in the library and its dependencies: the runtime it was linked with.
  openmp_parallel = handle ? reinterpret_cast<ParallelFunction>(dlsym(handle, "GOMP_parallel")) : nullptr;
  if (openmp_parallel != nullptr) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyObject* uses_openmp(PyObject*, PyObject*) { return PyBool_FromLong(openmp_parallel != nullptr); }

// --- gathering a group from the optimizer's state -------------------------------

// torch's objects, given once by set_torch: the gather compares against them.
struct Torch {
  PyTypeObject *tensor, *parameter;
  PyObject *strided, *float32, *float64, *bfloat16, *float16, *complex64, *complex128, *uint8;
} torch_objects{};
bool torch_set = false;

// An attribute or no-argument method of torch's tensors that the gather reads. set_torch finds the
// C function behind it, where it is one that Tensor and Parameter share: calling that directly
// skips looking the name up through the type for every tensor, much of the cost of a read.
struct Accessor {
  const char* text;
  bool method;
  PyObject* name = nullptr;
  getter get = nullptr;
  void* closure = nullptr;
  PyCFunction call = nullptr;                        // METH_NOARGS
  PyCFunctionWithKeywords call_with_keywords = nullptr;  // METH_VARARGS | METH_KEYWORDS
  PyObject* no_arguments = nullptr;                  // the empty tuple, for call_with_keywords

  // A new reference, or null with an exception set.
  PyObject* operator()(PyObject* object) const {
    if (get != nullptr) return get(object, closure);
    if (call != nullptr) return call(object, nullptr);
    if (call_with_keywords != nullptr) return call_with_keywords(object, no_arguments, nullptr);
    return method ? PyObject_CallMethodNoArgs(object, name) : PyObject_GetAttr(object, name);
  }
};

Accessor grad_of{"grad", false}, layout_of{"layout", false}, dtype_of{"dtype", false}, shape_of{"shape", false},
    is_cpu_of{"is_cpu", false}, is_contiguous_of{"is_contiguous", true},
    is_neg_of{"is_neg", true}, is_conj_of{"is_conj", true}, data_ptr_of{"data_ptr", true}, numel_of{"numel", true};
Accessor* const kAccessors[] = {&grad_of,          &layout_of, &dtype_of,   &shape_of,    &is_cpu_of,
                                &is_contiguous_of, &is_neg_of, &is_conj_of, &data_ptr_of, &numel_of};

// Finds the C function behind an accessor's name on torch's tensor types; false with an exception set.
bool resolve(Accessor& accessor, PyTypeObject* tensor, PyTypeObject* parameter) {
  accessor.get = nullptr;
  accessor.call = nullptr;
  accessor.call_with_keywords = nullptr;
  PyObject* found = PyObject_GetAttr(reinterpret_cast<PyObject*>(tensor), accessor.name);
  if (found == nullptr) return false;
  PyObject* other = PyObject_GetAttr(reinterpret_cast<PyObject*>(parameter), accessor.name);
  if (other == nullptr) {
    Py_DECREF(found);
    return false;
  }
  const bool shared = found == other && PyType_IsSubtype(tensor, PyDescr_TYPE(found));
  if (shared && !accessor.method && Py_IS_TYPE(found, &PyGetSetDescr_Type)) {
    PyGetSetDef* definition = reinterpret_cast<PyGetSetDescrObject*>(found)->d_getset;
    accessor.get = definition->get;
    accessor.closure = definition->closure;
  } else if (shared && accessor.method && Py_IS_TYPE(found, &PyMethodDescr_Type)) {
    PyMethodDef* definition = reinterpret_cast<PyMethodDescrObject*>(found)->d_method;
    const int flags = definition->ml_flags & ~METH_COEXIST;
    if (flags == METH_NOARGS) {
      accessor.call = definition->ml_meth;
    } else if (flags == (METH_VARARGS | METH_KEYWORDS)) {
      if ((accessor.no_arguments = PyTuple_New(0)) == nullptr) {
        Py_DECREF(other);
        return false;
      }
      accessor.call_with_keywords = reinterpret_cast<PyCFunctionWithKeywords>(reinterpret_cast<void (*)()>(definition->ml_meth));
    }
  }
  Py_DECREF(other);
  // The descriptor is kept for the life of the process: the functions found belong to it.
  return true;
}

PyObject* set_torch(PyObject*, PyObject* args) {
  Torch t{};
  PyObject *tensor, *parameter;
  if (!PyArg_ParseTuple(args, "O!O!OOOOOOOO", &PyType_Type, &tensor, &PyType_Type, &parameter, &t.strided, &t.float32,
                        &t.float64, &t.bfloat16, &t.float16, &t.complex64, &t.complex128, &t.uint8))
    return nullptr;
  t.tensor = reinterpret_cast<PyTypeObject*>(tensor);
  t.parameter = reinterpret_cast<PyTypeObject*>(parameter);
  for (Accessor* accessor : kAccessors)
    if (!resolve(*accessor, t.tensor, t.parameter)) return nullptr;
  for (PyObject* object : {tensor, parameter, t.strided, t.float32, t.float64, t.bfloat16, t.float16, t.complex64,
                           t.complex128, t.uint8})
    Py_INCREF(object);  // kept for the life of the process
  torch_objects = t;
  torch_set = true;
  Py_RETURN_NONE;
}

// Whether a bool attribute or method is True; -1 with an exception set on failure.
int truth(PyObject* object, const Accessor& accessor) {
  PyObject* value = accessor(object);
  if (value == nullptr) return -1;
  const int result = value == Py_True;
  Py_DECREF(value);
  return result;
}

// Same, for an attribute compared by identity with expected (dtype, layout).
int is_attribute(PyObject* object, const Accessor& accessor, PyObject* expected) {
  PyObject* value = accessor(object);
  if (value == nullptr) return -1;
  const int result = value == expected;
  Py_DECREF(value);
  return result;
}

// The value of an int attribute or method (numel, data_ptr).
bool integer_of(PyObject* object, const Accessor& accessor, long long& out) {
  PyObject* value = accessor(object);
  if (value == nullptr) return false;
  out = PyLong_AsLongLong(value);
  Py_DECREF(value);
  return !(out == -1 && PyErr_Occurred());
}

// The address of tensor, or false with an exception set.
// torch's stable C functions on tensors (libtorch_cpu, AOTInductor's shim), where
// use_tensor_handles found them and the Python tensor's layout it checked: a plain tensor then
// holds its C++ tensor, the handle those functions take, right after its object header. They
// read what the Python bindings read, without their per-call error and __torch_function__
// handling. Each may be missing (an older torch), and the bindings then answer.
using HandleDataPtr = int32_t (*)(void*, void**);
using HandleDim = int32_t (*)(void*, int64_t*);
using HandleSizes = int32_t (*)(void*, int64_t**);
using HandleIsContiguous = int32_t (*)(void*, bool*);
using HandleCode = int32_t (*)(void*, int32_t*);  // dtype, device type, layout
using Code = int32_t (*)();                       // the code of a dtype, device type or layout
struct TensorHandles {
  HandleDataPtr data_ptr = nullptr;
  HandleDim dim = nullptr;
  HandleSizes sizes = nullptr;
  HandleIsContiguous is_contiguous = nullptr;
  HandleCode dtype = nullptr, device_type = nullptr, layout = nullptr;
  int32_t cpu = 0, strided = 0;
  // The codes of torch_objects' dtypes, where found.
  std::vector<std::pair<PyObject*, int32_t>> dtypes;
  // Where a TensorImpl keeps its StorageImpl pointer and its dispatch key set, in words from its
  // start, and the keys of negated and conjugated views (learn_layout); 0 where not found: the
  // storage is then not prefetched, and the bindings say which tensors are lazy views.
  Py_ssize_t storage_word = 0, key_set_word = 0;
  uint64_t negative = 0, conjugate = 0;
} handles;

// The handle of a plain tensor (a Tensor or Parameter, checked by the caller).
void* handle_of(PyObject* tensor) { return reinterpret_cast<char*>(tensor) + sizeof(PyObject); }

// torch's TensorImpl is 176 bytes (22 words): learn_key looks for the key set among them.
constexpr Py_ssize_t kImplWords = 22;

// The words of a plain tensor's TensorImpl: the first word of the C++ tensor its object holds.
const uint64_t* impl_of(PyObject* tensor) { return *reinterpret_cast<const uint64_t* const*>(handle_of(tensor)); }

bool address_of(PyObject* tensor, void*& address) {
  if (handles.data_ptr != nullptr && handles.data_ptr(handle_of(tensor), &address) == 0) return true;
  long long value;
  if (!integer_of(tensor, data_ptr_of, value)) return false;
  address = reinterpret_cast<void*>(static_cast<intptr_t>(value));
  return true;
}

// Whether a plain tensor is a strided CPU tensor of dtype: 1, 0, or -1 with an exception set.
int is_strided_cpu_of(PyObject* tensor, PyObject* dtype) {
  const auto known = std::find_if(handles.dtypes.begin(), handles.dtypes.end(), [&](const auto& d) { return d.first == dtype; });
  int32_t layout = 0, device = 0, code = 0;
  void* handle = handle_of(tensor);
  if (handles.layout != nullptr && handles.device_type != nullptr && handles.dtype != nullptr && known != handles.dtypes.end() &&
      handles.layout(handle, &layout) == 0 && handles.device_type(handle, &device) == 0 && handles.dtype(handle, &code) == 0)
    return layout == handles.strided && device == handles.cpu && code == known->second;
  int ok = is_attribute(tensor, layout_of, torch_objects.strided);
  if (ok != 1) return ok;
  if ((ok = truth(tensor, is_cpu_of)) != 1) return ok;
  return is_attribute(tensor, dtype_of, dtype);
}

// Whether a plain tensor's shape is `shape` (a tuple of ints, torch.Size among them) and it is
// contiguous: 1, 0, or -1 with an exception set.
int has_shape_and_is_contiguous(PyObject* tensor, PyObject* shape) {
  int64_t dim = 0;
  int64_t* sizes = nullptr;
  bool contiguous = false;
  void* handle = handle_of(tensor);
  if (handles.dim != nullptr && handles.sizes != nullptr && handles.is_contiguous != nullptr &&
      handles.dim(handle, &dim) == 0 && handles.sizes(handle, &sizes) == 0 && handles.is_contiguous(handle, &contiguous) == 0) {
    if (dim != PyTuple_GET_SIZE(shape) || !contiguous) return 0;
    for (int64_t d = 0; d < dim; ++d) {
      const long long size = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
      if (size == -1 && PyErr_Occurred()) return -1;
      if (size != sizes[d]) return 0;
    }
    return 1;
  }
  PyObject* own = shape_of(tensor);
  if (own == nullptr) return -1;
  const int same = PyObject_RichCompareBool(own, shape, Py_EQ);
  Py_DECREF(own);
  if (same != 1) return same;
  return truth(tensor, is_contiguous_of);
}

bool plain_tensor(PyObject* object) {
  return object != nullptr && (Py_TYPE(object) == torch_objects.tensor || Py_TYPE(object) == torch_objects.parameter);
}

// Of pairs of TensorImpls (a plain view and a lazy one, negated or conjugated, of one base), the
// word among the first kImplWords whose values differ by the same one bit in every pair, set in
// the lazy view's: `word` and `bit`, or false where no word or more than one does.
bool learn_key(PyObject* pairs, Py_ssize_t& word, uint64_t& bit) {
  word = 0;
  if (!PyTuple_Check(pairs) || PyTuple_GET_SIZE(pairs) == 0) return false;
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(pairs); ++k) {
    PyObject* pair = PyTuple_GET_ITEM(pairs, k);
    if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !plain_tensor(PyTuple_GET_ITEM(pair, 0)) ||
        !plain_tensor(PyTuple_GET_ITEM(pair, 1)))
      return false;
  }
  for (Py_ssize_t w = 1; w < kImplWords; ++w) {
    uint64_t common = 0;
    bool same = true;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(pairs) && same; ++k) {
      PyObject* pair = PyTuple_GET_ITEM(pairs, k);
      const uint64_t plain = impl_of(PyTuple_GET_ITEM(pair, 0))[w], lazy = impl_of(PyTuple_GET_ITEM(pair, 1))[w];
      const uint64_t differing = plain ^ lazy;
      if (k == 0) common = differing;
      same = differing == common && __builtin_popcountll(differing) == 1 && (lazy & differing) != 0;
    }
    if (!same) continue;
    if (word != 0) return false;  // two candidates: none is trusted
    word = w;
    bit = common;
  }
  return word != 0;
}

// Where the TensorImpl keeps its StorageImpl pointer (`storage`: the sample's, UntypedStorage._cdata)
// and its dispatch key set, and that set's keys of negated and conjugated views, into `found`.
// Each sample's binding confirms what it is; without a confirmed key set, the bindings answer.
bool learn_layout(TensorHandles& found, PyObject* sample, unsigned long long storage, PyObject* negations,
                  PyObject* conjugations) {
  const uint64_t* words = impl_of(sample);
  for (Py_ssize_t w = 1; w < kImplWords && found.storage_word == 0; ++w)
    if (words[w] == storage) found.storage_word = w;
  Py_ssize_t negative_word = 0, conjugate_word = 0;
  uint64_t negative = 0, conjugate = 0;
  if (!learn_key(negations, negative_word, negative) || !learn_key(conjugations, conjugate_word, conjugate) ||
      negative_word != conjugate_word || negative == conjugate)
    return true;
  for (const auto& [pairs, accessor] : {std::pair{negations, &is_neg_of}, std::pair{conjugations, &is_conj_of}})
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(pairs); ++k) {
      PyObject* pair = PyTuple_GET_ITEM(pairs, k);
      const int plain = truth(PyTuple_GET_ITEM(pair, 0), *accessor), lazy = truth(PyTuple_GET_ITEM(pair, 1), *accessor);
      if (plain < 0 || lazy < 0) return false;
      if (plain != 0 || lazy != 1) return true;
    }
  found.key_set_word = negative_word;
  found.negative = negative;
  found.conjugate = conjugate;
  return true;
}

// use_tensor_handles(library, sample, sample_handle, storage, negations, conjugations): read plain
// tensors through torch's stable C functions in `library` (a path: torch's libtorch_cpu, already
// loaded), once `sample` (a tensor) is seen to hold, right after its object header, the C++ tensor
// of `sample_handle` (a capsule of a handle to it, torch._C._aoti.unsafe_alloc_void_ptr_from_tensor);
// and read the negation and conjugation bits from the TensorImpl where learn_layout finds them
// (`storage`: the address of the sample's StorageImpl; `negations` and `conjugations`: pairs of
// views, see learn_key). None: through the Python bindings. True where the C functions are used.
PyObject* use_tensor_handles(PyObject*, PyObject* args) {
  PyObject *library, *sample = nullptr, *sample_handle = nullptr, *negations = nullptr, *conjugations = nullptr;
  unsigned long long storage = 0;
  if (!PyArg_ParseTuple(args, "O|OOKO!O!", &library, &sample, &sample_handle, &storage, &PyTuple_Type, &negations,
                        &PyTuple_Type, &conjugations))
    return nullptr;
  handles = TensorHandles{};
  if (library == Py_None) Py_RETURN_FALSE;
  if (!plain_tensor(sample) || !PyCapsule_CheckExact(sample_handle) || conjugations == nullptr) {
    PyErr_SetString(PyExc_TypeError,
                    "use_tensor_handles(library, sample, sample_handle, storage, negations, conjugations): a plain "
                    "tensor, its handle's capsule, its storage's address and two tuples of pairs of views");
    return nullptr;
  }
  void* handle = PyCapsule_GetPointer(sample_handle, PyCapsule_GetName(sample_handle));
  if (handle == nullptr) return nullptr;
  // The handle points at a C++ tensor, whose first word is its TensorImpl: the same as the sample's.
  const void* impl_of_handle = *static_cast<void**>(handle);
  const void* impl_of_sample = impl_of(sample);
  PyObject* path = nullptr;
  if (!PyUnicode_FSConverter(library, &path)) return nullptr;
  void* opened = dlopen(PyBytes_AS_STRING(path), RTLD_NOW | RTLD_NOLOAD);
  Py_DECREF(path);
  if (opened == nullptr || impl_of_handle != impl_of_sample) Py_RETURN_FALSE;
  TensorHandles found;
  found.data_ptr = reinterpret_cast<HandleDataPtr>(dlsym(opened, "aoti_torch_get_data_ptr"));
  found.dim = reinterpret_cast<HandleDim>(dlsym(opened, "aoti_torch_get_dim"));
  found.sizes = reinterpret_cast<HandleSizes>(dlsym(opened, "aoti_torch_get_sizes"));
  found.is_contiguous = reinterpret_cast<HandleIsContiguous>(dlsym(opened, "aoti_torch_is_contiguous"));
  found.dtype = reinterpret_cast<HandleCode>(dlsym(opened, "aoti_torch_get_dtype"));
  found.device_type = reinterpret_cast<HandleCode>(dlsym(opened, "aoti_torch_get_device_type"));
  found.layout = reinterpret_cast<HandleCode>(dlsym(opened, "aoti_torch_get_layout"));
  const auto code_of = [&](const char* name, int32_t& code) {
    const Code function = reinterpret_cast<Code>(dlsym(opened, name));
    if (function != nullptr) code = function();
    return function != nullptr;
  };
  if (!code_of("aoti_torch_device_type_cpu", found.cpu) || !code_of("aoti_torch_layout_strided", found.strided))
    found.layout = nullptr;  // no codes to compare with: the bindings answer
  const Torch& t = torch_objects;
  const std::pair<PyObject*, const char*> dtypes[] = {
      {t.float32, "aoti_torch_dtype_float32"},     {t.float64, "aoti_torch_dtype_float64"},
      {t.bfloat16, "aoti_torch_dtype_bfloat16"},   {t.float16, "aoti_torch_dtype_float16"},
      {t.complex64, "aoti_torch_dtype_complex64"}, {t.complex128, "aoti_torch_dtype_complex128"},
      {t.uint8, "aoti_torch_dtype_uint8"}};
  for (const auto& [dtype, name] : dtypes) {
    int32_t code = 0;
    if (code_of(name, code)) found.dtypes.emplace_back(dtype, code);
  }
  void* data = nullptr;
  long long expected = 0;
  if (found.data_ptr == nullptr || found.data_ptr(handle_of(sample), &data) != 0) Py_RETURN_FALSE;
  if (!integer_of(sample, data_ptr_of, expected)) return nullptr;
  if (reinterpret_cast<intptr_t>(data) != static_cast<intptr_t>(expected)) Py_RETURN_FALSE;
  if (!learn_layout(found, sample, storage, negations, conjugations)) return nullptr;
  handles = found;
  Py_RETURN_TRUE;
}

PyObject* uses_tensor_handles(PyObject*, PyObject*) { return PyBool_FromLong(handles.data_ptr != nullptr); }

PyObject* reads_key_sets(PyObject*, PyObject*) { return PyBool_FromLong(handles.key_set_word != 0); }

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

// What a tensor must match: a dtype and shape object (borrowed), and whether the dtype is complex.
struct Shape {
  PyObject* dtype;
  PyObject* shape;
  bool complex;
};

// Whether a plain tensor is a lazy view, whose memory holds the values before negation (or, where
// complex, conjugation): 1, 0, or -1 with an exception set.
int lazy_view(PyObject* tensor, bool complex) {
  if (handles.key_set_word != 0)
    return (impl_of(tensor)[handles.key_set_word] & (handles.negative | (complex ? handles.conjugate : 0))) != 0;
  const int negated = truth(tensor, is_neg_of);
  return negated != 0 || !complex ? negated : truth(tensor, is_conj_of);
}

// Checks that tensor is a plain, contiguous CPU tensor of `like` (so that it can be updated
// in place through its address); sets ptr. 1 fits, 0 not, -1 error.
int fits(PyObject* tensor, const Shape& like, void*& ptr) {
  if (!plain_tensor(tensor)) return 0;
  int ok = is_strided_cpu_of(tensor, like.dtype);
  if (ok != 1) return ok;
  if ((ok = has_shape_and_is_contiguous(tensor, like.shape)) != 1) return ok;
  if ((ok = lazy_view(tensor, like.complex)) != 0) return ok == 1 ? 0 : -1;
  return address_of(tensor, ptr) ? 1 : -1;
}

// How a group stores its state (rmsprop.formats.layout.target_format) and what seeds its noise.
enum class Precision : int { Full = 0, BFloat16 = 1, Blockwise8bit = 2 };

struct GroupSpec {
  Precision precision;
  long long min_8bit_size;
  int centered, momentum;
  long long first_index;  // the position of the group's first param among all params
  // rmsprop.formats.layout.STORED's indices of square_avg, grad_variance, grad_avg, momentum_buffer.
  long long seed_keys[4];
};

// The format of a param's state in the group: "wide" state (complex params; 8-bit groups'
// small params) is float32 beside a 16-bit param, else the param's own dtype.
Format format_of(const GroupSpec& group, Storage storage, bool complex, long long numel) {
  if (group.precision == Precision::Full) return Format::Same;
  if (complex || (group.precision == Precision::Blockwise8bit && numel < group.min_8bit_size))
    return storage == Storage::BFloat16 || storage == Storage::Float16 ? Format::Float32 : Format::Same;
  return group.precision == Precision::BFloat16 ? Format::BFloat16 : Format::Blockwise8bit;
}

// The tensors of a param's step, in the order of gather_group's keys after the param.
enum Slot { kParam, kSquare, kGradAvg, kMomentum, kStep, kSquareAbsmax, kGradAvgAbsmax, kMomentumAbsmax, kSlots };

// A parameter's share of a gathered step.
struct Gathered {
  Entry entry;
  Storage storage;
  Format format;
  void* step;
  bool step_is_double;
  long long param_index;
  long long seed_keys[3];  // of square, grad_avg and momentum
};

// What the last gather of a group found at one position of its params: the objects checked
// (owned references) and their addresses, and the format they were checked for. The next
// gather trusts an object that is the same, at the same address, for the same format,
// without checking it again.
struct Checked {
  PyObject* objects[kSlots] = {};
  void* addresses[kSlots] = {};
  Format format = Format::Same;
  PyObject* dtype = nullptr;  // the param's
  PyObject* shape = nullptr;  // the param's (owned)
  Py_hash_t hash = -1;        // the param's
  PyObject* state = nullptr;  // the param's state dict (owned), for prefetching
  long long numel = 0;
  bool step_is_double = false;
};

// The steps of a group, as gather_group found them.
struct PlanObject {
  PyObject_HEAD
  std::vector<Gathered>* items;
  std::vector<Checked>* checked;
  PyObject* params;  // the params stepped (a list), for the caller to bump their versions
};

// A gather right after backward that allocated its vectors anew would find glibc's malloc first
// consolidating the many small blocks backward freed (a large allocation or free does that): a
// finished plan's vectors are kept for the next gathers instead, a few of them, under the GIL.
template <typename T>
class SpareVectors {
 public:
  std::vector<T>* take() {
    if (kept_.empty()) return new std::vector<T>();
    std::vector<T>* vector = kept_.back();
    kept_.pop_back();
    return vector;
  }
  void give(std::vector<T>* vector) {
    if (vector == nullptr) return;
    vector->clear();
    if (kept_.size() < kKept) kept_.push_back(vector);
    else delete vector;
  }

 private:
  static constexpr size_t kKept = 2;
  std::vector<std::vector<T>*> kept_;
};
// Never destroyed: a plan may be freed after static destructors have run.
SpareVectors<Gathered>& spare_items = *new SpareVectors<Gathered>();
SpareVectors<Checked>& spare_checks = *new SpareVectors<Checked>();

void release(std::vector<Checked>* checked) {
  if (checked == nullptr) return;
  for (Checked& c : *checked) {
    for (PyObject* object : c.objects) Py_XDECREF(object);
    Py_XDECREF(c.shape);
    Py_XDECREF(c.state);
  }
  spare_checks.give(checked);
}

void plan_dealloc(PyObject* self) {
  PlanObject* plan = reinterpret_cast<PlanObject*>(self);
  spare_items.give(plan->items);
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

// --- prefetching the next params' objects ---------------------------------------
// A gather reads, for each param, a dozen objects scattered over the heap: the Python objects of
// the param, its gradient and its state, their TensorImpls and StorageImpls, the state's dicts.
// Read one after another they are a chain of cache misses, most of the gather's time on many
// tensors. The last plan names the objects the next gather will read: prefetch_ahead starts
// loading them some params ahead, one level of the chain per stage, so that the misses overlap.

// Starts loading the TensorImpl of a plain tensor.
void prefetch_impl(PyObject* tensor) {
  const char* impl = reinterpret_cast<const char*>(impl_of(tensor));
  for (Py_ssize_t byte = 0; byte < kImplWords * 8; byte += 64) __builtin_prefetch(impl + byte);
  __builtin_prefetch(impl + kImplWords * 8 - 1);
}

// Starts loading the StorageImpl of a plain tensor, where learn_layout found its pointer.
void prefetch_storage(PyObject* tensor) {
  if (handles.storage_word != 0) __builtin_prefetch(reinterpret_cast<const void*>(impl_of(tensor)[handles.storage_word]));
}

// Starts loading what the gathers of later params will read, one level further for each param
// closer: the objects 3 * kAhead params ahead, their TensorImpls (and the state dicts' keys)
// 2 * kAhead ahead, their StorageImpls kAhead ahead. `previous` (the last plan's checks) holds each of those objects by a strong
// reference. The gradients are new objects at most steps: none is known ahead.
void prefetch_ahead(const std::vector<Checked>& previous, Py_ssize_t i) {
  constexpr Py_ssize_t kAhead = 4;
  const Py_ssize_t known = Py_ssize_t(previous.size());
  if (i + 3 * kAhead < known) {
    const Checked& c = previous[i + 3 * kAhead];
    for (PyObject* object : c.objects)
      if (object != nullptr) __builtin_prefetch(object);
    if (c.state != nullptr) __builtin_prefetch(c.state);
  }
  if (i + 2 * kAhead < known) {
    const Checked& c = previous[i + 2 * kAhead];
    for (PyObject* object : c.objects)
      if (object != nullptr) prefetch_impl(object);
    if (c.state != nullptr) __builtin_prefetch(reinterpret_cast<PyDictObject*>(c.state)->ma_keys);
  }
  if (i + kAhead < known) {
    for (PyObject* object : previous[i + kAhead].objects)
      if (object != nullptr) prefetch_storage(object);
  }
}

// The dtype a buffer of this format is stored in, for a param of dtype.
PyObject* buffer_dtype(Format format, PyObject* dtype) {
  switch (format) {
    case Format::Same: return dtype;
    case Format::Float32: return torch_objects.float32;
    case Format::BFloat16: return torch_objects.bfloat16;
    case Format::Blockwise8bit: return torch_objects.uint8;
  }
  return dtype;
}

// gather_group(params, state, spec, keys, previous): a Plan of the params with gradients and their
// state in the optimizer's mapping `state`, or why there is none (a str): a missing or unfit tensor
// anywhere leaves the whole group to the Python paths.
//   spec: (precision, min_8bit_size, centered, momentum, first_index, seed_keys), see GroupSpec;
//   keys: the state's keys square_avg, grad_variance, grad_avg, momentum_buffer, step and the
//         four <buffer>_absmax;
//   previous: a Plan of the same group, or None; it spares checking again the tensors it checked.
// A low-precision group's state must hold exactly the entries its format and settings use (else
// the Python path converts it); a full-precision group's, at least those, as torch's paths read it.
PyObject* gather_group(PyObject*, PyObject* args) {
  PyObject *params, *state, *keys[9], *previous_object;
  GroupSpec group{};
  int precision;
  if (!PyArg_ParseTuple(args, "O!O!(iLppL(LLLL))(OOOOOOOOO)O", &PyList_Type, &params, &PyDict_Type, &state, &precision,
                        &group.min_8bit_size, &group.centered, &group.momentum, &group.first_index,
                        &group.seed_keys[0], &group.seed_keys[1], &group.seed_keys[2], &group.seed_keys[3], &keys[0],
                        &keys[1], &keys[2], &keys[3], &keys[4], &keys[5], &keys[6], &keys[7], &keys[8],
                        &previous_object))
    return nullptr;
  if (precision < 0 || precision > 2) {
    PyErr_SetString(PyExc_ValueError, "precision must be 0 (full), 1 (bf16) or 2 (8bit)");
    return nullptr;
  }
  group.precision = Precision(precision);
  PyObject* const square_avg_key = keys[0];
  PyObject* const grad_variance_key = keys[1];
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
  const Py_ssize_t count = PyList_GET_SIZE(params);
  std::unique_ptr<std::vector<Gathered>, void (*)(std::vector<Gathered>*)> items(
      spare_items.take(), [](std::vector<Gathered>* vector) { spare_items.give(vector); });
  items->reserve(count);
  std::unique_ptr<std::vector<Checked>, void (*)(std::vector<Checked>*)> checked(spare_checks.take(), release);
  checked->resize(count);
  PyObject* stepped = PyList_New(0);
  if (stepped == nullptr) return nullptr;
  std::unique_ptr<PyObject, void (*)(PyObject*)> stepped_owner(stepped, [](PyObject* list) { Py_DECREF(list); });
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (previous != nullptr) prefetch_ahead(*previous, i);
    PyObject* param = PyList_GET_ITEM(params, i);
    if (!plain_tensor(param)) return refuse(i, "not a plain tensor");
    PyObject* grad = grad_of(param);
    if (grad == nullptr) return nullptr;
    Py_DECREF(grad);  // the param holds it
    if (grad == Py_None) continue;
    const Checked* before = previous != nullptr && i < Py_ssize_t(previous->size()) ? &(*previous)[i] : nullptr;
    Checked& now = (*checked)[i];
    // Not state[param]: the optimizer's defaultdict would add an entry. A tensor's hash (its id,
    // computed by a Python method) is kept with the object checked.
    now.hash = before != nullptr && before->objects[kParam] == param ? before->hash : PyObject_Hash(param);
    if (now.hash == -1) return nullptr;
    PyObject* param_state = state_of(state, param, now.hash);
    if (param_state == nullptr) return PyErr_Occurred() ? nullptr : refuse(i, "has no state yet");
    if (!PyDict_Check(param_state)) return refuse(i, "its state is not a dict");

    Gathered item{};
    void* addresses[kSlots] = {};
    // The param first: a param at another address (its .data replaced) may have another dtype
    // or shape, so then nothing of the last check holds.
    const int same = unchanged(before, kParam, param, addresses[kParam]);
    if (same < 0) return nullptr;
    PyObject* dtype;
    PyObject* shape;
    bool complex = false;
    int storage;
    long long numel = 0;
    int ok = 1;
    if (same) {
      dtype = before->dtype;
      storage = storage_of(dtype, complex);
      numel = before->numel;
      shape = before->shape;
      Py_INCREF(shape);
    } else {
      if ((dtype = dtype_of(param)) == nullptr) return nullptr;
      Py_DECREF(dtype);  // torch's dtype objects live as long as torch
      storage = storage_of(dtype, complex);
      if ((shape = shape_of(param)) == nullptr) return nullptr;
    }
    now.shape = shape;  // owned by now from here on
    Shape like{dtype, shape, complex};
    if (!same) ok = storage < 0 ? 0 : fits(param, like, addresses[kParam]);
    if (ok == 1 && !same) ok = integer_of(param, numel_of, numel) ? 1 : -1;
    if (ok < 0) return nullptr;
    if (ok == 0) {
      if (storage < 0) return refuse(i, "its dtype is not float32, float64, bfloat16, float16 or complex");
      return refuse(i, "the parameter is not a contiguous CPU tensor");
    }
    const Format format = format_of(group, Storage(storage), complex, numel);
    const bool blockwise = format == Format::Blockwise8bit;
    // Objects checked for another format (the group's precision changed) are checked again.
    const Checked* trusted = same && before->format == format ? before : nullptr;

    if (!plain_tensor(grad)) return refuse(i, "its gradient is not a plain tensor");
    void* grad_ptr = nullptr;
    if ((ok = fits(grad, like, grad_ptr)) != 1) {
      if (ok < 0) return nullptr;
      return refuse(i, "its gradient is not a contiguous CPU tensor of the parameter's dtype and shape");
    }

    const bool variance = group.centered && (format == Format::BFloat16 || blockwise);
    PyObject* slot_keys[kSlots] = {nullptr, variance ? grad_variance_key : square_avg_key, keys[2], keys[3], keys[4],
                                   variance ? keys[6] : keys[5], keys[7], keys[8]};
    const bool used[kSlots] = {true, true, bool(group.centered), bool(group.momentum), true,
                               blockwise, blockwise && group.centered, blockwise && group.momentum};
    PyObject* found[kSlots] = {param};
    Py_ssize_t entries = 0;
    for (int k = 1; k < kSlots; ++k) {
      if (!used[k]) continue;
      found[k] = PyDict_GetItemWithError(param_state, slot_keys[k]);
      if (found[k] == nullptr) {
        if (PyErr_Occurred()) return nullptr;
        if (k == kStep) return refuse(i, "its state has no 'step'");
        return PyUnicode_FromFormat("parameter %zd: its %R is missing", i, slot_keys[k]);
      }
      ++entries;
    }
    if (group.precision != Precision::Full && PyDict_GET_SIZE(param_state) != entries)
      return refuse(i, "its state holds entries the group's format and settings do not use");

    // The state tensor of slot k: the object checked last time, or checked against `like` now
    // (1 fits, 0 not, -1 error).
    const auto slot_fits = [&](int k, const Shape& like) {
      const int kept = trusted ? unchanged(trusted, k, found[k], addresses[k]) : 0;
      return kept != 0 ? kept : fits(found[k], like, addresses[k]);
    };
    const Shape buffer_like{buffer_dtype(format, dtype), shape, complex && format == Format::Same};
    for (int k = kSquare; k <= kMomentum; ++k) {
      if (!used[k] || (ok = slot_fits(k, buffer_like)) == 1) continue;
      if (ok < 0) return nullptr;
      return PyUnicode_FromFormat("parameter %zd: its %R is not a contiguous CPU tensor of the parameter's shape and %S",
                                  i, slot_keys[k], buffer_like.dtype);
    }
    if (blockwise) {
      PyObject* blocks = Py_BuildValue("(L)", (numel + kBlock - 1) / kBlock);
      if (blocks == nullptr) return nullptr;
      std::unique_ptr<PyObject, void (*)(PyObject*)> blocks_owner(blocks, [](PyObject* o) { Py_DECREF(o); });
      const Shape absmax_like{torch_objects.float32, blocks, false};
      for (int k = kSquareAbsmax; k <= kMomentumAbsmax; ++k) {
        if (!used[k] || (ok = slot_fits(k, absmax_like)) == 1) continue;
        if (ok < 0) return nullptr;
        return PyUnicode_FromFormat("parameter %zd: its %R is not a contiguous CPU float32 tensor of one value per block",
                                    i, slot_keys[k]);
      }
    }
    PyObject* step = found[kStep];
    const int kept_step = trusted ? unchanged(trusted, kStep, step, addresses[kStep]) : 0;
    if (kept_step < 0) return nullptr;
    if (kept_step) {
      item.step_is_double = trusted->step_is_double;
    } else {
      long long elements = 0;
      int is_double = 0, is_float = 0;
      if (plain_tensor(step) && truth(step, is_cpu_of) == 1 &&
          (is_double = is_attribute(step, dtype_of, torch_objects.float64)) >= 0 &&
          (is_float = is_attribute(step, dtype_of, torch_objects.float32)) >= 0 && integer_of(step, numel_of, elements) &&
          elements == 1 && (is_double || is_float)) {
        if (!address_of(step, addresses[kStep])) return nullptr;
        item.step_is_double = is_double;
      } else {
        if (PyErr_Occurred()) return nullptr;
        return refuse(i, "its 'step' is not a 1-element float32 or float64 CPU tensor");
      }
    }

    if (PyList_Append(stepped, param) < 0) return nullptr;
    item.storage = Storage(storage);
    item.format = format;
    item.entry.size = numel * (complex ? 2 : 1);
    item.entry.param = addresses[kParam];
    item.entry.grad = grad_ptr;
    item.entry.square = addresses[kSquare];
    item.entry.grad_avg = addresses[kGradAvg];
    item.entry.momentum = addresses[kMomentum];
    item.entry.square_absmax = static_cast<float*>(addresses[kSquareAbsmax]);
    item.entry.grad_avg_absmax = static_cast<float*>(addresses[kGradAvgAbsmax]);
    item.entry.momentum_absmax = static_cast<float*>(addresses[kMomentumAbsmax]);
    item.step = addresses[kStep];
    item.param_index = group.first_index + i;
    item.seed_keys[0] = group.seed_keys[variance ? 1 : 0];
    item.seed_keys[1] = group.seed_keys[2];
    item.seed_keys[2] = group.seed_keys[3];
    items->push_back(item);
    for (int k = 0; k < kSlots; ++k) {
      Py_XINCREF(found[k]);
      now.objects[k] = found[k];
      now.addresses[k] = addresses[k];
    }
    Py_INCREF(param_state);
    now.state = param_state;
    now.format = format;
    now.dtype = dtype;
    now.numel = numel;
    now.step_is_double = item.step_is_double;
  }
  PlanObject* plan = PyObject_New(PlanObject, &plan_type);
  if (plan == nullptr) return nullptr;
  plan->items = items.release();
  plan->checked = checked.release();
  plan->params = stepped_owner.release();
  return reinterpret_cast<PyObject*>(plan);
}

// run_plan(plan, variant, scalars, alpha, bias_correction, threads): the step of a gathered group,
// one job per storage and format.
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
  constexpr int kStorages = 4, kFormats = 4;
  ChunkFunction chunks[kStorages][kFormats] = {};
  for (const Gathered& item : items) {
    ChunkFunction& chunk = chunks[int(item.storage)][int(item.format)];
    if (chunk != nullptr) continue;
    chunk = selected->chunk_function(item.storage, item.format, normalized(variant % kVariants));
    if (chunk == nullptr) {
      PyErr_SetString(PyExc_ValueError, "no kernel for this storage and state format");
      return nullptr;
    }
    if (item.format == Format::Blockwise8bit && signed_map.empty()) {
      PyErr_SetString(PyExc_RuntimeError, "set_maps() has not been called");
      return nullptr;
    }
  }
  Py_BEGIN_ALLOW_THREADS;
  for (Gathered& item : items) {
    double t;
    if (item.step_is_double) t = ++*static_cast<double*>(item.step);
    else t = ++*static_cast<float*>(item.step);
    set_step_numbers(item.entry, t, bias_correction, alpha);
    if (item.format == Format::BFloat16 || item.format == Format::Blockwise8bit)
      for (int slot = 0; slot < 3; ++slot)
        item.entry.seeds[slot] = rounding_seed(item.param_index, item.seed_keys[slot], int64_t(t));
  }
  for (int storage = 0; storage < kStorages; ++storage)
    for (int format = 0; format < kFormats; ++format) {
      const ChunkFunction chunk = chunks[storage][format];
      if (chunk == nullptr) continue;
      Job job{Storage(storage), Format(format), normalized(variant % kVariants), s, {}, {}};
      if (job.format == Format::Blockwise8bit) job.maps = Maps{signed_map.data(), unsigned_map.data()};
      // Kept from one step to the next, as the plans' vectors are (SpareVectors).
      static thread_local std::vector<Entry> kept_entries;
      job.entries.swap(kept_entries);
      job.entries.clear();
      for (const Gathered& item : items)
        if (item.storage == job.storage && item.format == job.format) job.entries.push_back(item.entry);
      for_each_chunk(job.entries, threads, [&](const Entry& e, int64_t start, int64_t end) { chunk(job, e, start, end); });
      job.entries.swap(kept_entries);
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
    {"stream_step_traffic", stream_step_traffic, METH_VARARGS, "The memory traffic of a step, nothing else."},
    {"use_openmp", use_openmp, METH_O, "Run steps on the OpenMP team of the given loaded library (None: the kernel's own threads)."},
    {"uses_openmp", uses_openmp, METH_NOARGS, "Whether steps run on an OpenMP team."},
    {"use_tensor_handles", use_tensor_handles, METH_VARARGS,
     "Read tensors through torch's stable C functions in the given loaded library (None: through the Python bindings)."},
    {"uses_tensor_handles", uses_tensor_handles, METH_NOARGS, "Whether tensors are read through torch's stable C functions."},
    {"reads_key_sets", reads_key_sets, METH_NOARGS,
     "Whether negated and conjugated views are told by the key set in their TensorImpl (else by the bindings)."},
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
  for (Accessor* accessor : kAccessors)
    if ((accessor->name = PyUnicode_InternFromString(accessor->text)) == nullptr) return nullptr;
  if (PyType_Ready(&plan_type) < 0) return nullptr;
  PyObject* module = PyModule_Create(&module_definition);
  if (module == nullptr) return nullptr;
  Py_INCREF(&plan_type);
  if (PyModule_AddObject(module, "Plan", reinterpret_cast<PyObject*>(&plan_type)) < 0) return nullptr;
  return module;
}
