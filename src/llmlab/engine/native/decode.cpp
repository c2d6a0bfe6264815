// The native decode step: one token per row through a whole Llama-type model on grouped 4-/8-bit weights.
//
// Built on first use by llmlab/engine/native/__init__.py (g++ -O3 -march=native -fopenmp, one build per CPU
// kind) and called through ctypes: a plain C interface over raw pointers, so it builds in seconds without the
// PyTorch headers. Its OpenMP threads are PyTorch's own (the same libgomp.so.1 is already loaded).
//
// At batch 1 on a 135M model, a PyTorch step spends most of its time between kernels (30 layers of small
// GEMVs, Python, dispatch); here the whole step is C++, and each projection is one parallel pass over its
// weights, tiles of 16 output rows (see "the tiled weight layout") that each serve every row of the batch. Where the
// CPU has AVX512-VNNI, decode rows are rounded to int8 per group and meet the weights in integer dot products (as
// llama.cpp's Q8 x Q4 kernels do): at batch 1 the step is bound by streaming the weights, and these keep up with it.
// Many rows of one sequence in one call are a prompt's chunk (prefill: its last 64 tokens with bf16 activations where
// the CPU has AVX512-BF16, else fp32; the chunks before them with the decode rows' int8 ones) or a speculative verify.
// Decode and verify rows attend row by row over the cache (fp16 as llama.cpp's, or fp32) in blocks of 16 positions
// (one shuffle tree for their 16 scores, a vector exp), split into parts of 64 positions that the threads share and
// whose softmaxes are combined after; a prompt's chunk attends as small matrix products (attend_prompt).
//
// Weights: w[o, i] = d[o, g] * q[o, i] + m[o, g] for the group g = i / 32 (GGUF's Q4_1 form, fp16 d and m).
// 4 bits: two per byte, byte j of a group holding q[j] (low nibble) and q[j + 16] (high nibble), as in GGUF;
// 8 bits: one byte per weight; both laid out in tiles of 16 rows. The KV cache is the engine's own (llmlab.model.transformer.KVCache): per layer a
// (batch, kv_heads, slots, head_dim) fp16 or fp32 tensor, possibly a view (the batcher's), so its strides are given.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
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

// A kernel switch's start: on unless the environment variable says 0.
inline int on_unless_zero(const char* name) {
  const char* v = std::getenv(name);
  return v && v[0] == '0' ? 0 : 1;
}

// The KV cache holds fp32 or fp16 (an fp16 cache halves what attention reads per step, as llama.cpp's default does;
// F16C converts): a cached value as fp32, and a key or value row stored.
inline float cached(float v) { return v; }
inline float cached(uint16_t h) { return half_to_float(h); }
inline void store_row(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_row(uint16_t* dst, const float* src, int64_t n) {
#if defined(__F16C__)
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
#else
  (void)dst, (void)src, (void)n;  // llmlab_half_kv() says 0: no fp16 cache reaches here
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
  const float* inv_freq;  // (head_dim / 2,), a RoPE scaling's (linear, NTK, YaRN, Llama 3) included
  float rope_scale;       // YaRN's attention factor on cos and sin (1 for other kinds)
  const QMat* wq;  // each an array of n_layers matrices
  const QMat* wk;
  const QMat* wv;
  const QMat* wo;
  const QMat* wgate;
  const QMat* wup;
  const QMat* wdown;
  const QMat* head;
  int64_t group, window;  // Self-Extend (llmlab.model.self_extend): keys window or more positions back are seen at
                          // grouped positions (position / group) against a shifted query; group 0: off
};

}  // extern "C"

namespace {

// ---- the tiled weight layout -----------------------------------------------------------------------------------
//
// The output rows are stored in tiles of 16 (the last one padded with zero rows), so that lane l of a 512-bit
// vector is output row l of the tile: a tile's results come out as one vector, with no sums across lanes. Per tile
// and group g of 32 inputs: S steps of 64 bytes (S = 4 for 4 bits, 8 for 8 bits), step i holding in lane l the
// four bytes 4i..4i+3 of row l's group (GGUF's bytes: for 4 bits byte j holds q[j] in its low nibble and q[j + 16]
// in its high one); then d and m as 16 fp16 per group, lane l for row l. Python's Packed makes this from GGUF's
// order and gives it back (llmlab/engine/native/__init__.py); the bytes and scales themselves are unchanged.
constexpr int64_t TILE = 16;

inline int64_t steps(const QMat& W) { return W.bits == 4 ? 4 : 8; }
inline int64_t tiles(const QMat& W) { return (W.out + TILE - 1) / TILE; }

// q, d and m of weight (o, i) in the tiled layout (the plain loops and the row reads use these)
inline int qvalue(const QMat& W, int64_t o, int64_t i) {
  const int64_t groups = W.in / GROUP, t = o / TILE, l = o % TILE, g = i / GROUP, j = i % GROUP;
  const int64_t byte = W.bits == 4 ? j % 16 : j;
  const uint8_t b = W.q[((t * groups + g) * steps(W) + byte / 4) * 64 + l * 4 + byte % 4];
  return W.bits == 4 ? (j < 16 ? b & 15 : b >> 4) : b;
}
inline float dvalue(const QMat& W, int64_t o, int64_t g) { return half_to_float(W.d[((o / TILE) * (W.in / GROUP) + g) * TILE + o % TILE]); }
inline float mvalue(const QMat& W, int64_t o, int64_t g) { return half_to_float(W.m[((o / TILE) * (W.in / GROUP) + g) * TILE + o % TILE]); }

void dequantize_row(const QMat& W, int64_t o, float* out) {
  for (int64_t i = 0; i < W.in; ++i) out[i] = dvalue(W, o, i / GROUP) * qvalue(W, o, i) + mvalue(W, o, i / GROUP);
}

// ---- y[r, 16t + l] = sum_i w[16t + l, i] x[r, i] for NB rows of x and one tile t -------------------------------
//
// Every (output, row) pair takes the same operations in the same order whatever NB is, so a row's result never
// depends on its batch (a verify, a prefill chunk, the batcher's rows): per group the dot product with q, times
// d, then plus m times the group's sum of x, i.e. sum_i (d q_i + m) x_i = d (q . x) + m (sum of x).

// Stores a tile's 16 results of one row, fewer in a padded last tile.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LLMLAB_AVX512 1
inline void store_tile(const QMat& W, int64_t t, __m512 v, float* y) {
  const int64_t live = std::min<int64_t>(TILE, W.out - t * TILE);
  _mm512_mask_storeu_ps(y + t * TILE, live == TILE ? __mmask16(0xFFFF) : __mmask16((1u << live) - 1), v);
}

inline __m512 broadcast(float v) { return _mm512_set1_ps(v); }

// fp32 activations: each byte position of a step, shifted down and masked, is one weight per lane; four chains
// (low/high nibble, even/odd byte) keep the FMAs' latency hidden at one row.
template <int BITS, int NB>
void tile_fp32(const QMat& W, int64_t t, const float* x, int64_t ldx, const float* xs, int64_t lds, float* y,
               int64_t ldy) {
  constexpr int S = BITS == 4 ? 4 : 8;
  const int64_t groups = W.in / GROUP;
  const uint8_t* q = W.q + t * groups * S * 64;
  const uint16_t* d = W.d + t * groups * TILE;
  const uint16_t* m = W.m + t * groups * TILE;
  const __m512i mask = _mm512_set1_epi32(BITS == 4 ? 15 : 255);
  __m512 acc[NB];
  for (int r = 0; r < NB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 chain[NB][4];
    for (int r = 0; r < NB; ++r)
      for (int c = 0; c < 4; ++c) chain[r][c] = _mm512_setzero_ps();
    for (int i = 0; i < S; ++i) {
      const __m512i v = _mm512_loadu_si512(q + (g * S + i) * 64);
      for (int k = 0; k < 4; ++k) {
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * k), mask));
        const __m512 hi = BITS == 4 ? _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * k + 4), mask)) : lo;
        for (int r = 0; r < NB; ++r) {
          const float* xr = x + r * ldx + g * GROUP + 4 * i + k;
          chain[r][k & 1] = _mm512_fmadd_ps(lo, broadcast(xr[0]), chain[r][k & 1]);
          if (BITS == 4) chain[r][2 + (k & 1)] = _mm512_fmadd_ps(hi, broadcast(xr[16]), chain[r][2 + (k & 1)]);
        }
      }
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + g * TILE)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + g * TILE)));
    for (int r = 0; r < NB; ++r) {
      const __m512 dot = _mm512_add_ps(_mm512_add_ps(chain[r][0], chain[r][1]), _mm512_add_ps(chain[r][2], chain[r][3]));
      acc[r] = _mm512_fmadd_ps(mv, broadcast(xs[r * lds + g]), _mm512_fmadd_ps(dot, dv, acc[r]));
    }
  }
  for (int r = 0; r < NB; ++r) store_tile(W, t, acc[r], y + r * ldy);
}
#else
template <int BITS, int NB>
void tile_fp32(const QMat& W, int64_t t, const float* x, int64_t ldx, const float* xs, int64_t lds, float* y,
               int64_t ldy) {
  const int64_t groups = W.in / GROUP;
  for (int64_t o = t * TILE; o < std::min(W.out, (t + 1) * TILE); ++o)
    for (int r = 0; r < NB; ++r) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float dot = 0.f;
        for (int64_t j = 0; j < GROUP; ++j) dot += qvalue(W, o, g * GROUP + j) * x[r * ldx + g * GROUP + j];
        acc += dot * dvalue(W, o, g) + mvalue(W, o, g) * xs[r * lds + g];
      }
      y[r * ldy + o] = acc;
    }
}
#endif

