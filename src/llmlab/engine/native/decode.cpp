// The native decode step: one token per row through a whole Llama-type model on grouped 4-/8-bit weights.
//
// Built on first use by llmlab/engine/native/__init__.py (g++ -O3 -march=native -fopenmp, one build per CPU
// kind) and called through ctypes: a plain C interface over raw pointers, so it builds in seconds without the
// PyTorch headers. Its OpenMP threads are PyTorch's own (the same libgomp.so.1 is already loaded).
//
// At batch 1 on a 135M model, a PyTorch step spends most of its time between kernels (30 layers of small
// GEMVs, Python, dispatch); here the whole step is C++, and each projection is one parallel pass over its
// weights that dequantizes a group of 32 once and multiplies it into every row of the batch. Where the CPU has
// AVX512-VNNI, the rows are rounded to int8 per group instead and meet the weights in integer dot products (as
// llama.cpp's Q8 x Q4 kernels do): at batch 1 the step is bound by streaming the weights, and these keep up with it.
// Attention reads the fp32 cache in blocks of 16 positions (one shuffle tree for their 16 scores, a vector exp),
// split into parts of 64 positions that the threads share and whose softmaxes are combined after.
//
// Weights: w[o, i] = d[o, g] * q[o, i] + m[o, g] for the group g = i / 32 (GGUF's Q4_1 form, fp16 d and m).
// 4 bits: two per byte, byte j of a group holding q[j] (low nibble) and q[j + 16] (high nibble), as in GGUF;
// 8 bits: one byte per weight. The KV cache is the engine's own (llmlab.model.transformer.KVCache): per layer a
// (batch, kv_heads, slots, head_dim) fp32 tensor, possibly a view (the batcher's), so its strides are given.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t GROUP = 32;

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0 && mant == 0) {
    bits = sign;
  } else if (exp == 0) {  // subnormal: normalise the mantissa
    exp = 127 - 15 + 1;
    while (!(mant & 0x400)) mant <<= 1, --exp;
    bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

}  // namespace

extern "C" {

struct QMat {
  const uint8_t* q;
  const uint16_t* d;  // fp16, as GGUF stores them (a Q4_1/Q8_0 file's scales are exact)
  const uint16_t* m;
  const float* bias;  // null when the projection has none
  int64_t out, in, bits;
};

struct ModelDesc {
  int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, hidden, vocab;
  double eps;
  const float* embed;    // (vocab, dim) fp32, or null: rows of embed_q instead
  const QMat* embed_q;
  const float* const* norm_in;  // per layer (dim,)
  const float* const* norm_post;
  const float* norm_final;
  const float* inv_freq;  // (head_dim / 2,)
  const QMat* wq;  // each an array of n_layers matrices
  const QMat* wk;
  const QMat* wv;
  const QMat* wo;
  const QMat* wgate;
  const QMat* wup;
  const QMat* wdown;
  const QMat* head;
};

}  // extern "C"

namespace {

inline int64_t row_bytes(const QMat& W) { return W.bits == 4 ? W.in / 2 : W.in; }

// ---- y[r, o] = sum_i w[o, i] x[r, i] for NB rows of x and the output rows [o0, o1) ------------------------------

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
template <int BITS>
inline void dequant_group(const uint8_t* q, float d, float m, __m512& w0, __m512& w1) {
  const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(m);
  __m512i lo, hi;
  if (BITS == 4) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    lo = _mm512_and_si512(v, _mm512_set1_epi32(15));
    hi = _mm512_srli_epi32(v, 4);
  } else {
    lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
  }
  w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), dv, mv);
  w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), dv, mv);
}

template <int BITS, int NB>
void rows_kernel(const QMat& W, int64_t o0, int64_t o1, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const int64_t groups = W.in / GROUP, rb = row_bytes(W), gb = GROUP * BITS / 8;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* q = W.q + o * rb;
    const uint16_t* d = W.d + o * groups;
    const uint16_t* m = W.m + o * groups;
    __m512 acc[2 * NB];  // two chains per row (low and high half of each group): half the FMA latency chain
    for (int r = 0; r < 2 * NB; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 w0, w1;
      dequant_group<BITS>(q + g * gb, half_to_float(d[g]), half_to_float(m[g]), w0, w1);
      for (int r = 0; r < NB; ++r) {
        const float* xr = x + r * ldx + g * GROUP;
        acc[2 * r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[2 * r]);
        acc[2 * r + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[2 * r + 1]);
      }
    }
    for (int r = 0; r < NB; ++r) y[r * ldy + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * r], acc[2 * r + 1]));
  }
}

