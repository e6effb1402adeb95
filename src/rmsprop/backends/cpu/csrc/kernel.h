// The CPU kernel's job description, shared by the Python module (module.cpp)
// and the rule compiled once per instruction set (rule.h, isa_*.cpp).
// Plain C++: no Python or torch headers, so each instruction set's unit
// compiles in seconds.
#pragma once

#include <cstdint>
#include <vector>

namespace rmsprop_kernel {

// How a tensor's elements are stored. Complex tensors travel as their real type, twice as long.
enum class Storage : uint8_t { Float32, Float64, BFloat16, Float16 };

// How the state buffers are stored (rmsprop.formats): as the parameter (Same),
// float32 beside a 16-bit parameter (Float32), bfloat16 rounded stochastically, or 8-bit blocks.
enum class Format : uint8_t { Same, Float32, BFloat16, Blockwise8bit };

// Which code a step runs, compiled for each: the buffers present and the form of weight decay.
enum VariantBit : unsigned {
  kCentered = 1,
  kMomentum = 2,
  // decay_factor, sign and the bias correction are all 1 and weight decay is not coupled.
  kPlain = 4,
  kCoupledWeightDecay = 8,
};
constexpr unsigned kVariants = 16;

// Coupled weight decay only outside a plain step.
constexpr unsigned normalized(unsigned bits) { return bits & kPlain ? bits & ~kCoupledWeightDecay : bits; }

// The rule's numbers; maximize, both weight decays and the eps placement folded in
// (rmsprop.core.hyperparameters.KernelScalars).
// nesterov and lr_in_momentum are not variants (each variant compiled for them would multiply the
// build time by 3): inside the loop, nesterov is a select and lr_in_momentum constant factors.
struct Scalars {
  double lr, alpha, rate, eps_inside, eps_outside, weight_decay, decay_factor, momentum, sign;
  bool nesterov, lr_in_momentum;
};

// One tensor's share of a step; buffers and absmax pointers unused by the job are null.
struct Entry {
  int64_t size;
  void* param;
  const void* grad;
  void* square;  // square_avg, or grad_variance in centered low-precision state
  void* grad_avg;
  void* momentum;
  float* square_absmax;
  float* grad_avg_absmax;
  float* momentum_absmax;
  // 1 / (1 - alpha^t) after this step (1 without bias correction), and the weights of
  // grad_avg^2 in grad_variance before and after it (rmsprop.formats.layout.mean_weight).
  double inverse_correction, weight_before, weight_after;
  // Seeds of the rounding noise of square, grad_avg and momentum (rmsprop.formats.noise.rounding_seed).
  uint64_t seeds[3];
};

// The dynamic maps of 8-bit state (rmsprop.formats.maps.SIGNED_MAP and UNSIGNED_MAP).
struct Maps {
  const float* signed_map;
  const float* unsigned_map;
};

// The layout of a dynamic map (rmsprop.formats.maps.dynamic_map, 7 decades), from which the 8-bit
// encoding computes where a value lies in it. Decade k covers [0.1, 1] * 10^(k-6) with bins[k]
// equal bins (2^k per sign in the signed map, 2^(k+1) in the unsigned one), each represented by
// its midpoint; base[k] midpoints lie below the decade. A magnitude y in decade k lies
// t = y * scale[k] - bins[k] / 9 bins into it, so floor(t + 1/2) midpoints of the decade lie at or
// below it. offset_below and offset_above hold bins[k] / 9 - 1/2 -/+ a margin of 1/64: the floors
// then err by at most one, in a known direction, where float32's errors are below 10^-4 bins.
// shift holds base[k] + 1/2 - bins[k] / 9, without the margin: floor(y * scale[k] + shift[k]) is
// the count of the map's midpoints at or below y but within float32's errors of a midpoint.
// module.cpp's set_maps checks that a map given has this layout.
constexpr int kDecades = 7;

struct MapLayout {
  float edge[16];  // the lower edge of decade k, 10^(k-7) (edge[0] unused)
  float scale[16];
  float shift[16];
  float offset_below[16];
  float offset_above[16];
  int32_t bins[16];
  int32_t base[16];
};

constexpr double kDecadeTops[kDecades] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
constexpr double kMargin = 1.0 / 64;

constexpr MapLayout map_layout(bool is_signed) {
  MapLayout layout{};
  int32_t base = 0;
  for (int k = 0; k < kDecades; ++k) {
    const int32_t bins = int32_t(1) << (is_signed ? k : k + 1);
    layout.edge[k] = float(kDecadeTops[k] / 10);
    layout.scale[k] = float(bins / (0.9 * kDecadeTops[k]));
    layout.shift[k] = float(base + 0.5 - bins / 9.0);
    layout.offset_below[k] = float(bins / 9.0 - 0.5 + kMargin);
    layout.offset_above[k] = float(bins / 9.0 - 0.5 - kMargin);
    layout.bins[k] = bins;
    layout.base[k] = base;
    base += bins;
  }
  return layout;
}

inline constexpr MapLayout kSignedLayout = map_layout(true);
inline constexpr MapLayout kUnsignedLayout = map_layout(false);

struct Job {
  Storage storage;
  Format format;
  unsigned variant;  // VariantBit flags, normalized
  Scalars scalars;
  Maps maps;
  std::vector<Entry> entries;
};

// Steps elements [start, end) of one entry; start is a multiple of kBlock.
using ChunkFunction = void (*)(const Job&, const Entry&, int64_t start, int64_t end);

// Elements per block of 8-bit state (rmsprop.formats.layout.BLOCK_SIZE).
constexpr int64_t kBlock = 256;
// Elements per work item of the threads: a multiple of kBlock.
constexpr int64_t kChunk = 1 << 16;

// SplitMix64's constants, as rmsprop.formats.noise.rounding_seed uses them.
constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t kMix2 = 0x94D049BB133111EBull;
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * kMix1;
  z = (z ^ (z >> 27)) * kMix2;
  return z ^ (z >> 31);
}

