// The rule of rmsprop.core.functional over one chunk of a step, for every storage
// and state format. Included by each isa_*.cpp inside a namespace of its own
// and compiled with that instruction set's flags; the loops are plain C++
// that GCC vectorises (#pragma omp simd), except the 8-bit map lookups,
// written with gathers where the instruction set has them.
//
// Elements are computed in float32 (float64 for float64 parameters), op by op
// in the order of the kernel this one replaced, with fused multiply-adds
// exactly where mul_add is written (where the instruction set has them) and
// nowhere else (-ffp-contract=off).

// The unsigned integer of C's width.
template <typename C>
using Bits = std::conditional_t<sizeof(C) == 8, uint64_t, uint32_t>;

template <typename C>
struct Constants {
  C lr, alpha, rate, eps_inside, eps_outside, weight_decay, decay_factor, momentum, sign;
  // All ones where nesterov is set: a select by mask, which GCC vectorises (a condition
  // in the loop, even a constant one, kept it scalar).
  Bits<C> nesterov;
  // What u is multiplied by into the momentum buffer, and the buffer's direction into the step:
  // lr and 1 where the buffer accumulates lr * u (lr_in_momentum), else 1 and lr.
  C increment_scale, step_lr;
};

template <typename C>
inline Constants<C> constants_of(const Scalars& s) {
  const Bits<C> set = ~Bits<C>(0);
  const C lr = C(s.lr);
  return Constants<C>{lr,
                      C(s.alpha),
                      C(s.rate),
                      C(s.eps_inside),
                      C(s.eps_outside),
                      C(s.weight_decay),
                      C(s.decay_factor),
                      C(s.momentum),
                      C(s.sign),
                      s.nesterov ? set : 0,
                      s.lr_in_momentum ? lr : C(1),
                      s.lr_in_momentum ? C(1) : lr};
}

// mask ? a : b, bit for bit, for a mask of all ones or zeros.
template <typename C>
__attribute__((always_inline)) inline C select(Bits<C> mask, C a, C b) {
  Bits<C> x, y;
  std::memcpy(&x, &a, sizeof x);
  std::memcpy(&y, &b, sizeof y);
  const Bits<C> chosen = (x & mask) | (y & ~mask);
  C result;
  std::memcpy(&result, &chosen, sizeof result);
  return result;
}

struct Variant {
  bool centered, momentum, plain, coupled_weight_decay;
};

constexpr Variant variant_of(unsigned bits) {
  return Variant{(bits & kCentered) != 0, (bits & kMomentum) != 0, (bits & kPlain) != 0,
                 (bits & kCoupledWeightDecay) != 0};
}

// a * b + c, rounded once where the instruction set has fused multiply-adds
// (without them std::fma would be a slow library call).
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
inline float mul_add(float a, float b, float c) { return std::fma(a, b, c); }
inline double mul_add(double a, double b, double c) { return std::fma(a, b, c); }
#else
inline float mul_add(float a, float b, float c) { return a * b + c; }
inline double mul_add(double a, double b, double c) { return a * b + c; }
#endif

// bfloat16 as its bits: numpy and C++ have no bfloat16 type.
struct BFloat16 {
  uint16_t bits;
};

// float16 as its bits, converted with integer and float operations that GCC vectorises
// (it keeps _Float16 conversions scalar without AVX512-FP16).
struct Half {
  uint16_t bits;
};

template <Storage S>
struct StorageType;
template <>
struct StorageType<Storage::Float32> {
  using type = float;
};
template <>
struct StorageType<Storage::Float64> {
  using type = double;
};
template <>
struct StorageType<Storage::BFloat16> {
  using type = BFloat16;
};
template <>
struct StorageType<Storage::Float16> {
  using type = Half;
};

template <typename T>
using ComputeType = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// All ones if condition, else zero; and a choice by such a mask. Integer selects that GCC
// vectorises where a conditional expression mixing types left control flow in the loop.
inline uint32_t mask(bool condition) { return 0u - uint32_t(condition); }
inline uint32_t choose(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }

inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(BFloat16 x) { return bits_to_float(uint32_t(x.bits) << 16); }

// Exact: the exponent rebiased by a multiplication by 2^112, which also normalises
// subnormals; infinities and NaNs keep their payload.
__attribute__((always_inline)) inline float widen(Half x) {
  const uint32_t magnitude = uint32_t(x.bits & 0x7FFFu) << 13;
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t finite = float_to_bits(bits_to_float(magnitude) * 0x1p112f);
  const uint32_t special = magnitude | 0x7F800000u;
  return bits_to_float(sign | choose(mask(magnitude >= (0x7C00u << 13)), special, finite));
}