// For one or two rows: sum_i (d q_i + m) x_i = d (q . x) + m (sum of x) per group, so each group costs a
// multiply-add per half and one scaling, not a dequantization; the m terms are one short dot product per row
// with the group sums of x (xs, precomputed). Same fp32 arithmetic, a third fewer instructions.
template <int BITS, int NB>
void rows_factored(const QMat& W, int64_t o0, int64_t o1, const float* x, int64_t ldx, const float* xs, float* y,
                   int64_t ldy) {
  const int64_t groups = W.in / GROUP, rb = row_bytes(W), gb = GROUP * BITS / 8;
  std::vector<float> scales(groups + 16);
  float* dr = scales.data();
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* q = W.q + o * rb;
    const uint16_t* d = W.d + o * groups;
    const uint16_t* m = W.m + o * groups;
    __m512 acc[NB], mterm[NB];
    for (int r = 0; r < NB; ++r) acc[r] = mterm[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 k = groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (groups - g)) - 1);
      _mm512_storeu_ps(dr + g, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, d + g)));
      const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m + g));
      for (int r = 0; r < NB; ++r) mterm[r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, xs + r * groups + g), mterm[r]);
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m512 q0, q1;
      const uint8_t* qg = q + g * gb;
      if (BITS == 4) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg)));
        q0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
        q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
      } else {
        q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg))));
        q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + 16))));
      }
      const __m512 dv = _mm512_set1_ps(dr[g]);
      for (int r = 0; r < NB; ++r) {
        const float* xr = x + r * ldx + g * GROUP;
        const __m512 t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xr + 16), _mm512_mul_ps(q0, _mm512_loadu_ps(xr)));
        acc[r] = _mm512_fmadd_ps(t, dv, acc[r]);
      }
    }
    for (int r = 0; r < NB; ++r) y[r * ldy + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], mterm[r]));
  }
}
#define LLMLAB_FACTORED 1
#else
template <int BITS, int NB>
void rows_kernel(const QMat& W, int64_t o0, int64_t o1, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const int64_t groups = W.in / GROUP, rb = row_bytes(W), gb = GROUP * BITS / 8;
  float w[GROUP];
  for (int64_t o = o0; o < o1; ++o) {
    float acc[NB] = {0};
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* q = W.q + o * rb + g * gb;
      const float d = half_to_float(W.d[o * groups + g]), m = half_to_float(W.m[o * groups + g]);
      for (int j = 0; j < 16; ++j) {
        const int lo = BITS == 4 ? (q[j] & 15) : q[j], hi = BITS == 4 ? (q[j] >> 4) : q[j + 16];
        w[j] = d * lo + m;
        w[j + 16] = d * hi + m;
      }
      for (int r = 0; r < NB; ++r) {
        const float* xr = x + r * ldx + g * GROUP;
        float s = 0.f;
        for (int j = 0; j < GROUP; ++j) s += w[j] * xr[j];
        acc[r] += s;
      }
    }
    for (int r = 0; r < NB; ++r) y[r * ldy + o] = acc[r];
  }
}
#endif

template <int BITS>
void rows_any(const QMat& W, int64_t o0, int64_t o1, const float* x, int64_t ldx, const float* xs, int64_t B, float* y,
              int64_t ldy) {
#if defined(LLMLAB_FACTORED)
  if (B == 1) return rows_factored<BITS, 1>(W, o0, o1, x, ldx, xs, y, ldy);
  if (B == 2) return rows_factored<BITS, 2>(W, o0, o1, x, ldx, xs, y, ldy);
#endif
  for (int64_t b = 0; b < B; b += 8) {  // up to eight rows share each dequantized group (16 accumulators)
    const float* xb = x + b * ldx;
    float* yb = y + b * ldy;
    switch (std::min<int64_t>(8, B - b)) {
      case 1: rows_kernel<BITS, 1>(W, o0, o1, xb, ldx, yb, ldy); break;
      case 2: rows_kernel<BITS, 2>(W, o0, o1, xb, ldx, yb, ldy); break;
      case 3: rows_kernel<BITS, 3>(W, o0, o1, xb, ldx, yb, ldy); break;
      case 4: rows_kernel<BITS, 4>(W, o0, o1, xb, ldx, yb, ldy); break;
      case 5: rows_kernel<BITS, 5>(W, o0, o1, xb, ldx, yb, ldy); break;
      case 6: rows_kernel<BITS, 6>(W, o0, o1, xb, ldx, yb, ldy); break;
      case 7: rows_kernel<BITS, 7>(W, o0, o1, xb, ldx, yb, ldy); break;
      default: rows_kernel<BITS, 8>(W, o0, o1, xb, ldx, yb, ldy); break;
    }
  }
}

