// The native decode step: one token per row through a whole Llama-type model on grouped 4-/8-bit weights.
//
// Built on first use by llmlab/engine/native/__init__.py (g++ -O3 -march=native -fopenmp, one build per CPU
// kind) and called through ctypes: a plain C interface over raw pointers, so it builds in seconds without the
// PyTorch headers. Its OpenMP threads are PyTorch's own (the same libgomp.so.1 is already loaded).
//
// At batch 1 on a 135M model, a PyTorch step spends most of its time between kernels (30 layers of small
// GEMVs, Python, dispatch); here the whole step is C++, and each projection is one parallel pass over its
// weights that dequantizes a group of 32 once and multiplies it into every row of the batch.
//
// Weights: w[o, i] = d[o, g] * q[o, i] + m[o, g] for the group g = i / 32 (GGUF's Q4_1 form, fp16 d and m).
// 4 bits: two per byte, byte j of a group holding q[j] (low nibble) and q[j + 16] (high nibble), as in GGUF;
// 8 bits: one byte per weight. The KV cache is the engine's own (llmlab.model.transformer.KVCache): per layer a
// (batch, kv_heads, slots, head_dim) fp32 tensor, possibly a view (the batcher's), so its strides are given.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

struct Job {
  const QMat* W;
  float* y;  // (B, ldy): this matrix's outputs start at column 0
  int64_t ldy;
};

// Several projections of the same input x (B, ldx) in one parallel pass over all their output rows.
void matmul_many(std::initializer_list<Job> job_list, const float* x, int64_t ldx, int64_t B) {
  const std::vector<Job> jobs(job_list);
  const int64_t in = jobs[0].W->in, groups = in / GROUP;
  std::vector<float> xs(B * groups);  // group sums of each row of x, for rows_factored's m terms
  for (int64_t r = 0; r < B; ++r)
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

// Each row's queries (B, n_heads*hd) attend over its cache slots [0, pos] -> out (B, n_heads*hd).
void attend(const ModelDesc& M, const float* q, const float* K, const float* V, const int64_t* ks,
            const int64_t* vs, const int64_t* pos, int64_t B, float* out) {
  const int64_t hd = M.head_dim, H = M.n_heads, group = M.n_heads / M.n_kv_heads;
  const float scale = 1.0f / std::sqrt(float(hd));
#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * H; ++task) {
      const int64_t b = task / H, h = task % H, g = h / group, n = pos[b] + 1;
      const float* qh = q + b * H * hd + h * hd;
      const float* Kh = K + b * ks[0] + g * ks[1];
      const float* Vh = V + b * vs[0] + g * vs[1];
      scores.resize(n);
      float top = -INFINITY;
      for (int64_t s = 0; s < n; ++s) {
        scores[s] = dotf(qh, Kh + s * ks[2], hd) * scale;
        top = std::max(top, scores[s]);
      }
      float total = 0.f;
      for (int64_t s = 0; s < n; ++s) total += (scores[s] = std::exp(scores[s] - top));
      float* y = out + b * H * hd + h * hd;
      std::fill(y, y + hd, 0.f);
      for (int64_t s = 0; s < n; ++s) {
        const float p = scores[s] / total;
        const float* v = Vh + s * vs[2];
        for (int64_t i = 0; i < hd; ++i) y[i] += p * v[i];
      }
    }
  }
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

// y (N, out) = x (N, in) @ W.T (+ bias): the same kernel, for one projection outside the whole step.
void llmlab_qmatmul(const QMat* W, const float* x, int64_t N, float* y) { matmul_many({{W, y, W->out}}, x, W->in, N); }

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
void llmlab_step(const ModelDesc* Mp, const int64_t* tokens, const int64_t* pos, int64_t B, float* const* k_cache,
                 float* const* v_cache, const int64_t* ks, const int64_t* vs, float* logits) {
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
      for (int64_t g = 0; g < M.n_kv_heads; ++g) {
        std::memcpy(K + b * ks[0] + g * ks[1] + pos[b] * ks[2], &k[b * kvd + g * hd], hd * sizeof(float));
        std::memcpy(V + b * vs[0] + g * vs[1] + pos[b] * vs[2], &v[b * kvd + g * hd], hd * sizeof(float));
      }
    }
    attend(M, q.data(), K, V, ks, vs, pos, B, att.data());
    matmul_many({{&M.wo[l], tmp.data(), dim}}, att.data(), qd, B);
    for (int64_t i = 0; i < B * dim; ++i) x[i] += tmp[i];
    for (int64_t b = 0; b < B; ++b) rmsnorm(&x[b * dim], M.norm_post[l], &h[b * dim], dim, M.eps);
    matmul_many({{&M.wgate[l], gate.data(), hidden}, {&M.wup[l], up.data(), hidden}}, h.data(), dim, B);
    for (int64_t i = 0; i < B * hidden; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    matmul_many({{&M.wdown[l], tmp.data(), dim}}, gate.data(), hidden, B);
    for (int64_t i = 0; i < B * dim; ++i) x[i] += tmp[i];
  }
  for (int64_t b = 0; b < B; ++b) rmsnorm(&x[b * dim], M.norm_final, &h[b * dim], dim, M.eps);
  matmul_many({{M.head, logits, M.vocab}}, h.data(), dim, B);
}

}  // extern "C"