// ---- int8 activations x 4-/8-bit weights (AVX512-VNNI), llama.cpp's Q8 x Q4 dot product ----------------------
//
// Each row of x is rounded once per matmul to 8 bits per group of 32 (x_i ~ s xq_i, s = max |x| / 127), so that per
// group sum_i (d q_i + m) x_i ~ d s (q . xq) + m s (sum of xq): the integer dot q . xq is _mm512_dpbusd_epi32 (16
// lanes of four u8 x s8 products, exact in int32), one 64-byte step of the tile against four bytes of xq broadcast.
// The m term takes the rounded sum too, not x's exact one: so the rounding errors e_i meet the centred weights
// d q_i + m, not d q_i alone (whose mean, ~7.5 d for 4 bits and ~128 d for Q8_0, would turn them into a bias:
// SmolLM2's top-1 agreed with the exact model's at 91% of 1200 positions that way, at 96.8% this way; llama.cpp's at
// 96.5%). The activations' rounding (at most s/2 per value) is the only approximation; llmlab_int8(0) switches back
// to the fp32 kernels.
#if defined(LLMLAB_AVX512) && defined(__AVX512VNNI__)
#define LLMLAB_VNNI 1
// $LLMLAB_NATIVE_INT8=0 starts with the fp32 kernels (e.g. to compare both paths); llmlab_int8() switches later
int int8_activations = on_unless_zero("LLMLAB_NATIVE_INT8");

// x rounded to int8 per group of 32, stored group-major: group g of row r is the 32 bytes at q + (g * B + r) * 8
// (int32 words), so a block of rows reads one group from one pointer at fixed offsets (row-major, each row took
// a register of its own and gcc ran out of them at 8 rows)
struct QuantX {
  int64_t groups = 0, rows = 0;
  std::vector<int32_t> q;         // (groups, B, 8) words of four int8
  std::vector<float> scale, sum;  // (groups, B): s per group, and s times the group's sum of xq
};

void quantize_rows(const float* x, int64_t ldx, int64_t B, int64_t in, QuantX& X) {
  X.groups = in / GROUP;
  X.rows = B;
  X.q.resize(B * in / 4);
  X.scale.resize(B * X.groups);
  X.sum.resize(B * X.groups);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t g = 0; g < X.groups; ++g) {
      const __m512 a = _mm512_loadu_ps(x + r * ldx + g * GROUP), b = _mm512_loadu_ps(x + r * ldx + g * GROUP + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
      X.scale[g * B + r] = amax / 127.f;
      X.sum[g * B + r] = amax / 127.f * float(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
      int32_t* out = X.q.data() + (g * B + r) * 8;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 4), _mm512_cvtsepi32_epi8(qb));
    }
}

template <int BITS, int NB>
void tile_int8(const QMat& W, int64_t t, const QuantX& X, int64_t r0, float* y, int64_t ldy) {
  constexpr int S = BITS == 4 ? 4 : 8;
  const int64_t groups = X.groups, B = X.rows;
  const uint8_t* q = W.q + t * groups * S * 64;
  const uint16_t* d = W.d + t * groups * TILE;
  const uint16_t* m = W.m + t * groups * TILE;
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512 acc[NB];
  for (int r = 0; r < NB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // the weights stream from memory once per step: asking ~2 KB early keeps the loads ahead of the dot products
    for (int i = 0; i < S; ++i) _mm_prefetch(reinterpret_cast<const char*>(q + (g * S + i) * 64 + 2048), _MM_HINT_T0);
    const int32_t* xw = X.q.data() + (g * B + r0) * 8;  // word j of row r0 + r: xw[r * 8 + j]
    __m512i dot[NB];
    for (int r = 0; r < NB; ++r) dot[r] = _mm512_setzero_si512();
    for (int i = 0; i < S; ++i) {
      const __m512i v = _mm512_loadu_si512(q + (g * S + i) * 64);
      if (BITS == 4) {  // step i's low nibbles are inputs 4i..4i+3 (word i), its high ones 16 + 4i.. (word 4 + i)
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int r = 0; r < NB; ++r) {
          dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(xw[r * 8 + i]));
          dot[r] = _mm512_dpbusd_epi32(dot[r], hi, _mm512_set1_epi32(xw[r * 8 + 4 + i]));
        }
      } else {
        for (int r = 0; r < NB; ++r) dot[r] = _mm512_dpbusd_epi32(dot[r], v, _mm512_set1_epi32(xw[r * 8 + i]));
      }
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + g * TILE)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + g * TILE)));
    for (int r = 0; r < NB; ++r) {
      const float s = X.scale[g * B + r0 + r], sum = X.sum[g * B + r0 + r];
      const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(s));
      acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sum), _mm512_fmadd_ps(scaled, dv, acc[r]));
    }
  }
  for (int r = 0; r < NB; ++r) store_tile(W, t, acc[r], y + r * ldy);
}
#endif

// ---- bf16 activations x 4-bit weights (AVX512-BF16): a prompt's chunks -------------------------------------
//
// A prompt's chunk is up to 64 rows against each weight, so the fp32 kernel's cost is its FMAs and the weights'
// unpacking, which it repeats for every block of 4 rows. Here each row of x is rounded once to bf16 (8 significant
// bits, relative to each value: int8 rounding is relative to its group's largest and changed SmolLM2's answers),
// a tile's 4-bit weights are unpacked once per call into bf16 pairs, and _mm512_dpbf16_ps does 32 multiply-adds
// per instruction, twice fp32's. The q values are exact in bf16 as 128 + q (the bits 0x4300 | q, one OR with no
// conversion), so per group sum_i (128 + q_i) xb_i = dot' and sum_i (d q_i + m) xb_i = d dot' + (m - 128 d) (sum
// of xb): the weights stay exact and x's rounding is the only approximation, as with int8. 8-bit weights (a Q8_0
// file, the output head) keep the fp32 kernel. llmlab_bf16(0) switches back to fp32 prompts.
#if defined(LLMLAB_AVX512) && defined(__AVX512BF16__)
#define LLMLAB_BF16 1
// $LLMLAB_NATIVE_BF16=0 starts with fp32 prompts (e.g. to compare both paths); llmlab_bf16() switches later
int bf16_activations = on_unless_zero("LLMLAB_NATIVE_BF16");