// ---- int8 activations x 4-/8-bit weights (AVX512-VNNI), llama.cpp's Q8 x Q4 dot product ----------------------
//
// Each row of x is rounded once per matmul to 8 bits per group of 32 (x_i ~ s xq_i, s = max |x| / 127), so that per
// group sum_i (d q_i + m) x_i ~ d s (q . xq) + m s (sum of xq): the integer dot q . xq is _mm512_dpbusd_epi32 (64
// u8 x s8 products per instruction, exact in int32). The m term takes the rounded sum too, not x's exact one: so the
// rounding errors e_i meet the centred weights d q_i + m, not d q_i alone (whose mean, ~7.5 d for 4 bits and ~128 d
// for Q8_0, would turn them into a bias: SmolLM2's top-1 agreed with the exact model's at 91% of 1200 positions that
// way, at 96.8% this way; llama.cpp's at 96.5%). The activations' rounding (at most s/2 per value) is the only
// approximation; llmlab_int8(0) switches back to the fp32 kernels.
#if defined(LLMLAB_FACTORED) && defined(__AVX512VNNI__)
#define LLMLAB_VNNI 1
// $LLMLAB_NATIVE_INT8=0 starts with the fp32 kernels (e.g. to compare both paths); llmlab_int8() switches later
int int8_activations = [] {
  const char* v = std::getenv("LLMLAB_NATIVE_INT8");
  return v && v[0] == '0' ? 0 : 1;
}();

// x quantized in the order its weights' kernel reads it. 4 bits: a weight byte holds values j and j + 16 of its
// group, so per block of four groups 64 bytes of values 0-15 (group 0 | 1 | 2 | 3), then 64 of values 16-31: one
// 64-byte load of weights gives the low nibbles for the first and the high ones for the second. 8 bits: as in x.
struct QuantX {
  int64_t groups = 0, padded = 0;  // padded to whole blocks of four groups (the padding is zero)
  std::vector<int8_t> q;           // (B, padded * 32)
  std::vector<float> scale, sum;   // (B, padded): s per group, and s times the group's sum of xq
  std::vector<float> lanes;        // (B, padded * 8): s per lane of the kernel's dot products (see rows_int8)
};

void quantize_rows(const float* x, int64_t ldx, int64_t B, int64_t in, int bits, QuantX& X) {
  X.groups = in / GROUP;
  X.padded = (X.groups + 3) / 4 * 4;
  X.q.assign(B * X.padded * GROUP, 0);
  X.scale.assign(B * X.padded, 0.f);
  X.sum.assign(B * X.padded, 0.f);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t g = 0; g < X.groups; ++g) {
      const __m512 a = _mm512_loadu_ps(x + r * ldx + g * GROUP), b = _mm512_loadu_ps(x + r * ldx + g * GROUP + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
      X.scale[r * X.padded + g] = amax / 127.f;
      X.sum[r * X.padded + g] = amax / 127.f * float(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
      int8_t* out = X.q.data() + r * X.padded * GROUP;
      int8_t *lo = out + g * GROUP, *hi = lo + 16;
      if (bits == 4) lo = out + g / 4 * 128 + g % 4 * 16, hi = lo + 64;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtsepi32_epi8(qb));
    }
  // lane l of a dot product holds group l / 4 of a block of four (4 bits), l / 8 of a pair (8 bits)
  const int64_t per_block = bits == 4 ? 4 : 2;
  X.lanes.assign(B * X.padded * 8, 0.f);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t g = 0; g < X.groups; ++g)
      for (int64_t l = 0; l < 16 / per_block; ++l)
        X.lanes[r * X.padded * 8 + g / per_block * 16 + g % per_block * (16 / per_block) + l] = X.scale[r * X.padded + g];
}

