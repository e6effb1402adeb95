// rmsprop._cpu_kernel: the fused CPU step as a CPython extension.
//
// Python hands over the tensors as addresses (int64 buffers) with their
// element counts, checked beforehand (rmsprop.cpu_kernel). Here the steps are
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
    {"avx512", chunk_function_avx512, has_avx512},
    {"avx2", chunk_function_avx2, has_avx2},
    {"portable", chunk_function_portable, always},
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

  std::mutex mutex_;
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

// The maps and tables of 8-bit state, copied once by set_maps.
std::vector<float> signed_map, unsigned_map;
std::vector<int32_t> signed_table, unsigned_table;

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
constexpr size_t kTableSize = size_t(1) << (32 - kKeyShift);

PyObject* set_maps(PyObject*, PyObject* args) {
  PyObject *signed_values, *signed_lookup, *unsigned_values, *unsigned_lookup;
  if (!PyArg_ParseTuple(args, "OOOO", &signed_values, &signed_lookup, &unsigned_values, &unsigned_lookup)) return nullptr;
  std::vector<float> new_signed(kMapSize), new_unsigned(kMapSize);
  std::vector<int32_t> new_signed_table(kTableSize), new_unsigned_table(kTableSize);
  if (!copy_buffer(signed_values, new_signed.data(), kMapSize * 4, "the signed map") ||
      !copy_buffer(signed_lookup, new_signed_table.data(), kTableSize * 4, "the signed table") ||
      !copy_buffer(unsigned_values, new_unsigned.data(), kMapSize * 4, "the unsigned map") ||
      !copy_buffer(unsigned_lookup, new_unsigned_table.data(), kTableSize * 4, "the unsigned table"))
    return nullptr;
  for (int32_t* table : {new_signed_table.data(), new_unsigned_table.data()})
    for (size_t i = 0; i < kTableSize; ++i)
      if (table[i] < 0 || table[i] >= int32_t(kMapSize)) {
        PyErr_SetString(PyExc_ValueError, "a table entry lies outside the map");
        return nullptr;
      }
  signed_map.swap(new_signed);
  unsigned_map.swap(new_unsigned);
  signed_table.swap(new_signed_table);
  unsigned_table.swap(new_unsigned_table);
  Py_RETURN_NONE;
}

// rmsprop.state_precision.rounding_seed: buffer key of parameter param_index at step.
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
    if (signed_table.empty()) {
      PyErr_SetString(PyExc_RuntimeError, "set_maps() has not been called");
      return nullptr;
    }
    job.maps = Maps{signed_map.data(), signed_table.data(), unsigned_map.data(), unsigned_table.data()};
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
    {"set_maps", set_maps, METH_VARARGS, "Copy the signed and unsigned maps and their lookup tables (8-bit state)."},
    {"stream_step_traffic", stream_step_traffic, METH_VARARGS, "The memory traffic of a float32 step, nothing else."},
    {"compiled_instruction_sets", compiled_instruction_sets, METH_NOARGS, "The instruction sets built in, best first."},
    {"available_instruction_sets", available_instruction_sets, METH_NOARGS,
     "The instruction sets built in that this CPU runs, best first."},
    {"selected_instruction_set", selected_instruction_set, METH_NOARGS, "The instruction set steps run with."},
    {"select_instruction_set", select_instruction_set, METH_O, "Run steps with the named instruction set."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_definition = {PyModuleDef_HEAD_INIT, "_cpu_kernel", "The fused CPU step (rmsprop.cpu_kernel).",
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
  return PyModule_Create(&module_definition);
}