// Round to nearest even (F. Giesen's float_to_half_fast3_rtne): subnormal results
// rounded by a float addition, normal ones by integer arithmetic; NaN to 0x7E00.
__attribute__((always_inline)) inline Half narrow_half(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t magnitude = bits ^ sign;
  const uint32_t overflow = choose(mask(magnitude > 0x7F800000u), 0x7E00u, 0x7C00u);
  const float subnormal_magic = bits_to_float(126u << 23);
  const uint32_t subnormal = float_to_bits(bits_to_float(magnitude) + subnormal_magic) - (126u << 23);
  const uint32_t normal = (magnitude + (uint32_t(15 - 127) << 23) + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13;
  const uint32_t finite = choose(mask(magnitude < (113u << 23)), subnormal, normal);
  const uint32_t half = choose(mask(magnitude >= (143u << 23)), overflow, finite);
  return Half{uint16_t(half | (sign >> 16))};
}

// Round to nearest even, as torch converts (NaN to bfloat16 0x7FC0).
template <typename T, typename C>
__attribute__((always_inline)) inline T narrow(C x) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    const float value = float(x);
    const uint32_t bits = float_to_bits(value);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return BFloat16{uint16_t(choose(mask(value != value), 0x7FC0u, rounded))};
  } else if constexpr (std::is_same_v<T, Half>) {
    return narrow_half(float(x));
  } else {
    return T(x);
  }
}

// Elements per 32-bit output of the rounding noise, 16 bits each (rmsprop.formats.noise.rounding_noise).
constexpr int64_t kNoisePerOutput = 2;

// The rounding noise of elements [first, first + count) of a buffer, first a multiple of
// kNoisePerOutput: outputs first / 2, ... of the hash (kernel.h, noise_hash) read as little-endian
// 16-bit words. Computed a block at a time, a vector of outputs at once (32-bit multiplies, which
// AVX2 has), stored as they are and widened by the loop that uses them. noise holds kBlock words:
// the last output may fill one past count.
using AliasedWords = uint32_t __attribute__((may_alias));

inline void rounding_noise(uint64_t seed, int64_t first, int64_t count, uint16_t* __restrict noise) {
  const int64_t n = (count + kNoisePerOutput - 1) / kNoisePerOutput;
  // Output o hashes (o + low half) mod 2^32, xor the high half.
  const uint32_t base = uint32_t(uint64_t(first / kNoisePerOutput)) + uint32_t(seed), high = uint32_t(seed >> 32);
  if constexpr (std::endian::native == std::endian::little) {
    AliasedWords* words = reinterpret_cast<AliasedWords*>(noise);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) words[j] = noise_hash((base + uint32_t(j)) ^ high);
  } else {
    for (int64_t i = 0; i < count; ++i)
      noise[i] = uint16_t(noise_hash((base + uint32_t(i / kNoisePerOutput)) ^ high) >> (16 * (i % kNoisePerOutput)));
  }
}

// Stochastic rounding to bfloat16 with 16 bits of noise (rmsprop.formats.codecs.stochastic_round_bf16):
// up with probability proportional to the dropped bits. NaN stays NaN.
template <typename C>
__attribute__((always_inline)) inline BFloat16 round_stochastically(C x, uint16_t noise) {
  const float value = float(x);
  // Chosen before the shift: a select on the 32-bit lanes, not on their narrowed halves.
  return BFloat16{uint16_t(choose(mask(value != value), 0x7FC00000u, float_to_bits(value) + noise) >> 16)};
}

// clamp_min(x, 0), NaN staying NaN, as a select by mask.
template <typename C>
__attribute__((always_inline)) inline C clamp_to_zero(C x) {
  return select(Bits<C>(0) - Bits<C>(x < 0), C(0), x);
}