// Each row of x is computed alone in the same order whatever NB is: a row's result never depends on its batch.
template <int BITS, int NB>
void rows_int8(const QMat& W, int64_t o0, int64_t o1, const QuantX& X, int64_t r0, float* y, int64_t ldy) {
  const int64_t groups = X.groups, padded = X.padded, rb = row_bytes(W);
  const __m512i low4 = _mm512_set1_epi8(15);
  // lane l of a dot product holds group l / 4 of a 4-bit block, group l / 8 of an 8-bit pair
  const __m512i by4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i by8 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const int64_t ahead = std::max<int64_t>(1, 2048 / rb);  // rows to prefetch ahead: ~2 KB of weights
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* q = W.q + o * rb;
    const uint16_t* d = W.d + o * groups;
    const uint16_t* m = W.m + o * groups;
    // the weights stream from memory once per step: asking early kept 8-19% more bandwidth here (4-bit rows)
    for (int64_t i = 0; i < rb; i += 64) _mm_prefetch(reinterpret_cast<const char*>(q + ahead * rb + i), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(d + ahead * groups), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m + ahead * groups), _MM_HINT_T0);
    __m512 acc[NB];
    for (int r = 0; r < NB; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {  // the m terms: m times s times the group's sum of xq
      const __mmask16 k = groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (groups - g)) - 1);
      const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m + g));
      for (int r = 0; r < NB; ++r)
        acc[r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, &X.sum[(r0 + r) * padded + g]), acc[r]);
    }
    // per block: d per lane once (shared by the rows), then per row two dot products, s per lane and d
    const int64_t step = BITS == 4 ? 4 : 2;
    for (int64_t g = 0; g < groups; g += step) {
      const int64_t bytes = std::min(step, groups - g) * (BITS == 4 ? 16 : 32);  // a short last block: masked
      const __mmask64 k = bytes == 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1;
      const __m512i v = _mm512_maskz_loadu_epi8(k, q + g * BITS * 4);
      const __m512i lo = BITS == 4 ? _mm512_and_si512(v, low4) : v;
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      const __mmask8 kd = __mmask8((1u << std::min(step, groups - g)) - 1);
      const __m512 d4 = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_maskz_loadu_epi16(kd, d + g)));
      const __m512 dv = _mm512_permutexvar_ps(BITS == 4 ? by4 : by8, d4);
      for (int r = 0; r < NB; ++r) {
        const int8_t* xq = X.q.data() + (r0 + r) * padded * GROUP + g * GROUP;
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
        if (BITS == 4) dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(xq + 64));
        const __m512 sx = _mm512_loadu_ps(&X.lanes[(r0 + r) * padded * 8 + g / step * 16]);
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), sx), dv, acc[r]);
      }
    }
    for (int r = 0; r < NB; ++r) y[r * ldy + o] = _mm512_reduce_add_ps(acc[r]);
  }
}

template <int BITS>
void rows_int8_any(const QMat& W, int64_t o0, int64_t o1, const QuantX& X, int64_t B, float* y, int64_t ldy) {
  for (int64_t b = 0; b < B; b += 8) {  // up to eight rows (a verify of 4-7 drafts) share each load of the weights
    switch (std::min<int64_t>(8, B - b)) {
      case 1: rows_int8<BITS, 1>(W, o0, o1, X, b, y + b * ldy, ldy); break;
      case 2: rows_int8<BITS, 2>(W, o0, o1, X, b, y + b * ldy, ldy); break;
      case 3: rows_int8<BITS, 3>(W, o0, o1, X, b, y + b * ldy, ldy); break;
      case 4: rows_int8<BITS, 4>(W, o0, o1, X, b, y + b * ldy, ldy); break;
      case 5: rows_int8<BITS, 5>(W, o0, o1, X, b, y + b * ldy, ldy); break;
      case 6: rows_int8<BITS, 6>(W, o0, o1, X, b, y + b * ldy, ldy); break;
      case 7: rows_int8<BITS, 7>(W, o0, o1, X, b, y + b * ldy, ldy); break;
      default: rows_int8<BITS, 8>(W, o0, o1, X, b, y + b * ldy, ldy); break;
    }
  }
}
#endif

struct Job {
  const QMat* W;
  float* y;  // (B, ldy): this matrix's outputs start at column 0
  int64_t ldy;
};

