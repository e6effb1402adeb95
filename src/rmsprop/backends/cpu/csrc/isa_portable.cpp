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

#if 1
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace rmsprop_kernel {
namespace portable {
#include "rule.h"
#include "traffic.h"
}  // namespace portable

ChunkFunction chunk_function_portable(Storage storage, Format format, unsigned variant) {
  return portable::chunk_function(storage, format, variant);
}

CodeFunction code_function_portable() { return &portable::encode_codes; }

ChunkFunction traffic_function_portable(int state_bytes) { return portable::traffic_function(state_bytes); }
}  // namespace rmsprop_kernel
#else
namespace rmsprop_kernel {
ChunkFunction chunk_function_portable(Storage, Format, unsigned) { return nullptr; }
CodeFunction code_function_portable() { return nullptr; }
ChunkFunction traffic_function_portable(int) { return nullptr; }
}  // namespace rmsprop_kernel
#endif