struct Bf16X {
  int64_t groups = 0;
  std::vector<uint32_t> pairs;  // (B, in / 2): x rounded to bf16, inputs 2p and 2p + 1 in word p
  std::vector<float> sum;       // (B, groups): the group sums of the rounded x
};

void round_rows_bf16(const float* x, int64_t ldx, int64_t B, int64_t in, Bf16X& X) {
  X.groups = in / GROUP;
  X.pairs.resize(B * in / 2);
  X.sum.resize(B * X.groups);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t g = 0; g < X.groups; ++g) {
      const float* xg = x + r * ldx + g * GROUP;
      const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xg + 16), _mm512_loadu_ps(xg));  // in order
      _mm512_storeu_si512(X.pairs.data() + (r * in + g * GROUP) / 2, b);
      const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));  // the even inputs, back in fp32
      const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(int(0xFFFF0000u))));  // odd
      X.sum[r * X.groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
}

// A 4-bit tile unpacked into out (in / 2 vectors of 64 bytes): vector p of group g holds in lane l the bf16 pair
// (128 + q[2p], 128 + q[2p + 1]) of row l. Step i's lane holds bytes 4i..4i+3 of the row's group, i.e. inputs
// 4i..4i+3 (low nibbles: pairs 2i, 2i + 1) and 16 + 4i.. (high nibbles: pairs 8 + 2i, 9 + 2i); a byte shuffle puts
// bytes (0, 1) or (2, 3) of each lane into its two 16-bit halves, a shift picks the high nibbles, one ternary-logic
// op masks the nibble and sets the bits of 128.
void unpack_tile_bf16(const QMat& W, int64_t t, uint32_t* out) {
  const int64_t groups = W.in / GROUP;
  const uint8_t* q = W.q + t * groups * 4 * 64;
  const __m512i nibble = _mm512_set1_epi32(0x000F000F), bits128 = _mm512_set1_epi32(0x43004300);
  // shuffle controls per 128-bit lane: 32-bit lane k takes bytes 4k + (0, 1) or 4k + (2, 3) into its halves
  __m512i pick01, pick23;
  {
    alignas(64) uint8_t c01[64], c23[64];
    for (int i = 0; i < 64; ++i) {
      const int k = (i % 16) / 4, at = i % 4;
      c01[i] = at % 2 ? 0x80 : uint8_t(4 * k + at / 2);
      c23[i] = at % 2 ? 0x80 : uint8_t(4 * k + 2 + at / 2);
    }
    pick01 = _mm512_loadu_si512(c01), pick23 = _mm512_loadu_si512(c23);
  }
  for (int64_t g = 0; g < groups; ++g)
    for (int i = 0; i < 4; ++i) {
      const __m512i v = _mm512_loadu_si512(q + (g * 4 + i) * 64);
      const __m512i a = _mm512_shuffle_epi8(v, pick01), b = _mm512_shuffle_epi8(v, pick23);
      uint32_t* o = out + g * 16 * 16;  // 16 vectors of 16 lanes per group
      _mm512_storeu_si512(o + 16 * (2 * i), _mm512_ternarylogic_epi32(a, nibble, bits128, 0xEA));  // (a & nibble) | bits128
      _mm512_storeu_si512(o + 16 * (2 * i + 1), _mm512_ternarylogic_epi32(b, nibble, bits128, 0xEA));
      _mm512_storeu_si512(o + 16 * (8 + 2 * i), _mm512_ternarylogic_epi32(_mm512_srli_epi16(a, 4), nibble, bits128, 0xEA));
      _mm512_storeu_si512(o + 16 * (9 + 2 * i), _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 4), nibble, bits128, 0xEA));
    }
}

template <int NB>
void tile_bf16(const QMat& W, int64_t t, const uint32_t* wt, const Bf16X& X, int64_t r0, float* y, int64_t ldy) {
  const int64_t groups = X.groups, half = groups * GROUP / 2;
  const uint16_t* d = W.d + t * groups * TILE;
  const uint16_t* m = W.m + t * groups * TILE;
  __m512 acc[NB];
  for (int r = 0; r < NB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 dot[NB];
    for (int r = 0; r < NB; ++r) dot[r] = _mm512_setzero_ps();
    for (int p = 0; p < 16; ++p) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(wt + (g * 16 + p) * 16);
      for (int r = 0; r < NB; ++r)
        dot[r] = _mm512_dpbf16_ps(dot[r], w, (__m512bh)_mm512_set1_epi32(int(X.pairs[(r0 + r) * half + g * 16 + p])));
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + g * TILE)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + g * TILE)));
    const __m512 m128 = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), dv, mv);  // m - 128 d
    for (int r = 0; r < NB; ++r)
      acc[r] = _mm512_fmadd_ps(m128, _mm512_set1_ps(X.sum[(r0 + r) * groups + g]), _mm512_fmadd_ps(dot[r], dv, acc[r]));
  }
  for (int r = 0; r < NB; ++r) store_tile(W, t, acc[r], y + r * ldy);
}
#endif

// One tile for B rows of x, in blocks of up to `block` rows (its weights stay in L1 between passes): 8 for the int8
// kernel, 4 for the fp32 one (whose four chains per row would not fit the 32 vector registers for 8 rows).
template <typename F>
void row_blocks(int64_t B, int64_t block, F&& kernel) {
  for (int64_t b = 0; b < B; b += block) {
    switch (std::min(block, B - b)) {
      case 1: kernel(b, std::integral_constant<int, 1>()); break;
      case 2: kernel(b, std::integral_constant<int, 2>()); break;
      case 3: kernel(b, std::integral_constant<int, 3>()); break;
      case 4: kernel(b, std::integral_constant<int, 4>()); break;
      case 5: kernel(b, std::integral_constant<int, 5>()); break;
      case 6: kernel(b, std::integral_constant<int, 6>()); break;
      case 7: kernel(b, std::integral_constant<int, 7>()); break;
      default: kernel(b, std::integral_constant<int, 8>()); break;
    }
  }
}

struct Job {
  const QMat* W;
  float* y;  // (B, ldy): this matrix's outputs start at column 0
  int64_t ldy;
};

// What a matmul rounds x to: a decode step's rows go to int8 (where llmlab_int8 is on), a prompt's chunk to bf16 (where
// llmlab_bf16 is on; 4-bit weights), fp32 otherwise. The choice never depends on the number of rows.
enum class Acts { step, prompt, fp32 };