// Several projections of the same input x (B, ldx) in one parallel pass over all their output rows.
void matmul_many(std::initializer_list<Job> job_list, const float* x, int64_t ldx, int64_t B, bool allow_int8 = true) {
  const std::vector<Job> jobs(job_list);
  const int64_t in = jobs[0].W->in, groups = in / GROUP;
#if defined(LLMLAB_VNNI)
  const bool int8 = int8_activations && allow_int8;
  QuantX xq[2];  // x for 4- and for 8-bit weights
  for (const Job& j : jobs)
    if (int8 && xq[j.W->bits == 8].q.empty()) quantize_rows(x, ldx, B, in, int(j.W->bits), xq[j.W->bits == 8]);
#endif
  bool fp32 = true;  // some projection takes the fp32 kernels
#if defined(LLMLAB_VNNI)
  fp32 = !int8;
#endif
  std::vector<float> xs(fp32 ? B * groups : 0);  // group sums of each row of x, for rows_factored's m terms
  for (int64_t r = 0; r < (fp32 ? B : 0); ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.f;
      for (int64_t j = 0; j < GROUP; ++j) sum += x[r * ldx + g * GROUP + j];
      xs[r * groups + g] = sum;
    }
  int64_t total = 0;
  for (const Job& j : jobs) total += j.W->out;
  constexpr int64_t CHUNK = 16;
  const int64_t chunks = (total + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * CHUNK, end = std::min(total, begin + CHUNK);
    int64_t base = 0;
    for (const Job& j : jobs) {
      const int64_t o0 = std::max(begin - base, int64_t(0)), o1 = std::min(end - base, j.W->out);
      if (o0 < o1) {
#if defined(LLMLAB_VNNI)
        if (int8 && j.W->bits == 4) rows_int8_any<4>(*j.W, o0, o1, xq[0], B, j.y, j.ldy);
        else if (int8) rows_int8_any<8>(*j.W, o0, o1, xq[1], B, j.y, j.ldy);
        else
#endif
        if (j.W->bits == 4) rows_any<4>(*j.W, o0, o1, x, ldx, xs.data(), B, j.y, j.ldy);
        else rows_any<8>(*j.W, o0, o1, x, ldx, xs.data(), B, j.y, j.ldy);
      }
      base += j.W->out;
    }
  }
  for (const Job& j : jobs) {
    if (!j.W->bias) continue;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t o = 0; o < j.W->out; ++o) j.y[b * j.ldy + o] += j.W->bias[o];
  }
}

// a . b: vectorised by hand (a compiler keeps a float sum in order, so it will not vectorise this loop itself)
inline float dotf(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(LLMLAB_FACTORED)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void rmsnorm(const float* x, const float* weight, float* out, int64_t n, double eps) {
  const float ss = dotf(x, x, n);
  const float scale = 1.0f / std::sqrt(ss / float(n) + float(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * scale);
}

// Half-split RoPE (HF Llama's pairing): dims i and i + hd/2 rotate together by the angle pos * inv_freq[i].
void rope(float* v, int64_t heads, int64_t hd, const float* cosv, const float* sinv) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* x = v + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cosv[i] - b * sinv[i];
      x[i + half] = b * cosv[i] + a * sinv[i];
    }
  }
}

void embed_rows(const ModelDesc& M, const int64_t* tokens, int64_t B, float* x) {
  const int64_t dim = M.dim;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = tokens[b];
    if (M.embed) {
      std::memcpy(x + b * dim, M.embed + t * dim, dim * sizeof(float));
      continue;
    }
    const QMat& E = *M.embed_q;
    const uint8_t* q = E.q + t * row_bytes(E);
    const uint16_t* d = E.d + t * (dim / GROUP);
    const uint16_t* m = E.m + t * (dim / GROUP);
    for (int64_t i = 0; i < dim; ++i) {
      const int64_t g = i / GROUP, j = i % GROUP;
      const int u = E.bits == 8 ? q[i] : j < 16 ? (q[g * 16 + j] & 15) : (q[g * 16 + j - 16] >> 4);
      x[b * dim + i] = half_to_float(d[g]) * u + half_to_float(m[g]);
    }
  }
}

// Attention splits each row's positions into parts of PART (see attend)
constexpr int64_t PART = 64;