// One element of the rule of rmsprop.core.functional.
// Always inlined: a call in a loop keeps it scalar, and GCC's inliner gave up on some
// of the larger loops.
template <typename C, Variant V>
__attribute__((always_inline)) inline void apply_rule(C& p, C g, C& v, C& m, C& b, C inverse_correction, const Constants<C>& k,
                                                     C* root = nullptr) {
  if constexpr (!V.plain) {
    p = p * k.decay_factor;
    g = g * k.sign;
    if constexpr (V.coupled_weight_decay) g = mul_add(k.weight_decay, p, g);
  }
  v = mul_add(k.alpha, v, k.rate * (g * g));
  C second_moment = v;
  if constexpr (!V.plain) second_moment = second_moment * inverse_correction;
  if constexpr (V.centered) {
    m = mul_add(k.rate, g - m, m);
    C mean = m;
    if constexpr (!V.plain) mean = mean * inverse_correction;
    second_moment = mul_add(-mean, mean, second_moment);
    second_moment = clamp_to_zero(second_moment);
  }
  const C denominator_root = std::sqrt(second_moment + k.eps_inside);
  if (root) *root = denominator_root;
  const C u = g / (denominator_root + k.eps_outside);
  if constexpr (V.momentum) {
    // lr_in_momentum: the buffer accumulates lr * u and the step subtracts it as it is. Either
    // way one multiply by a constant: u * 1 and fma(-1, d, p) are u and p - d, bit for bit.
    const C increment = u * k.increment_scale;
    b = mul_add(k.momentum, b, increment);
    const C direction = select(k.nesterov, mul_add(k.momentum, b, increment), b);
    p = mul_add(-k.step_lr, direction, p);
  } else {
    p = mul_add(-k.lr, u, p);
  }
}

// State of the parameter's storage, or float32 beside a 16-bit parameter.
template <typename S, typename T, unsigned B>
void plain_state_chunk(const Job& job, const Entry& e, int64_t start, int64_t end) {
  using C = ComputeType<S>;
  constexpr Variant V = variant_of(B);
  const Constants<C> k = constants_of<C>(job.scalars);
  const C inverse_correction = C(e.inverse_correction);
  S* __restrict p = static_cast<S*>(e.param) + start;
  const S* __restrict g = static_cast<const S*>(e.grad) + start;
  T* __restrict v = static_cast<T*>(e.square) + start;
  T* __restrict m = V.centered ? static_cast<T*>(e.grad_avg) + start : nullptr;
  T* __restrict b = V.momentum ? static_cast<T*>(e.momentum) + start : nullptr;
  const int64_t n = end - start;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    C pi = widen(p[i]), vi = widen(v[i]), mi = 0, bi = 0;
    if constexpr (V.centered) mi = widen(m[i]);
    if constexpr (V.momentum) bi = widen(b[i]);
    apply_rule<C, V>(pi, widen(g[i]), vi, mi, bi, inverse_correction, k);
    p[i] = narrow<S>(pi);
    v[i] = narrow<T>(vi);
    if constexpr (V.centered) m[i] = narrow<T>(mi);
    if constexpr (V.momentum) b[i] = narrow<T>(bi);
  }
}

// bfloat16 state, rounded stochastically; centered, it holds grad_variance in place of square_avg.
// A block at a time: the block's noise first, then the rule over it.
template <typename S, unsigned B>
void bfloat16_state_chunk(const Job& job, const Entry& e, int64_t start, int64_t end) {
  using C = ComputeType<S>;
  constexpr Variant V = variant_of(B);
  const Constants<C> k = constants_of<C>(job.scalars);
  const C inverse_correction = C(e.inverse_correction);
  const C weight_before = C(e.weight_before), weight_after = C(e.weight_after);
  alignas(64) uint16_t v_noise[kBlock], m_noise[kBlock], b_noise[kBlock];
  for (int64_t first = start; first < end; first += kBlock) {
    const int64_t n = std::min(kBlock, end - first);
    S* __restrict p = static_cast<S*>(e.param) + first;
    const S* __restrict g = static_cast<const S*>(e.grad) + first;
    BFloat16* __restrict v = static_cast<BFloat16*>(e.square) + first;
    BFloat16* __restrict m = V.centered ? static_cast<BFloat16*>(e.grad_avg) + first : nullptr;
    BFloat16* __restrict b = V.momentum ? static_cast<BFloat16*>(e.momentum) + first : nullptr;
    rounding_noise(e.seeds[0], first, n, v_noise);
    if constexpr (V.centered) rounding_noise(e.seeds[1], first, n, m_noise);
    if constexpr (V.momentum) rounding_noise(e.seeds[2], first, n, b_noise);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      C pi = widen(p[i]), vi = widen(v[i]), mi = 0, bi = 0;
      if constexpr (V.centered) {
        mi = widen(m[i]);
        vi = vi + weight_before * (mi * mi);
      }
      if constexpr (V.momentum) bi = widen(b[i]);
      apply_rule<C, V>(pi, widen(g[i]), vi, mi, bi, inverse_correction, k);
      p[i] = narrow<S>(pi);
      if constexpr (V.centered) {
        vi = clamp_to_zero(vi - weight_after * (mi * mi));
        m[i] = round_stochastically(mi, m_noise[i]);
      }
      v[i] = round_stochastically(vi, v_noise[i]);
      if constexpr (V.momentum) b[i] = round_stochastically(bi, b_noise[i]);
    }
  }
}

