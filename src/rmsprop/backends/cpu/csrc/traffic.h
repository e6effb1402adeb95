// The memory traffic of a step and nothing else, for the benchmark's bound: included by each
// instruction set's unit (isa_*.cpp) inside its namespace, beside the rule, so that the bound
// moves the step's bytes with the step's vector width.
//
// One pass as the step makes it: reads the gradient, reads and writes back the parameter and
// each buffer present. Parameters and gradients are float32 (a 16-bit tensor's bytes as half as
// many floats); state elements are float32, or 2 or 1 bytes (bfloat16 or 8-bit codes) beside
// float32 parameters. Adding g - g keeps finite values but cannot be optimised away without
// fast-math; integer state adds whether it is NaN, which is 0 for the finite gradients the
// benchmark moves.

template <typename S>
inline S nothing_as(float nothing) {
  if constexpr (std::is_same_v<S, float>) return nothing;
  else return S(nothing != nothing);
}

template <typename S, bool CenteredAverage, bool Momentum>
void traffic_chunk(const Entry& e, int64_t start, int64_t end) {
  float* __restrict p = static_cast<float*>(e.param) + start;
  const float* __restrict g = static_cast<const float*>(e.grad) + start;
  S* __restrict v = static_cast<S*>(e.square) + start;
  S* __restrict m = CenteredAverage ? static_cast<S*>(e.grad_avg) + start : nullptr;
  S* __restrict b = Momentum ? static_cast<S*>(e.momentum) + start : nullptr;
  const int64_t n = end - start;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float nothing = g[i] - g[i];
    p[i] += nothing;
    v[i] += nothing_as<S>(nothing);
    if constexpr (CenteredAverage) m[i] += nothing_as<S>(nothing);
    if constexpr (Momentum) b[i] += nothing_as<S>(nothing);
  }
}

// The Job is unused: the entry's buffers say which are moved.
template <typename S>
void traffic_of(const Job&, const Entry& e, int64_t start, int64_t end) {
  if (e.grad_avg && e.momentum) traffic_chunk<S, true, true>(e, start, end);
  else if (e.grad_avg) traffic_chunk<S, true, false>(e, start, end);
  else if (e.momentum) traffic_chunk<S, false, true>(e, start, end);
  else traffic_chunk<S, false, false>(e, start, end);
}

// The traffic loop of state elements of state_bytes (4, 2 or 1) bytes.
inline ChunkFunction traffic_function(int state_bytes) {
  switch (state_bytes) {
    case 4: return &traffic_of<float>;
    case 2: return &traffic_of<uint16_t>;
    case 1: return &traffic_of<uint8_t>;
    default: return nullptr;
  }
}