#if defined(LLMLAB_FACTORED)
// e^x for each lane (Cephes' expf: a degree-6 polynomial on x - n ln2, then * 2^n), within ~2 ulp of std::exp
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365478515625f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// Lane j = the sum of v[j]'s 16 lanes: 45 shuffles and adds for 16 sums, where 16 reductions take ~130
inline __m512 sum_lanes16(__m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3) of v[2i], v[2i+1]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of v[4i .. 4i+3]
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes (0+1, 2+3) of u[2i], then of u[2i+1]
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// The G query heads of one kv group over the cached positions [s0, s1), head_dim = 16 C: per head the running
// maximum, the softmax's unnormalised total and values (flash-style, so a row's positions split into parts that
// the threads share). Per 16 positions, each head's 16 scores take one sum_lanes16 instead of 16 reductions and
// one vector exp; the heads read the group's keys and values from L1 after the first (GQA: SmolLM2's three heads
// of a group used to stream them from L2 three times). fp32 throughout: only the order of the sums differs.
template <int C>
void attend_group_avx512(const float* q, int64_t G, const float* Kh, int64_t kstep, const float* Vh, int64_t vstep,
                         int64_t s0, int64_t s1, float scale, float* top, float* total, float* y) {
  alignas(64) float scores[PART];
  const int64_t n = s1 - s0;
  for (int64_t h = 0; h < G; ++h) {
    __m512 qv[C], most = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < C; ++i) qv[i] = _mm512_mul_ps(_mm512_loadu_ps(q + h * 16 * C + 16 * i), _mm512_set1_ps(scale));
    for (int64_t b0 = 0; b0 < n; b0 += 16) {
      const int64_t cnt = std::min<int64_t>(16, n - b0);
      __m512 part[16];
      for (int64_t j = 0; j < 16; ++j) {
        const float* k = Kh + (s0 + b0 + std::min(j, cnt - 1)) * kstep;  // past the end: a repeat, masked out below
        __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
        for (int i = 1; i < C; ++i) acc = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(k + 16 * i), acc);
        part[j] = acc;
      }
      const __m512 sv = sum_lanes16(part);
      _mm512_store_ps(scores + b0, sv);
      most = _mm512_mask_max_ps(most, cnt == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1), most, sv);
    }
    const float mx = _mm512_reduce_max_ps(most);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < n; b0 += 16) {
      const __mmask16 live = n - b0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - b0)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_load_ps(scores + b0), _mm512_set1_ps(mx))));
      _mm512_store_ps(scores + b0, e);
      sum = _mm512_add_ps(sum, e);
    }
    top[h] = mx, total[h] = _mm512_reduce_add_ps(sum);
    __m512 acc[2][C];
    for (int i = 0; i < C; ++i) acc[0][i] = acc[1][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {  // two chains per 16 values: half the FMA latency
      const __m512 pj = _mm512_set1_ps(scores[j]);
      const float* v = Vh + (s0 + j) * vstep;
      for (int i = 0; i < C; ++i) acc[j & 1][i] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + 16 * i), acc[j & 1][i]);
    }
    for (int i = 0; i < C; ++i) _mm512_storeu_ps(y + h * 16 * C + 16 * i, _mm512_add_ps(acc[0][i], acc[1][i]));
  }
}
#endif

// The same in plain loops (other CPUs, other head sizes).
void attend_group_plain(const float* q, int64_t G, const float* Kh, int64_t kstep, const float* Vh, int64_t vstep,
                        int64_t s0, int64_t s1, int64_t hd, float scale, float* top, float* total, float* y) {
  for (int64_t h = 0; h < G; ++h) {
    float mx = -INFINITY, sum = 0.f;
    float* yh = y + h * hd;
    std::fill(yh, yh + hd, 0.f);
    for (int64_t s = s0; s < s1; ++s) {
      const float score = dotf(q + h * hd, Kh + s * kstep, hd) * scale;
      if (score > mx) {  // a new maximum: rescale what is summed so far
        const float r = std::exp(mx - score);
        sum *= r;
        for (int64_t i = 0; i < hd; ++i) yh[i] *= r;
        mx = score;
      }
      const float e = std::exp(score - mx);
      sum += e;
      for (int64_t i = 0; i < hd; ++i) yh[i] += e * Vh[s * vstep + i];
    }
    top[h] = mx, total[h] = sum;
  }
}

void attend_group(const float* q, int64_t G, const float* Kh, int64_t kstep, const float* Vh, int64_t vstep,
                  int64_t s0, int64_t s1, int64_t hd, float scale, float* top, float* total, float* y) {
#if defined(LLMLAB_FACTORED)
  switch (hd) {
    case 16: return attend_group_avx512<1>(q, G, Kh, kstep, Vh, vstep, s0, s1, scale, top, total, y);
    case 32: return attend_group_avx512<2>(q, G, Kh, kstep, Vh, vstep, s0, s1, scale, top, total, y);
    case 64: return attend_group_avx512<4>(q, G, Kh, kstep, Vh, vstep, s0, s1, scale, top, total, y);
    case 128: return attend_group_avx512<8>(q, G, Kh, kstep, Vh, vstep, s0, s1, scale, top, total, y);
  }
#endif
  attend_group_plain(q, G, Kh, kstep, Vh, vstep, s0, s1, hd, scale, top, total, y);
}