// --- 8-bit blocks -----------------------------------------------------------

// values[i] = map[codes[i]] * scale.
inline void decode_block(const uint8_t* __restrict codes, int64_t count, const float* __restrict map, float scale,
                         float* __restrict values) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 scales = _mm512_set1_ps(scale);
  for (; i + 16 <= count; i += 16) {
    const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    _mm512_storeu_ps(values + i, _mm512_mul_ps(_mm512_i32gather_ps(index, map, 4), scales));
  }
#elif defined(__AVX2__)
  const __m256 scales = _mm256_set1_ps(scale);
  for (; i + 8 <= count; i += 8) {
    const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    _mm256_storeu_ps(values + i, _mm256_mul_ps(_mm256_i32gather_ps(map, index, 4), scales));
  }
#endif
  for (; i < count; ++i) values[i] = map[codes[i]] * scale;
}

// The code of each scaled value (rmsprop.formats.codecs.quantize_blockwise): j = the count of
// map values below x, lower = clamp(j, 1, 255) - 1 (so map[lower] < x <= map[lower + 1], or
// the nearest end), then up with probability proportional to the distance from map[lower]:
// where uniform * gap < x - map[lower], uniform = noise / 2^16 and gap = map[lower + 1] - map[lower].
//
// j is computed, not searched (kernel.h, MapLayout): the decade of |x| by six comparisons, the
// count of the decade's bin midpoints below it by a multiply-add and a floor.
// The scalar loop's floor errs by at most one in a known direction (the margin) and one
// comparison with the map fixes it.
template <bool Signed>
__attribute__((always_inline)) inline int32_t estimate_count(float x, const float* __restrict map) {
  const MapLayout& m = Signed ? kSignedLayout : kUnsignedLayout;
  const bool positive = x > 0;
  const float y = positive ? x : -x;
  int32_t k = 0;
  for (int i = 1; i < kDecades; ++i) k += y >= m.edge[i];
  // Below the count for x > 0, above it for -x (the negative half mirrors the positive one).
  // Clamped before the conversion: beyond int32's range it is undefined.
  const float t = std::min(positive ? y * m.scale[k] - m.offset_below[k] : y * m.scale[k] - m.offset_above[k], 256.0f);
  const int32_t bins = std::min(std::max(int32_t(std::floor(t)), 0), m.bins[k]) + m.base[k];
  if constexpr (Signed) {
    // x <= 0: of the midpoints at or above -x, all but the smallest have their negative in the map.
    if (positive) return 128 + bins;
    return std::max(127 - bins - int32_t(y >= 1.0f) + int32_t(y >= map[128]), 0);
  } else {
    return positive ? 1 + bins : 1;
  }
}

// The decade of y by its binary exponent, for the AVX-512 loop: binade j = [2^(j-21), 2^(j-20))
// (clamped to [0, 31]) holds at most one of the edges 10^(d-7), 1 <= d < 7: below[j] of them lie
// at or below it, and y >= inside[j] (infinity where none lies inside) adds the one inside.
struct DecadeOfBinade {
  int32_t below[32];
  float inside[32];
};

constexpr DecadeOfBinade decade_of_binade() {
  DecadeOfBinade table{};
  const MapLayout& m = kSignedLayout;
  double bottom = 1.0;
  for (int e = 0; e < 21; ++e) bottom /= 2;
  for (int j = 0; j < 32; ++j, bottom *= 2) {
    table.below[j] = 0;
    table.inside[j] = std::numeric_limits<float>::infinity();
    for (int d = 1; d < kDecades; ++d) {
      if (m.edge[d] <= bottom) ++table.below[j];
      else if (m.edge[d] < 2 * bottom) table.inside[j] = m.edge[d];
    }
  }
  return table;
}

inline constexpr DecadeOfBinade kDecadeOfBinade = decade_of_binade();