// Output index + 1 of SplitMix64 from state seed (module.cpp's rounding_seed).
inline uint64_t random_bits(uint64_t seed, uint64_t index) { return mix64(seed + (index + 1) * kGamma); }

// The rounding noise's hash (rmsprop.formats.noise.rounding_bits): C. Wellons' lowbias32, a
// bijection of 32-bit words, of output index + the seed's low half, xor its high half.
constexpr uint32_t kHash1 = 0x7FEB352Du;
constexpr uint32_t kHash2 = 0x846CA68Bu;
inline uint32_t noise_hash(uint32_t x) {
  x = (x ^ (x >> 16)) * kHash1;
  x = (x ^ (x >> 15)) * kHash2;
  return x ^ (x >> 16);
}

// The chunk function of each instruction set, or null where this build or CPU has none.
ChunkFunction chunk_function_avx512(Storage, Format, unsigned variant);
ChunkFunction chunk_function_avx2(Storage, Format, unsigned variant);
ChunkFunction chunk_function_portable(Storage, Format, unsigned variant);

// The 8-bit encoding's codes of scaled values with given noise (rule.h, encode_codes), of each
// instruction set, or null.
using CodeFunction = void (*)(bool is_signed, const float* scaled, const uint16_t* noise, int64_t count,
                              const float* map, uint8_t* codes);
CodeFunction code_function_avx512();
CodeFunction code_function_avx2();
CodeFunction code_function_portable();

// The benchmark bound's loop (traffic.h) of state elements of state_bytes (4, 2 or 1) bytes, of
// each instruction set, or null.
ChunkFunction traffic_function_avx512(int state_bytes);
ChunkFunction traffic_function_avx2(int state_bytes);
ChunkFunction traffic_function_portable(int state_bytes);

}  // namespace rmsprop_kernel