// Each row's queries (B, n_heads*hd) attend over the slots [0, pos] of its cache row -> out (B, n_heads*hd).
// Row b reads cache row cache_row[b] (null: row b), so rows of one sequence at pos, pos + 1, ... attend causally.
// Tasks are (row, kv group, part of PART positions), combined per head after: parts keep two threads busy at
// batch 1 (three kv groups), and depend on the position alone, so a row's result never depends on its batch.
void attend(const ModelDesc& M, const float* q, const float* K, const float* V, const int64_t* ks,
            const int64_t* vs, const int64_t* pos, const int64_t* cache_row, int64_t B, float* out) {
  const int64_t hd = M.head_dim, H = M.n_heads, KV = M.n_kv_heads, G = H / KV;
  const float scale = 1.0f / std::sqrt(float(hd));
  std::vector<int64_t> first(B + 1, 0);  // row b's tasks are [first[b], first[b + 1]) (KV groups x parts)
  int64_t most = 1;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t parts = (pos[b] + PART) / PART;
    first[b + 1] = first[b] + KV * parts;
    most = std::max(most, parts);
  }
  const int64_t tasks = first[B];
  std::vector<float> top(tasks * G), total(tasks * G), part_y(tasks * G * hd);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
      const int64_t parts = (first[b + 1] - first[b]) / KV, g = (t - first[b]) / parts, part = (t - first[b]) % parts;
      const int64_t row = cache_row ? cache_row[b] : b, s0 = part * PART, s1 = std::min(pos[b] + 1, s0 + PART);
      attend_group(q + b * H * hd + g * G * hd, G, K + row * ks[0] + g * ks[1], ks[2], V + row * vs[0] + g * vs[1],
                   vs[2], s0, s1, hd, scale, &top[t * G], &total[t * G], &part_y[t * G * hd]);
    }
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {  // softmax over the parts: rescale each to the largest maximum
      const int64_t b = bh / H, h = bh % H, g = h / G, parts = (first[b + 1] - first[b]) / KV;
      const int64_t t0 = first[b] + g * parts;
      float mx = -INFINITY, sum = 0.f;
      for (int64_t p = 0; p < parts; ++p) mx = std::max(mx, top[(t0 + p) * G + h % G]);
      float* y = out + b * H * hd + h * hd;
      std::fill(y, y + hd, 0.f);
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t at = (t0 + p) * G + h % G;
        const float r = std::exp(top[at] - mx);
        sum += total[at] * r;
        for (int64_t i = 0; i < hd; ++i) y[i] += r * part_y[at * hd + i];
      }
      for (int64_t i = 0; i < hd; ++i) y[i] /= sum;
    }
  }
}

// g = silu(g) * u, the SwiGLU: a vector exp where there is one (1536 scalar exps a layer were ~2% of a step)
void silu_mul(float* g, const float* u, int64_t n) {
  int64_t i = 0;
#if defined(LLMLAB_FACTORED)
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
    _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)), _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace

extern "C" {

int llmlab_simd() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  return 512;
#else
  return 0;
#endif
}

// Whether projections take int8 activations (AVX512-VNNI builds): on = 1 / off = 0 / -1 leaves it; returns the state.
int llmlab_int8(int on) {
#if defined(LLMLAB_VNNI)
  if (on >= 0) int8_activations = on;
  return int8_activations;
#else
  return 0 * on;
#endif
}

// y (N, out) = x (N, in) @ W.T (+ bias): the same kernel, for one projection outside the whole step.
// Always with fp32 activations: these are PyTorch's forwards (prefill, scoring), where more than a few rows take the
// dequantized weight and PyTorch's matmul, so a prompt's logits must not depend on how many tokens one call holds.
void llmlab_qmatmul(const QMat* W, const float* x, int64_t N, float* y) {
  matmul_many({{W, y, W->out}}, x, W->in, N, false);
}

// The same with the decode step's activations (int8 where llmlab_int8 says so): to test its kernels on one matrix.
void llmlab_qmatmul_step(const QMat* W, const float* x, int64_t N, float* y) { matmul_many({{W, y, W->out}}, x, W->in, N); }