// The vector loops estimate lower itself, without the margin (kernel.h, MapLayout::shift: so it is
// exact but within float32's errors of a midpoint), load map[lower] and map[lower + 1] as one
// 64-bit word of each element, check map[lower] <= z <= map[lower + 1] exactly (z: x clamped to
// the map's range, which leaves its code as it is) and move the rare lanes where that fails by
// one until it holds.
template <bool Signed>
inline void lookup_codes(const float* __restrict values, float prescale, float reciprocal,
                         const uint16_t* __restrict noise, int64_t count, const float* __restrict map,
                         uint8_t* __restrict codes) {
  const MapLayout& m = Signed ? kSignedLayout : kUnsignedLayout;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1), last = _mm512_set1_epi32(254);
  const __m512 scales = _mm512_loadu_ps(m.scale), shifts = _mm512_loadu_ps(m.shift),
               prescales = _mm512_set1_ps(prescale), reciprocals = _mm512_set1_ps(reciprocal),
               first_value = _mm512_set1_ps(map[0]), last_value = _mm512_set1_ps(map[255]);
  const __m512i below_low = _mm512_loadu_si512(kDecadeOfBinade.below), below_high = _mm512_loadu_si512(kDecadeOfBinade.below + 16);
  const __m512 inside_low = _mm512_loadu_ps(kDecadeOfBinade.inside), inside_high = _mm512_loadu_ps(kDecadeOfBinade.inside + 16);
  // The low and high words of the 64-bit pairs, in element order.
  const __m512i lows = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i highs = _mm512_add_epi32(lows, one);
  for (; i + 16 <= count; i += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(values + i), prescales), reciprocals);
    // NaN with the positive values: it then gets lower = 254, as the count of map values below it is 256.
    const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NLE_UQ);
    const __m512 y = _mm512_abs_ps(x);
    __m512i binade = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(y), 23), _mm512_set1_epi32(127 - 21));
    binade = _mm512_min_epi32(_mm512_max_epi32(binade, zero), _mm512_set1_epi32(31));
    __m512i k = _mm512_permutex2var_epi32(below_low, binade, below_high);
    const __m512 inside = _mm512_permutex2var_ps(inside_low, binade, inside_high);
    k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(y, inside, _CMP_GE_OQ), k, one);
    // The midpoints at or below y; NaN and (in encode_codes) anything beyond the map to 256 (min's
    // second operand where the first is NaN).
    const __m512 t = _mm512_min_ps(_mm512_fmadd_ps(y, _mm512_permutexvar_ps(k, scales), _mm512_permutexvar_ps(k, shifts)),
                                   _mm512_set1_ps(256.0f));
    const __m512i n = _mm512_cvttps_epi32(t);  // not negative, so truncated as floored
    // Signed, x <= 0: of the midpoints at or above -x, all but the smallest have their negative in the map.
    const __m512i below_zero = Signed ? _mm512_min_epi32(_mm512_sub_epi32(_mm512_set1_epi32(127), n), _mm512_set1_epi32(126)) : zero;
    __m512i lower = _mm512_mask_blend_epi32(positive, below_zero, Signed ? _mm512_add_epi32(n, _mm512_set1_epi32(127)) : n);
    lower = _mm512_min_epi32(_mm512_max_epi32(lower, zero), last);
    // Clamped to the map's range (NaN kept): its code is the same, and the checks then never move
    // lower past the ends.
    const __m512 z = _mm512_min_ps(last_value, _mm512_max_ps(first_value, x));
    __m512 low, high;
    for (;;) {
      const __m512 first = _mm512_castsi512_ps(_mm512_i32gather_epi64(_mm512_castsi512_si256(lower), map, 4));
      const __m512 second = _mm512_castsi512_ps(_mm512_i32gather_epi64(_mm512_extracti64x4_epi64(lower, 1), map, 4));
      low = _mm512_permutex2var_ps(first, lows, second);
      high = _mm512_permutex2var_ps(first, highs, second);
      // z = low gives the same code from lower as from lower - 1.
      const __mmask16 down = _mm512_cmp_ps_mask(z, low, _CMP_LT_OQ), up = _mm512_cmp_ps_mask(z, high, _CMP_GT_OQ);
      if (__builtin_expect((down | up) == 0, 1)) break;
      lower = _mm512_mask_add_epi32(_mm512_mask_sub_epi32(lower, down, lower, one), up, lower, one);
    }
    const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(noise + i)));
    const __m512 uniform = _mm512_mul_ps(_mm512_cvtepi32_ps(words), _mm512_set1_ps(0x1p-16f));
    const __mmask16 round_up =
        _mm512_cmp_ps_mask(_mm512_mul_ps(uniform, _mm512_sub_ps(high, low)), _mm512_sub_ps(z, low), _CMP_LT_OQ);
    const __m512i code = _mm512_mask_add_epi32(lower, round_up, lower, one);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(code));
  }