// Several projections of the same input x (B, ldx) in one parallel pass over all their tiles.
void matmul_many(std::initializer_list<Job> job_list, const float* x, int64_t ldx, int64_t B, Acts acts) {
  const std::vector<Job> jobs(job_list);
  const int64_t in = jobs[0].W->in, groups = in / GROUP;
  bool int8 = false, bf16 = false, fp32 = false;  // which roundings of x the jobs need
#if defined(LLMLAB_VNNI)
  int8 = int8_activations && acts == Acts::step;
  QuantX xq;
  if (int8) quantize_rows(x, ldx, B, in, xq);
#endif
#if defined(LLMLAB_BF16)
  Bf16X xb;
  for (const Job& j : jobs) bf16 |= bf16_activations && acts == Acts::prompt && j.W->bits == 4;
  if (bf16) round_rows_bf16(x, ldx, B, in, xb);
#endif
  for (const Job& j : jobs) fp32 |= !int8 && !(bf16 && j.W->bits == 4);
  std::vector<float> xs(fp32 ? B * groups : 0);  // group sums of each row of x, for the fp32 kernels' m terms
  for (int64_t r = 0; r < (fp32 ? B : 0); ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.f;
      for (int64_t j = 0; j < GROUP; ++j) sum += x[r * ldx + g * GROUP + j];
      xs[r * groups + g] = sum;
    }
  std::vector<int64_t> first(jobs.size() + 1, 0);  // job j's tiles are [first[j], first[j + 1])
  for (size_t j = 0; j < jobs.size(); ++j) first[j + 1] = first[j] + tiles(*jobs[j].W);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < first.back(); ++task) {
    const size_t j = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
    const QMat& W = *jobs[j].W;
    const int64_t t = task - first[j], ldy = jobs[j].ldy;
    float* y = jobs[j].y;
#if defined(LLMLAB_BF16)
    if (bf16 && W.bits == 4) {
      thread_local std::vector<uint32_t> unpacked;  // the tile's weights as bf16 pairs, read once per block of rows
      unpacked.resize(in / 2 * TILE);
      unpack_tile_bf16(W, t, unpacked.data());
      row_blocks(B, 8, [&](int64_t b, auto nb) { tile_bf16<decltype(nb)::value>(W, t, unpacked.data(), xb, b, y + b * ldy, ldy); });
      continue;
    }
#endif
    row_blocks(B, int8 ? 8 : 4, [&](int64_t b, auto nb) {
      constexpr int NB = decltype(nb)::value;
#if defined(LLMLAB_VNNI)
      if (int8) {
        if (W.bits == 4) tile_int8<4, NB>(W, t, xq, b, y + b * ldy, ldy);
        else tile_int8<8, NB>(W, t, xq, b, y + b * ldy, ldy);
        return;
      }
#endif
      if (W.bits == 4) tile_fp32<4, NB>(W, t, x + b * ldx, ldx, xs.data() + b * groups, groups, y + b * ldy, ldy);
      else tile_fp32<8, NB>(W, t, x + b * ldx, ldx, xs.data() + b * groups, groups, y + b * ldy, ldy);
    });
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
#if defined(LLMLAB_AVX512)
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
  for (int64_t b = 0; b < B; ++b) {
    if (M.embed) std::memcpy(x + b * M.dim, M.embed + tokens[b] * M.dim, M.dim * sizeof(float));
    else dequantize_row(*M.embed_q, tokens[b], x + b * M.dim);
  }
}

// Attention splits each row's positions into parts of PART (see attend)
constexpr int64_t PART = 64;

#if defined(LLMLAB_AVX512)
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
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

template <int C, typename T>
void attend_group_avx512(const float* q, int64_t G, const T* Kh, int64_t kstep, const T* Vh, int64_t vstep,
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
        const T* k = Kh + (s0 + b0 + std::min(j, cnt - 1)) * kstep;  // past the end: a repeat, masked out below
        __m512 acc = _mm512_mul_ps(qv[0], load16(k));
        for (int i = 1; i < C; ++i) acc = _mm512_fmadd_ps(qv[i], load16(k + 16 * i), acc);
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
    __m512 even[C], odd[C];  // two chains per 16 values, unrolled by hand (acc[j & 1] kept them in memory)
    for (int i = 0; i < C; ++i) even[i] = odd[i] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 1 < n; j += 2) {
      const __m512 p0 = _mm512_set1_ps(scores[j]), p1 = _mm512_set1_ps(scores[j + 1]);
      for (int i = 0; i < C; ++i) {
        even[i] = _mm512_fmadd_ps(p0, load16(Vh + (s0 + j) * vstep + 16 * i), even[i]);
        odd[i] = _mm512_fmadd_ps(p1, load16(Vh + (s0 + j + 1) * vstep + 16 * i), odd[i]);
      }
    }
    if (j < n)
      for (int i = 0; i < C; ++i) even[i] = _mm512_fmadd_ps(_mm512_set1_ps(scores[j]), load16(Vh + (s0 + j) * vstep + 16 * i), even[i]);
    for (int i = 0; i < C; ++i) _mm512_storeu_ps(y + h * 16 * C + 16 * i, _mm512_add_ps(even[i], odd[i]));
  }
}
#endif

// The same in plain loops (other CPUs, other head sizes).
template <typename T>
void attend_group_plain(const float* q, int64_t G, const T* Kh, int64_t kstep, const T* Vh, int64_t vstep,
                        int64_t s0, int64_t s1, int64_t hd, float scale, float* top, float* total, float* y) {
  for (int64_t h = 0; h < G; ++h) {
    float mx = -INFINITY, sum = 0.f;
    float* yh = y + h * hd;
    std::fill(yh, yh + hd, 0.f);
    for (int64_t s = s0; s < s1; ++s) {
      float score = 0.f;
      if constexpr (std::is_same_v<T, float>) score = dotf(q + h * hd, Kh + s * kstep, hd) * scale;
      else {
        for (int64_t i = 0; i < hd; ++i) score += q[h * hd + i] * cached(Kh[s * kstep + i]);
        score *= scale;
      }
      if (score > mx) {  // a new maximum: rescale what is summed so far
        const float r = std::exp(mx - score);
        sum *= r;
        for (int64_t i = 0; i < hd; ++i) yh[i] *= r;
        mx = score;
      }
      const float e = std::exp(score - mx);
      sum += e;
      for (int64_t i = 0; i < hd; ++i) yh[i] += e * cached(Vh[s * vstep + i]);
    }
    top[h] = mx, total[h] = sum;
  }
}

template <typename T>
void attend_group(const float* q, int64_t G, const T* Kh, int64_t kstep, const T* Vh, int64_t vstep,
                  int64_t s0, int64_t s1, int64_t hd, float scale, float* top, float* total, float* y) {
#if defined(LLMLAB_AVX512)
  switch (hd) {
    case 16: return attend_group_avx512<1, T>(q, G, Kh, kstep, Vh, vstep, s0, s1, scale, top, total, y);
    case 32: return attend_group_avx512<2, T>(q, G, Kh, kstep, Vh, vstep, s0, s1, scale, top, total, y);
    case 64: return attend_group_avx512<4, T>(q, G, Kh, kstep, Vh, vstep, s0, s1, scale, top, total, y);
    case 128: return attend_group_avx512<8, T>(q, G, Kh, kstep, Vh, vstep, s0, s1, scale, top, total, y);
  }
#endif
  attend_group_plain<T>(q, G, Kh, kstep, Vh, vstep, s0, s1, hd, scale, top, total, y);
}

// Self-Extend for one row's G heads over [s0, s1): keys before near_from are seen at grouped positions (the far
// query qf against the far keys Kfh), the rest as usual; the two ranges' softmaxes merged into (top, total, y).
template <typename T>
void attend_group_extended(const float* q, const float* qf, int64_t G, const T* Kh, const T* Kfh, int64_t kstep,
                           const T* Vh, int64_t vstep, int64_t s0, int64_t s1, int64_t near_from, int64_t hd,
                           float scale, float* top, float* total, float* y) {
  if (near_from <= s0) return attend_group(q, G, Kh, kstep, Vh, vstep, s0, s1, hd, scale, top, total, y);
  if (near_from >= s1) return attend_group(qf, G, Kfh, kstep, Vh, vstep, s0, s1, hd, scale, top, total, y);
  std::vector<float> far_top(G), far_total(G), far_y(G * hd);
  attend_group(qf, G, Kfh, kstep, Vh, vstep, s0, near_from, hd, scale, far_top.data(), far_total.data(), far_y.data());
  attend_group(q, G, Kh, kstep, Vh, vstep, near_from, s1, hd, scale, top, total, y);
  for (int64_t h = 0; h < G; ++h) {
    const float mx = std::max(top[h], far_top[h]), a = std::exp(top[h] - mx), b = std::exp(far_top[h] - mx);
    top[h] = mx, total[h] = total[h] * a + far_total[h] * b;
    for (int64_t i = 0; i < hd; ++i) y[h * hd + i] = y[h * hd + i] * a + far_y[h * hd + i] * b;
  }
}