// The dense fp32 weight (out, in), e.g. for a prefill matmul of many rows.
void llmlab_dequantize(const QMat* W, float* out) {
  const int64_t groups = W->in / GROUP, rb = row_bytes(*W), gb = GROUP * W->bits / 8;
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < W->out; ++o)
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* q = W->q + o * rb + g * gb;
      const float d = half_to_float(W->d[o * groups + g]), m = half_to_float(W->m[o * groups + g]);
      float* y = out + o * W->in + g * GROUP;
      for (int j = 0; j < 16; ++j) {
        y[j] = d * (W->bits == 4 ? (q[j] & 15) : q[j]) + m;
        y[j + 16] = d * (W->bits == 4 ? (q[j] >> 4) : q[j + 16]) + m;
      }
    }
}

// One decode step: tokens (B,) at positions pos (B,); k_cache/v_cache: per layer a pointer to the fp32 cache
// (batch, kv_heads, slots, head_dim) with element strides ks/vs (batch, head, slot; head_dim is contiguous).
// Writes each row's key and value at its position, and the next-token logits (B, vocab).
// Row b uses cache row cache_row[b] (null: row b). Every row's key and value are written before any row attends,
// so k + 1 rows of ONE sequence at positions p..p+k sharing a cache row are a causal forward of k + 1 tokens
// (a speculative verify in one call).
void llmlab_step(const ModelDesc* Mp, const int64_t* tokens, const int64_t* pos, const int64_t* cache_row, int64_t B,
                 float* const* k_cache, float* const* v_cache, const int64_t* ks, const int64_t* vs, float* logits) {
  const ModelDesc& M = *Mp;
  const int64_t dim = M.dim, hd = M.head_dim, half = hd / 2, hidden = M.hidden;
  const int64_t qd = M.n_heads * hd, kvd = M.n_kv_heads * hd;
  std::vector<float> x(B * dim), h(B * dim), q(B * qd), k(B * kvd), v(B * kvd), att(B * qd), tmp(B * dim);
  std::vector<float> gate(B * hidden), up(B * hidden), cosv(B * half), sinv(B * half);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(pos[b]) * M.inv_freq[i];  // fp32, as the PyTorch path (input_pos.float() * inv_freq)
      cosv[b * half + i] = std::cos(angle);
      sinv[b * half + i] = std::sin(angle);
    }
  embed_rows(M, tokens, B, x.data());

  for (int64_t l = 0; l < M.n_layers; ++l) {
    for (int64_t b = 0; b < B; ++b) rmsnorm(&x[b * dim], M.norm_in[l], &h[b * dim], dim, M.eps);
    matmul_many({{&M.wq[l], q.data(), qd}, {&M.wk[l], k.data(), kvd}, {&M.wv[l], v.data(), kvd}}, h.data(), dim, B);
    float* K = k_cache[l];
    float* V = v_cache[l];
    for (int64_t b = 0; b < B; ++b) {
      rope(&q[b * qd], M.n_heads, hd, &cosv[b * half], &sinv[b * half]);
      rope(&k[b * kvd], M.n_kv_heads, hd, &cosv[b * half], &sinv[b * half]);
      const int64_t row = cache_row ? cache_row[b] : b;
      for (int64_t g = 0; g < M.n_kv_heads; ++g) {
        std::memcpy(K + row * ks[0] + g * ks[1] + pos[b] * ks[2], &k[b * kvd + g * hd], hd * sizeof(float));
        std::memcpy(V + row * vs[0] + g * vs[1] + pos[b] * vs[2], &v[b * kvd + g * hd], hd * sizeof(float));
      }
    }
    attend(M, q.data(), K, V, ks, vs, pos, cache_row, B, att.data());
    matmul_many({{&M.wo[l], tmp.data(), dim}}, att.data(), qd, B);
    for (int64_t i = 0; i < B * dim; ++i) x[i] += tmp[i];
    for (int64_t b = 0; b < B; ++b) rmsnorm(&x[b * dim], M.norm_post[l], &h[b * dim], dim, M.eps);
    matmul_many({{&M.wgate[l], gate.data(), hidden}, {&M.wup[l], up.data(), hidden}}, h.data(), dim, B);
    silu_mul(gate.data(), up.data(), B * hidden);
    matmul_many({{&M.wdown[l], tmp.data(), dim}}, gate.data(), hidden, B);
    for (int64_t i = 0; i < B * dim; ++i) x[i] += tmp[i];
  }
  for (int64_t b = 0; b < B; ++b) rmsnorm(&x[b * dim], M.norm_final, &h[b * dim], dim, M.eps);
  matmul_many({{M.head, logits, M.vocab}}, h.data(), dim, B);
}

}  // extern "C"