#elif defined(__AVX2__)
  const __m256i zero = _mm256_setzero_si256(), last = _mm256_set1_epi32(254);
  const __m256 scales = _mm256_loadu_ps(m.scale), shifts = _mm256_loadu_ps(m.shift),
               prescales = _mm256_set1_ps(prescale), reciprocals = _mm256_set1_ps(reciprocal),
               first_value = _mm256_set1_ps(map[0]), last_value = _mm256_set1_ps(map[255]);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // Elements 0, 1, 4, 5 then 2, 3, 6, 7: the order in which the shuffles of the pairs below
  // leave them in 128-bit lanes.
  const __m256i pair_order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  const long long* pairs = reinterpret_cast<const long long*>(map);
  for (; i + 8 <= count; i += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(values + i), prescales), reciprocals);
    const __m256i positive = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NLE_UQ));
    const __m256 y = _mm256_and_ps(x, magnitude);
    // A true comparison is -1 in every bit: subtracting it adds one.
    __m256i k = zero;
    for (int d = 1; d < kDecades; ++d)
      k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(y, _mm256_set1_ps(m.edge[d]), _CMP_GE_OQ)));
    // Not negative, so truncated as floored.
    const __m256 t = _mm256_min_ps(_mm256_fmadd_ps(y, _mm256_permutevar8x32_ps(scales, k), _mm256_permutevar8x32_ps(shifts, k)),
                                   _mm256_set1_ps(256.0f));
    const __m256i n = _mm256_cvttps_epi32(t);
    __m256i lower;
    if constexpr (Signed) {
      const __m256i below_zero = _mm256_min_epi32(_mm256_sub_epi32(_mm256_set1_epi32(127), n), _mm256_set1_epi32(126));
      lower = _mm256_or_si256(_mm256_and_si256(positive, _mm256_add_epi32(n, _mm256_set1_epi32(127))),
                              _mm256_andnot_si256(positive, below_zero));
    } else {
      lower = _mm256_and_si256(positive, n);
    }
    lower = _mm256_min_epi32(_mm256_max_epi32(lower, zero), last);
    const __m256 z = _mm256_min_ps(last_value, _mm256_max_ps(first_value, x));
    __m256 low, high;
    for (;;) {
      const __m256i ordered = _mm256_permutevar8x32_epi32(lower, pair_order);
      const __m256 first = _mm256_castsi256_ps(_mm256_i32gather_epi64(pairs, _mm256_castsi256_si128(ordered), 4));
      const __m256 second = _mm256_castsi256_ps(_mm256_i32gather_epi64(pairs, _mm256_extracti128_si256(ordered, 1), 4));
      low = _mm256_shuffle_ps(first, second, 0x88);
      high = _mm256_shuffle_ps(first, second, 0xDD);
      const __m256 down = _mm256_cmp_ps(z, low, _CMP_LT_OQ), up = _mm256_cmp_ps(z, high, _CMP_GT_OQ);
      if (__builtin_expect(_mm256_movemask_ps(_mm256_or_ps(down, up)) == 0, 1)) break;
      lower = _mm256_sub_epi32(_mm256_add_epi32(lower, _mm256_castps_si256(down)), _mm256_castps_si256(up));
    }
    const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(noise + i)));
    const __m256 uniform = _mm256_mul_ps(_mm256_cvtepi32_ps(words), _mm256_set1_ps(0x1p-16f));
    const __m256 round_up = _mm256_cmp_ps(_mm256_mul_ps(uniform, _mm256_sub_ps(high, low)), _mm256_sub_ps(z, low), _CMP_LT_OQ);
    const __m256i code = _mm256_sub_epi32(lower, _mm256_castps_si256(round_up));
    const __m128i halves = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(halves, halves));
  }
#endif
  for (; i < count; ++i) {
    const float x = values[i] * prescale * reciprocal;
    int32_t j = x != x ? 255 : estimate_count<Signed>(x, map);
    j += map[j] < x;
    const int32_t lower = std::min(std::max(j, 1), 255) - 1;
    const float low = map[lower];
    // Through int32: AVX2 converts no unsigned integers.
    codes[i] = uint8_t(lower + (float(int32_t(noise[i])) * 0x1p-16f * (map[lower + 1] - low) < x - low));
  }
}