#if defined(LLMLAB_AVX512)
// A prompt's chunk attends as small matrix products, flash-style: the queries of a run of rows (x the G heads of a
// kv group) go through the cached positions part by part (PART at a time). Each part's keys are converted to fp32
// and transposed once (keys along the lanes) and its values converted once, then every query of the run reads them
// from L1: no horizontal sums and no fp16 conversion per query (the row kernel above does both for every query:
// fine for a decode step's few, the cost of a long prompt), and each query's softmax runs on over the parts in
// registers (no per-part buffers). Each score is one chain of FMAs over the head's dimensions in order, each output
// one chain over a part's positions in order, whichever queries share a block: a row's result never depends on its
// batch.
constexpr int64_t TILED_RUN = 16;  // rows of a prompt's chunk per attention task (the row kernel: 8)

// The 16 x 16 matrix in v (v[i] = row i) transposed in place: pairs, then quads of lanes, then 128-bit blocks.
inline void transpose16(__m512* v) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit block L: t[2i] = rows 2i, 2i+1 at columns 4L, 4L+1; t[2i+1] at 4L+2, 4L+3
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // v[4i + c], block L: rows 4i..4i+3 at column 4L + c
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    v[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), v[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    v[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), v[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c: block L of v[c], v[4 + c], v[8 + c], v[12 + c]
    const __m512 a = _mm512_shuffle_f32x4(v[c], v[4 + c], 0x88), b = _mm512_shuffle_f32x4(v[c], v[4 + c], 0xdd);
    const __m512 e = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0x88), f = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0xdd);
    t[c] = _mm512_shuffle_f32x4(a, e, 0x88), t[8 + c] = _mm512_shuffle_f32x4(a, e, 0xdd);
    t[4 + c] = _mm512_shuffle_f32x4(b, f, 0x88), t[12 + c] = _mm512_shuffle_f32x4(b, f, 0xdd);
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

// R queries qs (R, 16 C; scaled) against one part: kt (16 C, PART) transposed keys, vs (PART, 16 C) values; query r
// sees the part's positions [lo[r], hi[r]). Folds them into each query's running maximum, total and unnormalised
// output (top, total, y).
template <int C, int R>
void tiled_block(const float* qs, const float* kt, const float* vs, const int64_t* lo, const int64_t* hi, float* top,
                 float* total, float* y) {
  constexpr int HD = 16 * C;
  alignas(64) float p[R][PART];
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int kb = 0; kb < 4; ++kb) acc[r][kb] = _mm512_setzero_ps();
  for (int d = 0; d < HD; ++d) {  // scores: keys along the lanes, one FMA per (query, 16 keys, dimension)
    const __m512 k0 = _mm512_load_ps(kt + d * PART), k1 = _mm512_load_ps(kt + d * PART + 16);
    const __m512 k2 = _mm512_load_ps(kt + d * PART + 32), k3 = _mm512_load_ps(kt + d * PART + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 qd = _mm512_set1_ps(qs[r * HD + d]);
      acc[r][0] = _mm512_fmadd_ps(qd, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(qd, k1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(qd, k2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(qd, k3, acc[r][3]);
    }
  }
  int64_t most_keys = 0;
  float old_share[R], new_share[R];  // what the running output and this part's are weighed by
  for (int r = 0; r < R; ++r) {  // each query's softmax over its own keys [lo[r], hi[r]) of the part
    most_keys = std::max(most_keys, hi[r]);
    if (hi[r] <= lo[r]) {  // a spare query of a short block, or a row that sees none of these keys
      std::fill(p[r], p[r] + PART, 0.f);
      old_share[r] = 1.f, new_share[r] = 0.f;
      continue;
    }
    __mmask16 live[4];
    __m512 most = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int kb = 0; kb < 4; ++kb) {
      const int64_t below = std::clamp<int64_t>(hi[r] - 16 * kb, 0, 16), skip = std::clamp<int64_t>(lo[r] - 16 * kb, 0, 16);
      live[kb] = __mmask16(((1u << below) - 1) & ~((1u << skip) - 1));
      most = _mm512_mask_max_ps(most, live[kb], most, acc[r][kb]);
    }
    const float mx = std::max(top[r], _mm512_reduce_max_ps(most));
    for (int kb = 0; kb < 4; ++kb) {
      const __m512 e = _mm512_maskz_mov_ps(live[kb], exp512(_mm512_sub_ps(acc[r][kb], _mm512_set1_ps(mx))));
      _mm512_store_ps(p[r] + 16 * kb, e);
      sum = _mm512_add_ps(sum, e);
    }
    old_share[r] = std::exp(top[r] - mx), new_share[r] = 1.f;  // (top = -inf before the first part: 0)
    top[r] = mx, total[r] = total[r] * old_share[r] + _mm512_reduce_add_ps(sum);
  }
  __m512 out[R][C];  // values: one FMA per (query, position, 16 dimensions); past a query's keys p is 0
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) out[r][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < most_keys; ++j) {
    __m512 v[C];
    for (int i = 0; i < C; ++i) v[i] = _mm512_load_ps(vs + j * HD + 16 * i);
    for (int r = 0; r < R; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r][j]);
      for (int i = 0; i < C; ++i) out[r][i] = _mm512_fmadd_ps(pj, v[i], out[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) {
      float* yr = y + r * HD + 16 * i;
      _mm512_store_ps(yr, _mm512_fmadd_ps(_mm512_load_ps(yr), _mm512_set1_ps(old_share[r]),
                                          _mm512_mul_ps(out[r][i], _mm512_set1_ps(new_share[r]))));
    }
}

// Queries qs[0..nq) (pointers, unscaled) of one kv group, query i at position at[i], over the cached positions
// [0, at[i]] of Kh/Vh -> outs[i] (normalised). Self-Extend (window > 0): keys window or more positions before a query
// are seen as its far query qfs[i] against the far keys Kfh instead.
template <int C, typename T>
void attend_tiled(const float* const* qs, const float* const* qfs, const int64_t* at, int64_t nq, const T* Kh,
                  const T* Kfh, int64_t kstep, const T* Vh, int64_t vstep, int64_t window, float scale,
                  float* const* outs) {
  constexpr int HD = 16 * C, R = C >= 8 ? 3 : 6;  // R: 4 x R score accumulators (64 keys) and R x C output ones
  const int64_t blocks = (nq + R - 1) / R, padded = blocks * R, last = *std::max_element(at, at + nq);
  std::vector<float> buf(3 * padded * HD + 16), top(padded, -INFINITY), total(padded);
  float* qa = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
  float *qfa = qa + padded * HD, *ya = qfa + padded * HD;  // scaled near and far queries, running outputs
  for (int64_t i = 0; i < padded; ++i)  // a short last block padded with zero queries
    for (int d = 0; d < HD; ++d) {
      qa[i * HD + d] = i < nq ? qs[i][d] * scale : 0.f;
      qfa[i * HD + d] = i < nq && window ? qfs[i][d] * scale : 0.f;
      ya[i * HD + d] = 0.f;
    }
  std::vector<int64_t> lo(padded), mid(padded), hi(padded);  // query i: far keys [lo, mid), near [mid, hi) of a part
  alignas(64) float kt[HD * PART], vs[PART * HD];
  auto transpose_keys = [&](const T* K, int64_t s0, int64_t n) {  // 16 x 16 at a time (positions past n: zeros)
    for (int64_t j0 = 0; j0 < PART; j0 += 16)
      for (int i = 0; i < C; ++i) {
        __m512 block[16];
        for (int j = 0; j < 16; ++j)
          block[j] = j0 + j < n ? load16(K + (s0 + j0 + j) * kstep + 16 * i) : _mm512_setzero_ps();
        transpose16(block);
        for (int d = 0; d < 16; ++d) _mm512_store_ps(kt + (16 * i + d) * PART + j0, block[d]);
      }
  };
  auto sees = [&](const int64_t* from, const int64_t* to, int64_t b) {  // does a query of block b see a key?
    for (int r = 0; r < R; ++r)
      if (to[b * R + r] > from[b * R + r]) return true;
    return false;
  };
  for (int64_t s0 = 0; s0 <= last; s0 += PART) {
    const int64_t n = std::min(PART, last + 1 - s0);
    bool far = false, near = false;
    for (int64_t i = 0; i < padded; ++i) {
      hi[i] = i < nq ? std::clamp<int64_t>(at[i] + 1 - s0, 0, n) : 0;
      mid[i] = window && i < nq ? std::clamp<int64_t>(at[i] - window + 1 - s0, 0, hi[i]) : 0;
      lo[i] = 0, far |= mid[i] > 0, near |= hi[i] > mid[i];
    }
    for (int64_t j = 0; j < n; ++j)  // values as rows
      for (int i = 0; i < C; ++i) _mm512_store_ps(vs + j * HD + 16 * i, load16(Vh + (s0 + j) * vstep + 16 * i));
    if (far) {
      transpose_keys(Kfh, s0, n);
      for (int64_t b = 0; b < blocks; ++b)
        if (sees(lo.data(), mid.data(), b))
          tiled_block<C, R>(qfa + b * R * HD, kt, vs, &lo[b * R], &mid[b * R], &top[b * R], &total[b * R], ya + b * R * HD);
    }
    if (near) {
      transpose_keys(Kh, s0, n);
      for (int64_t b = 0; b < blocks; ++b)
        if (sees(mid.data(), hi.data(), b))
          tiled_block<C, R>(qa + b * R * HD, kt, vs, &mid[b * R], &hi[b * R], &top[b * R], &total[b * R], ya + b * R * HD);
    }
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int d = 0; d < HD; ++d) outs[i][d] = ya[i * HD + d] / total[i];
}
#endif

// A prompt's chunk: the rows of each run (consecutive rows of one cache row, up to TILED_RUN) x kv group is one task.
template <typename T>
void attend_prompt(const ModelDesc& M, const float* q, const float* qf, const T* K, const T* Kf, const T* V,
                   const int64_t* ks, const int64_t* vs, const int64_t* pos, const int64_t* cache_row, int64_t B,
                   float* out) {
#if defined(LLMLAB_AVX512)
  const int64_t hd = M.head_dim, H = M.n_heads, KV = M.n_kv_heads, G = H / KV;
  const float scale = 1.0f / std::sqrt(float(hd));
  std::vector<int64_t> run_start;
  for (int64_t b = 0; b < B; ++b)
    if (b == 0 || !cache_row || cache_row[b] != cache_row[b - 1] || b - run_start.back() >= TILED_RUN) run_start.push_back(b);
  run_start.push_back(B);
  const int64_t runs = run_start.size() - 1;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < runs * KV; ++t) {
    const int64_t r = t / KV, g = t % KV, b0 = run_start[r], b1 = run_start[r + 1];
    std::vector<const float*> qs, qfs;
    std::vector<float*> outs;
    std::vector<int64_t> at;
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t h = 0; h < G; ++h) {
        const int64_t at_q = b * H * hd + (g * G + h) * hd;
        qs.push_back(q + at_q), qfs.push_back(M.group ? qf + at_q : nullptr), outs.push_back(out + at_q);
        at.push_back(pos[b]);
      }
    const int64_t row = cache_row ? cache_row[b0] : b0, nq = qs.size(), window = M.group ? M.window : 0;
    const T *Kh = K + row * ks[0] + g * ks[1], *Vh = V + row * vs[0] + g * vs[1];
    const T* Kfh = M.group ? Kf + row * ks[0] + g * ks[1] : nullptr;
    switch (hd) {
      case 16: attend_tiled<1, T>(qs.data(), qfs.data(), at.data(), nq, Kh, Kfh, ks[2], Vh, vs[2], window, scale, outs.data()); break;
      case 32: attend_tiled<2, T>(qs.data(), qfs.data(), at.data(), nq, Kh, Kfh, ks[2], Vh, vs[2], window, scale, outs.data()); break;
      case 64: attend_tiled<4, T>(qs.data(), qfs.data(), at.data(), nq, Kh, Kfh, ks[2], Vh, vs[2], window, scale, outs.data()); break;
      case 128: attend_tiled<8, T>(qs.data(), qfs.data(), at.data(), nq, Kh, Kfh, ks[2], Vh, vs[2], window, scale, outs.data()); break;
    }
  }
