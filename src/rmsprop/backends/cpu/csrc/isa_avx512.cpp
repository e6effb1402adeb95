// The rule compiled for one instruction set (setup.py passes its flags), or nothing where
// the compiler was not given them; module.cpp picks one at run time.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "kernel.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__FMA__) && defined(__F16C__)
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace rmsprop_kernel {
namespace avx512 {
#include "rule.h"
#include "traffic.h"
}  // namespace avx512

ChunkFunction chunk_function_avx512(Storage storage, Format format, unsigned variant) {
  return avx512::chunk_function(storage, format, variant);
}

CodeFunction code_function_avx512() { return &avx512::encode_codes; }

ChunkFunction traffic_function_avx512(int state_bytes) { return avx512::traffic_function(state_bytes); }
}  // namespace rmsprop_kernel
#else
namespace rmsprop_kernel {
ChunkFunction chunk_function_avx512(Storage, Format, unsigned) { return nullptr; }
CodeFunction code_function_avx512() { return nullptr; }
ChunkFunction traffic_function_avx512(int) { return nullptr; }
}  // namespace rmsprop_kernel
#endif