// The largest magnitude of a block as the largest bit pattern of |x|: a NaN's lies above inf's,
// so a NaN anywhere becomes the absmax, as in torch's amax.
inline uint32_t magnitude_bits(float x) { return float_to_bits(x) & 0x7FFFFFFFu; }

// rmsprop.formats.codecs.quantize_blockwise of one block whose largest magnitude is known, with
// the noise of its elements (first: the index of its first element).
template <bool Signed>
inline void encode_block(const float* __restrict values, int64_t count, float block_absmax, uint8_t* __restrict codes,
                         float* absmax, const float* __restrict map, uint64_t seed, int64_t first) {
  *absmax = block_absmax;
  alignas(64) uint16_t noise[kBlock];
  rounding_noise(seed, first, count, noise);
  // Multiplied by the reciprocal of the absmax (quantize_blockwise): a block whose absmax lies
  // outside [2^-126, 2^126) by 2^32 or 2^-32 first, so that the reciprocal is a normal float; the
  // reciprocal rounded up where rounding to nearest fell below it, so that the largest magnitude
  // scales to 1 or beyond and is encoded exactly.
  const float prescale = block_absmax < 0x1p-126f ? 0x1p32f : block_absmax >= 0x1p126f ? 0x1p-32f : 1.0f;
  const float divisor = block_absmax > 0 ? block_absmax * prescale : 1.0f;
  float reciprocal = 1.0f / divisor;
  if (divisor * reciprocal < 1.0f) reciprocal = bits_to_float(float_to_bits(reciprocal) + 1);
  lookup_codes<Signed>(values, prescale, reciprocal, noise, count, map, codes);
}

// 8-bit state, a block at a time: decode, apply the rule, encode. square holds
// sqrt(square_avg) (centered: sqrt(grad_variance)) with the unsigned map, the
// others the signed map. SharedRoot: the new root is the rule's sqrt(second moment + eps_inside)
// (blockwise_step says when).
template <typename S, unsigned B, bool SharedRoot>
void blockwise_state_chunk(const Job& job, const Entry& e, int64_t start, int64_t end) {
  using C = ComputeType<S>;
  constexpr Variant V = variant_of(B);
  const Constants<C> k = constants_of<C>(job.scalars);
  const C inverse_correction = C(e.inverse_correction);
  const C weight_before = C(e.weight_before), weight_after = C(e.weight_after);
  const Maps& maps = job.maps;
  S* __restrict p_all = static_cast<S*>(e.param);
  const S* __restrict g_all = static_cast<const S*>(e.grad);
  uint8_t* v_codes = static_cast<uint8_t*>(e.square);
  uint8_t* m_codes = static_cast<uint8_t*>(e.grad_avg);
  uint8_t* b_codes = static_cast<uint8_t*>(e.momentum);
  // One block's decoded values, then its new values in float32, with their absmax.
  alignas(64) float new_v[kBlock], new_m[kBlock], new_b[kBlock];
  for (int64_t first = start; first < end; first += kBlock) {
    const int64_t block = first / kBlock;
    const int64_t count = std::min(kBlock, e.size - first);
    decode_block(v_codes + first, count, maps.unsigned_map, e.square_absmax[block], new_v);
    if constexpr (V.centered) decode_block(m_codes + first, count, maps.signed_map, e.grad_avg_absmax[block], new_m);
    if constexpr (V.momentum) decode_block(b_codes + first, count, maps.signed_map, e.momentum_absmax[block], new_b);
    S* __restrict p = p_all + first;
    const S* __restrict g = g_all + first;
    uint32_t v_largest = 0, m_largest = 0, b_largest = 0;
#pragma omp simd reduction(max : v_largest, m_largest, b_largest)
    for (int64_t i = 0; i < count; ++i) {
      const C root = C(new_v[i]);
      C vi = root * root, mi = 0, bi = 0, new_root = 0;
      if constexpr (V.centered) {
        mi = C(new_m[i]);
        vi = vi + weight_before * (mi * mi);
      }
      if constexpr (V.momentum) bi = C(new_b[i]);
      C pi = widen(p[i]);
      apply_rule<C, V>(pi, widen(g[i]), vi, mi, bi, inverse_correction, k, &new_root);
      p[i] = narrow<S>(pi);
      if constexpr (V.centered) {
        vi = vi - weight_after * (mi * mi);
        new_m[i] = float(mi);
        m_largest = std::max(m_largest, magnitude_bits(new_m[i]));
      }
      if constexpr (V.momentum) {
        new_b[i] = float(bi);
        b_largest = std::max(b_largest, magnitude_bits(new_b[i]));
      }
      if constexpr (!SharedRoot) new_root = std::sqrt(clamp_to_zero(vi));
      new_v[i] = float(new_root);
      v_largest = std::max(v_largest, magnitude_bits(new_v[i]));
    }
    encode_block<false>(new_v, count, bits_to_float(v_largest), v_codes + first, e.square_absmax + block,
                        maps.unsigned_map, e.seeds[0], first);
    if constexpr (V.centered)
      encode_block<true>(new_m, count, bits_to_float(m_largest), m_codes + first, e.grad_avg_absmax + block,
                         maps.signed_map, e.seeds[1], first);
    if constexpr (V.momentum)
      encode_block<true>(new_b, count, bits_to_float(b_largest), b_codes + first, e.momentum_absmax + block,
                         maps.signed_map, e.seeds[2], first);
  }
}