#endif
}

// Each row's queries (B, n_heads*hd) attend over the slots [0, pos] of its cache row -> out (B, n_heads*hd).
// Row b reads cache row cache_row[b] (null: row b), so rows of one sequence at pos, pos + 1, ... attend causally.
// Tasks are (row, kv group, part of PART positions), combined per head after: parts keep two threads busy at
// batch 1 (three kv groups), and depend on the position alone, so a row's result never depends on its batch.
template <typename T>
void attend(const ModelDesc& M, const float* q, const float* qf, const T* K, const T* Kf, const T* V, const int64_t* ks,
            const int64_t* vs, const int64_t* pos, const int64_t* cache_row, int64_t B, float* out, bool prompt) {
  const int64_t hd = M.head_dim, H = M.n_heads, KV = M.n_kv_heads, G = H / KV;
  const float scale = 1.0f / std::sqrt(float(hd));
#if defined(LLMLAB_AVX512)
  if (prompt && (hd == 16 || hd == 32 || hd == 64 || hd == 128))  // a prompt's chunk: matrix products
    return attend_prompt(M, q, qf, K, Kf, V, ks, vs, pos, cache_row, B, out);
#endif
  std::vector<int64_t> first(B + 1, 0);  // row b's slots are [first[b], first[b + 1]) (KV groups x parts)
  for (int64_t b = 0; b < B; ++b) first[b + 1] = first[b] + KV * ((pos[b] + PART) / PART);
  // Up to 8 consecutive rows sharing a cache row (a verify, a prefill chunk) are one task per (kv group, part):
  // the part's keys and values are read once, from L1 after the first row, instead of once per row.
  std::vector<int64_t> run_start, run_parts, task_first{0};
  for (int64_t b = 0; b < B; ++b) {
    const bool joins = b > 0 && cache_row && cache_row[b] == cache_row[b - 1] && b - run_start.back() < 8;
    if (!joins) run_start.push_back(b), run_parts.push_back(0);
    run_parts.back() = std::max(run_parts.back(), (pos[b] + PART) / PART);
  }
  run_start.push_back(B);
  for (size_t r = 0; r + 1 < run_start.size(); ++r) task_first.push_back(task_first.back() + KV * run_parts[r]);
  const int64_t tasks = task_first.back();
  std::vector<float> top(first[B] * G), total(first[B] * G), part_y(first[B] * G * hd);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t run = std::upper_bound(task_first.begin(), task_first.end(), t) - task_first.begin() - 1;
      const int64_t g = (t - task_first[run]) / run_parts[run], part = (t - task_first[run]) % run_parts[run];
      for (int64_t b = run_start[run]; b < run_start[run + 1]; ++b) {
        const int64_t parts = (first[b + 1] - first[b]) / KV, s0 = part * PART, s1 = std::min(pos[b] + 1, s0 + PART);
        if (part >= parts) continue;  // this row's positions end before the part
        const int64_t row = cache_row ? cache_row[b] : b, slot = first[b] + g * parts + part;
        const int64_t at_q = b * H * hd + g * G * hd, at_k = row * ks[0] + g * ks[1], at_v = row * vs[0] + g * vs[1];
        if (M.group)  // Self-Extend: keys window or more positions back at grouped positions
          attend_group_extended(q + at_q, qf + at_q, G, K + at_k, Kf + at_k, ks[2], V + at_v, vs[2], s0, s1,
                                pos[b] - M.window + 1, hd, scale, &top[slot * G], &total[slot * G], &part_y[slot * G * hd]);
        else
          attend_group(q + at_q, G, K + at_k, ks[2], V + at_v, vs[2], s0, s1, hd, scale, &top[slot * G], &total[slot * G],
                       &part_y[slot * G * hd]);
      }
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

// Writes each row's key and value (B, kv_heads * hd) at its position in its cache row, then attends: every row's
// are written before any row attends (so rows of one sequence are a causal forward).
template <typename T>
void cache_and_attend(const ModelDesc& M, const float* q, const float* qf, const float* k, const float* kf, const float* v,
                      T* K, T* Kf, T* V, const int64_t* ks, const int64_t* vs, const int64_t* pos, const int64_t* cache_row,
                      int64_t B, float* out, bool prompt) {
  const int64_t hd = M.head_dim, kvd = M.n_kv_heads * hd;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = cache_row ? cache_row[b] : b;
    for (int64_t g = 0; g < M.n_kv_heads; ++g) {
      store_row(K + row * ks[0] + g * ks[1] + pos[b] * ks[2], &k[b * kvd + g * hd], hd);
      store_row(V + row * vs[0] + g * vs[1] + pos[b] * vs[2], &v[b * kvd + g * hd], hd);
      if (M.group) store_row(Kf + row * ks[0] + g * ks[1] + pos[b] * ks[2], &kf[b * kvd + g * hd], hd);
    }
  }
  attend(M, q, qf, K, Kf, V, ks, vs, pos, cache_row, B, out, prompt);
}