// Without centering, the new square_avg v is the rule's second moment where there is no bias
// correction (its factor 1 exact); with eps outside the root (eps_inside 0: v + 0 is v but for
// -0, whose code is 0 too) and alpha and 1 - alpha not negative (v then has no negative values
// for the clamp to zero to change), the rule's root is the root to store, bit for bit.
template <typename S, unsigned B>
void blockwise_step(const Job& job, const Entry& e, int64_t start, int64_t end) {
  constexpr Variant V = variant_of(B);
  if constexpr (!V.centered) {
    const Scalars& s = job.scalars;
    using C = ComputeType<S>;
    const bool shared = s.eps_inside == 0 && C(s.alpha) >= 0 && C(s.rate) >= 0 && (V.plain || C(e.inverse_correction) == 1);
    if (shared) return blockwise_state_chunk<S, B, true>(job, e, start, end);
  }
  blockwise_state_chunk<S, B, false>(job, e, start, end);
}

// The codes of values already divided by their block's absmax, with given noise, as the 8-bit
// encoding finds them (tests compare them with the reference's).
inline void encode_codes(bool is_signed, const float* scaled, const uint16_t* noise, int64_t count, const float* map,
                         uint8_t* codes) {
  if (is_signed) lookup_codes<true>(scaled, 1.0f, 1.0f, noise, count, map, codes);
  else lookup_codes<false>(scaled, 1.0f, 1.0f, noise, count, map, codes);
}

template <Storage S, Format F, unsigned B>
void step_chunk(const Job& job, const Entry& e, int64_t start, int64_t end) {
  using T = typename StorageType<S>::type;
  if constexpr (F == Format::Same) plain_state_chunk<T, T, B>(job, e, start, end);
  else if constexpr (F == Format::Float32) plain_state_chunk<T, float, B>(job, e, start, end);
  else if constexpr (F == Format::BFloat16) bfloat16_state_chunk<T, B>(job, e, start, end);
  else blockwise_step<T, B>(job, e, start, end);
}

template <Storage S, Format F, unsigned B>
constexpr ChunkFunction entry_of() {
  if constexpr (normalized(B) == B) return &step_chunk<S, F, B>;
  else return nullptr;
}

template <Storage S, Format F, size_t... B>
ChunkFunction pick(unsigned variant, std::index_sequence<B...>) {
  static constexpr ChunkFunction table[] = {entry_of<S, F, B>()...};
  return table[normalized(variant) % kVariants];
}

template <Storage S>
ChunkFunction pick_format(Format format, unsigned variant) {
  constexpr auto variants = std::make_index_sequence<kVariants>{};
  switch (format) {
    case Format::Same: return pick<S, Format::Same>(variant, variants);
    case Format::Float32:
      if constexpr (S == Storage::BFloat16 || S == Storage::Float16) return pick<S, Format::Float32>(variant, variants);
      return nullptr;
    case Format::BFloat16: return pick<S, Format::BFloat16>(variant, variants);
    case Format::Blockwise8bit: return pick<S, Format::Blockwise8bit>(variant, variants);
  }
  return nullptr;
}

inline ChunkFunction chunk_function(Storage storage, Format format, unsigned variant) {
  switch (storage) {
    case Storage::Float32: return pick_format<Storage::Float32>(format, variant);
    case Storage::Float64: return pick_format<Storage::Float64>(format, variant);
    case Storage::BFloat16: return pick_format<Storage::BFloat16>(format, variant);
    case Storage::Float16: return pick_format<Storage::Float16>(format, variant);
  }
  return nullptr;
}