// g = silu(g) * u, the SwiGLU: a vector exp where there is one (1536 scalar exps a layer were ~2% of a step)
void silu_mul(float* g, const float* u, int64_t n) {
  int64_t i = 0;
#if defined(LLMLAB_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
    _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)), _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// ---- sampling: one token from a row of logits --------------------------------------------------------------------
//
// What llmlab.engine.sampling's sampling_probs + draw choose, given the row's uniform u: temperature, top-k (ties with
// the k-th kept), top-p (the smallest set of most likely tokens that reaches p of the mass), min-p (at least min_p of
// the top token's probability), then the first token, in vocabulary order, whose cumulative probability exceeds u
// times the total. PyTorch made some ten passes over SmolLM2's 49,152 logits (two softmaxes, a top-256, masks, a
// float64 cumsum: ~0.4-0.6 ms a token, a tenth of a decode step); this makes two, and sorts only the tokens within
// a factor 1e4 of the top one (the nucleus lies among them whenever they hold p of the mass; else within 1e8, else all).

// The largest of v[0..n)
float max_of(const float* v, int64_t n) {
  float top = -INFINITY;
  int64_t i = 0;
#if defined(LLMLAB_AVX512)
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(v + i));
  top = _mm512_reduce_max_ps(m);
#endif
  for (; i < n; ++i) top = std::max(top, v[i]);
  return top;
}

// e[i] = exp((v[i] - top) / temperature), a token's weight relative to the top one's (whose is 1), 0 below floor (a
// top-k or min-p cut) and below e^-80 (a probability under 1e-34: left as is, the denormals cost 100x in the sums);
// block[b] = the sum of e over the 16 tokens from 16 b; returns the sum of all
double weights(const float* v, int64_t n, float top, float temperature, float floor, float* e, float* block) {
  double total = 0.0;
  const float low = std::max(floor, top - 80.f * temperature);
  int64_t i = 0;
#if defined(LLMLAB_AVX512)
  const __m512 t = _mm512_set1_ps(top), inv = _mm512_set1_ps(1.0f / temperature), f = _mm512_set1_ps(low);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    const __m512 w = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, f, _CMP_GE_OQ), exp512(_mm512_mul_ps(_mm512_sub_ps(x, t), inv)));
    _mm512_storeu_ps(e + i, w);
    block[i / 16] = _mm512_reduce_add_ps(w);
    total += block[i / 16];
  }
#endif
  for (; i < n; i += 16) {  // (16 at a time, the last block short)
    float sum = 0.f;
    for (int64_t j = i; j < std::min(n, i + 16); ++j) sum += e[j] = v[j] >= low ? std::exp((v[j] - top) / temperature) : 0.f;
    block[i / 16] = sum;
    total += sum;
  }
  return total;
}

int64_t sample_row(const float* v, int64_t V, float temperature, int64_t top_k, float top_p, float min_p, double u) {
  thread_local std::vector<float> e, block, kth;
  e.resize(V), block.resize((V + 15) / 16);
  const float top = max_of(v, V);
  float floor = -INFINITY;  // top-k: the k-th largest logit (the temperature keeps the order)
  if (top_k > 0 && top_k < V) {
    kth.assign(v, v + V);
    std::nth_element(kth.begin(), kth.begin() + (top_k - 1), kth.end(), std::greater<float>());
    floor = kth[top_k - 1];
  }
  if (min_p > 0.f && top_p >= 1.f)  // min-p is a cut in the logits too (with top-p it comes after the nucleus)
    floor = std::max(floor, top + temperature * std::log(min_p));
  const double total = weights(v, V, top, temperature, floor, e.data(), block.data());
  if (top_p >= 1.f) {  // the first token whose cumulative weight exceeds u * total: whole blocks, then within one
    const double target = u * total;
    double cdf = 0.0;
    int64_t b = 0;
    while (b + 1 < int64_t(block.size()) && cdf + block[b] <= target) cdf += block[b++];
    for (int64_t i = 16 * b; i < std::min(V, 16 * b + 16); ++i)
      if ((cdf += e[i]) > target) return i;
    return std::min(V, 16 * b + 16) - 1;
  }
  // top-p: the tokens within 1e4 of the top one's weight, sorted, hold the nucleus when they hold p of the mass
  std::vector<std::pair<float, int64_t>> kept;  // (weight, token)
  for (float bound : {1e-4f, 1e-8f, 0.f}) {  // (more tokens when the near ones fall short of p: a flat row)
    kept.clear();
    double near = 0.0;
    for (int64_t b = 0; b < int64_t(block.size()); ++b) {
      if (block[b] < bound) continue;  // (a block's sum is at least each of its weights)
      for (int64_t i = 16 * b; i < std::min(V, 16 * b + 16); ++i)
        if (e[i] > 0.f && e[i] >= bound) kept.push_back({e[i], i}), near += e[i];
    }
    if (near >= top_p * total || bound == 0.f) break;
  }
  std::sort(kept.begin(), kept.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  double before = 0.0;  // the mass of the more likely tokens: a token stays while that is below p
  size_t n = 0;
  while (n < kept.size() && before < top_p * total) before += kept[n++].first;
  kept.resize(n);
  if (min_p > 0.f)  // against the top token's weight, 1
    kept.erase(std::remove_if(kept.begin(), kept.end(), [&](const auto& k) { return k.first < min_p; }), kept.end());
  std::sort(kept.begin(), kept.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
  double sum = 0.0, cdf = 0.0;
  for (const auto& k : kept) sum += k.first;
  for (const auto& k : kept)
    if ((cdf += k.first) > u * sum) return k.second;
  return kept.back().second;  // (u * sum rounded up to the sum)
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

// Whether llmlab_step can keep an fp16 KV cache (F16C converts it).
int llmlab_half_kv() {
#if defined(__F16C__)
  return 1;
#else
  return 0;
#endif
}

// Whether a prompt's chunks take bf16 activations (AVX512-BF16 builds): on = 1 / off = 0 / -1 leaves it; returns it.
int llmlab_bf16(int on) {
#if defined(LLMLAB_BF16)
  if (on >= 0) bf16_activations = on;
  return bf16_activations;
#else
  return 0 * on;
#endif
}

// y (N, out) = x (N, in) @ W.T (+ bias): the same kernel, for one projection outside the whole step.
// Always with fp32 activations: these are PyTorch's forwards (prefill, scoring), where more than a few rows take the
// dequantized weight and PyTorch's matmul, so a prompt's logits must not depend on how many tokens one call holds.
void llmlab_qmatmul(const QMat* W, const float* x, int64_t N, float* y) {
  matmul_many({{W, y, W->out}}, x, W->in, N, Acts::fp32);
}

// The same with the decode step's activations (int8 where llmlab_int8 says so): to test its kernels on one matrix.
void llmlab_qmatmul_step(const QMat* W, const float* x, int64_t N, float* y) { matmul_many({{W, y, W->out}}, x, W->in, N, Acts::step); }

// The same with a prompt's activations (bf16 where llmlab_bf16 says so): to test its kernel on one matrix.
void llmlab_qmatmul_prompt(const QMat* W, const float* x, int64_t N, float* y) { matmul_many({{W, y, W->out}}, x, W->in, N, Acts::prompt); }

// The dense fp32 rows [o0, o1) of the weight (o1 - o0, in).
void llmlab_dequantize(const QMat* W, int64_t o0, int64_t o1, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t o = o0; o < o1; ++o) dequantize_row(*W, o, out + (o - o0) * W->in);
}

// Rows of the weight (out[n] = w[tokens[n]]): a token embedding read from a packed (tied) output head.
void llmlab_embed(const QMat* W, const int64_t* tokens, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) dequantize_row(*W, tokens[i], out + i * W->in);
}

// One token per row of logits (B, V) with temperature > 0, top_k (0: off), top_p (1: off), min_p (0: off) and the
// row's uniform u[b] in [0, 1) -> out (B,): see sample_row.
void llmlab_sample(const float* logits, int64_t B, int64_t V, float temperature, int64_t top_k, float top_p,
                   float min_p, const double* u, int64_t* out) {
  for (int64_t b = 0; b < B; ++b) out[b] = sample_row(logits + b * V, V, temperature, top_k, top_p, min_p, u[b]);
}

// One decode step: tokens (B,) at positions pos (B,); k_cache/v_cache: per layer a pointer to the fp32 (kv_half = 0)
// or fp16 (kv_half = 1, where llmlab_half_kv() says so) cache
// (batch, kv_heads, slots, head_dim) with element strides ks/vs (batch, head, slot; head_dim is contiguous).
// Writes each row's key and value at its position, and the next-token logits of the last logit_rows rows
// (logit_rows, vocab): all B for decoding and verifying, 1 for a prompt's last chunk, 0 for its others.
// prompt: 0 for decode or verify rows; 2 for a prompt's last chunk (NativeDecoder.prefill: its last 64 tokens), whose
// activations are bf16 where llmlab_bf16 is on, else fp32, never int8: its last logits choose the first token (in
// int8, SmolLM2 answered "What is the capital of France?" with "L'Étoile"); 1 for a chunk before it, which only
// writes keys and values and takes the decode rows' activations (int8 where llmlab_int8 is on, else the last
// chunk's). Both kinds of chunk attend as matrix products (attend_prompt), decode and verify rows row by row.
// Row b uses cache row cache_row[b] (null: row b). Every row's key and value are written before any row attends,
// so k + 1 rows of ONE sequence at positions p..p+k sharing a cache row are a causal forward of k + 1 tokens
// (a speculative verify in one call).
void llmlab_step(const ModelDesc* Mp, const int64_t* tokens, const int64_t* pos, const int64_t* cache_row, int64_t B,
                 void* const* k_cache, void* const* v_cache, const int64_t* ks, const int64_t* vs, float* logits,
                 int64_t logit_rows, int prompt, int kv_half, void* const* kfar_cache) {
  const ModelDesc& M = *Mp;
  const Acts acts = prompt == 2 || (prompt == 1 && !llmlab_int8(-1)) ? Acts::prompt : Acts::step;
  const int64_t dim = M.dim, hd = M.head_dim, half = hd / 2, hidden = M.hidden;
  const int64_t qd = M.n_heads * hd, kvd = M.n_kv_heads * hd;
  std::vector<float> x(B * dim), h(B * dim), q(B * qd), k(B * kvd), v(B * kvd), att(B * qd), tmp(B * dim);
  std::vector<float> gate(B * hidden), up(B * hidden), cosv(B * half), sinv(B * half);
  // Self-Extend: each query also rotated at its far position, each key at its grouped one (llmlab.model.self_extend)
  const int64_t far_rows = M.group ? B : 0;
  std::vector<float> qf(far_rows * qd), kf(far_rows * kvd), cosq(far_rows * half), sinq(far_rows * half),
      cosk(far_rows * half), sink(far_rows * half);
  auto tables = [&](int64_t b, int64_t p, float* c, float* s) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(p) * M.inv_freq[i];  // fp32, as the PyTorch path (input_pos.float() * inv_freq)
      c[b * half + i] = std::cos(angle) * M.rope_scale;
      s[b * half + i] = std::sin(angle) * M.rope_scale;
    }
  };
  for (int64_t b = 0; b < B; ++b) tables(b, pos[b], cosv.data(), sinv.data());
  for (int64_t b = 0; b < far_rows; ++b) {
    tables(b, pos[b] / M.group + M.window - M.window / M.group, cosq.data(), sinq.data());
    tables(b, pos[b] / M.group, cosk.data(), sink.data());
  }
  embed_rows(M, tokens, B, x.data());

  for (int64_t l = 0; l < M.n_layers; ++l) {
    for (int64_t b = 0; b < B; ++b) rmsnorm(&x[b * dim], M.norm_in[l], &h[b * dim], dim, M.eps);
    matmul_many({{&M.wq[l], q.data(), qd}, {&M.wk[l], k.data(), kvd}, {&M.wv[l], v.data(), kvd}}, h.data(), dim, B, acts);
    std::copy(q.begin(), q.begin() + far_rows * qd, qf.begin());  // (unrotated copies for Self-Extend's far view)
    std::copy(k.begin(), k.begin() + far_rows * kvd, kf.begin());
    for (int64_t b = 0; b < far_rows; ++b) {
      rope(&qf[b * qd], M.n_heads, hd, &cosq[b * half], &sinq[b * half]);
      rope(&kf[b * kvd], M.n_kv_heads, hd, &cosk[b * half], &sink[b * half]);
    }
    for (int64_t b = 0; b < B; ++b) {
      rope(&q[b * qd], M.n_heads, hd, &cosv[b * half], &sinv[b * half]);
      rope(&k[b * kvd], M.n_kv_heads, hd, &cosv[b * half], &sinv[b * half]);
    }
    void* kfar = M.group ? kfar_cache[l] : nullptr;
    if (kv_half)
      cache_and_attend(M, q.data(), qf.data(), k.data(), kf.data(), v.data(), static_cast<uint16_t*>(k_cache[l]),
                       static_cast<uint16_t*>(kfar), static_cast<uint16_t*>(v_cache[l]), ks, vs, pos, cache_row, B,
                       att.data(), prompt);
    else
      cache_and_attend(M, q.data(), qf.data(), k.data(), kf.data(), v.data(), static_cast<float*>(k_cache[l]),
                       static_cast<float*>(kfar), static_cast<float*>(v_cache[l]), ks, vs, pos, cache_row, B, att.data(),
                       prompt);
    matmul_many({{&M.wo[l], tmp.data(), dim}}, att.data(), qd, B, acts);
    for (int64_t i = 0; i < B * dim; ++i) x[i] += tmp[i];
    for (int64_t b = 0; b < B; ++b) rmsnorm(&x[b * dim], M.norm_post[l], &h[b * dim], dim, M.eps);
    matmul_many({{&M.wgate[l], gate.data(), hidden}, {&M.wup[l], up.data(), hidden}}, h.data(), dim, B, acts);
    silu_mul(gate.data(), up.data(), B * hidden);
    matmul_many({{&M.wdown[l], tmp.data(), dim}}, gate.data(), hidden, B, acts);
    for (int64_t i = 0; i < B * dim; ++i) x[i] += tmp[i];
  }
  if (logit_rows == 0) return;  // a prompt's chunk before its last: only its keys and values are wanted
  const int64_t skip = B - logit_rows;  // rows whose logits nobody needs (a prompt's last chunk's all but last)
  for (int64_t b = skip; b < B; ++b) rmsnorm(&x[b * dim], M.norm_final, &h[b * dim], dim, M.eps);
  matmul_many({{M.head, logits, M.vocab}}, h.data() + skip * dim, dim, logit_rows, acts);
}

}  // extern "C"
