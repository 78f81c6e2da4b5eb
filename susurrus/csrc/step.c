/* A decoding step's products and attention, for the CPU (AVX2 + FMA).

   Products of a few rows with a weight read once:

   y[r][o] = scale[o] * sum_i w[o][i] x[r][i] + bias[o], the weight int8 (one scale per
   output row) or float32 (no scale), the activations float32 and never rounded.

   A decoding step multiplies one row per window (five with beam search) by each weight:
   its time is reading the weights, and PyTorch's kernels for so few rows stream them
   well below the machine's memory speed (susurrus/native.py). Here each thread takes
   runs of output rows and reads each weight row once for all the input rows, taken three
   at a time against a block of weight rows that stays in the first-level cache.

   The sums are in one fixed order whatever the row count and the thread count: an
   output's whole sum is made by one thread, each input row's with the same four
   accumulators over the same 32-wide blocks, alone or beside others. So a window's
   numbers never depend on its neighbours or on the load of the machine. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 8 /* weight rows per block: 8 x 2048 int8 or float rows fit the L1 cache */

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_int8_t(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline __m256 load_float(const float *p) { return _mm256_loadu_ps(p); }

/* One weight row `wo` against `g` (1-3, a constant once inlined) input rows at x, x + in,
   ...; the results go to y, y + out, ... */
#define GROUP(TYPE)                                                                       \
    static inline __attribute__((always_inline)) void group_##TYPE(                       \
        const TYPE *wo, const float *x, int64_t in, int g, float s, float b, float *y,    \
        int64_t out) {                                                                    \
        int64_t body = in & ~(int64_t)31, i;                                              \
        __m256 acc[3][4];                                                                 \
        _Pragma("GCC unroll 3") for (int r = 0; r < g; r++)                               \
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++)                               \
            acc[r][k] = _mm256_setzero_ps();                                              \
        for (i = 0; i < body; i += 32) {                                                  \
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {                         \
                __m256 v = load_##TYPE(wo + i + 8 * k);                                   \
                _Pragma("GCC unroll 3") for (int r = 0; r < g; r++)                       \
                    acc[r][k] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + r * in + i + 8 * k), \
                                                acc[r][k]);                               \
            }                                                                             \
        }                                                                                 \
        _Pragma("GCC unroll 3") for (int r = 0; r < g; r++) {                             \
            float t = sum8(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]),             \
                                         _mm256_add_ps(acc[r][2], acc[r][3])));           \
            for (int64_t j = body; j < in; j++) t += (float)wo[j] * x[r * in + j];        \
            y[r * out] = t * s + b;                                                       \
        }                                                                                 \
    }

GROUP(int8_t)
GROUP(float)

/* Rows go three at a time, then two (four as two and two: no group of one until the
   last row), each group against a block of weight rows. */
#define ROWS(NAME, TYPE)                                                                  \
    void NAME(const TYPE *w, const float *scale, const float *bias, const float *x,      \
              float *y, int64_t out, int64_t in, int64_t rows, int threads) {             \
        int64_t blocks = (out + BLOCK - 1) / BLOCK;                                       \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                 \
        for (int64_t block = 0; block < blocks; block++) {                                \
            int64_t first = block * BLOCK, last = first + BLOCK < out ? first + BLOCK : out; \
            int64_t r = 0;                                                                \
            while (r < rows) {                                                            \
                int64_t left = rows - r;                                                  \
                int g = left >= 3 && left != 4 ? 3 : left >= 2 ? 2 : 1;                  \
                for (int64_t o = first; o < last; o++) {                                  \
                    const TYPE *wo = w + o * in;                                          \
                    float s = scale ? scale[o] : 1.0f, b = bias ? bias[o] : 0.0f;         \
                    const float *xr = x + r * in;                                         \
                    float *yr = y + r * out + o;                                          \
                    if (g == 3) group_##TYPE(wo, xr, in, 3, s, b, yr, out);               \
                    else if (g == 2) group_##TYPE(wo, xr, in, 2, s, b, yr, out);          \
                    else group_##TYPE(wo, xr, in, 1, s, b, yr, out);                      \
                }                                                                         \
                r += g;                                                                   \
            }                                                                             \
        }                                                                                 \
    }

ROWS(susurrus_int8_rows, int8_t)
ROWS(susurrus_float_rows, float)

/* glibc's vector expf (libmvec), within 4 ulp as its scalar one. */
extern __m256 _ZGVdN8v_expf(__m256 x);

/* Attention of a step's queries over keys and values read once:
   out[b][h][i] = softmax_t(q[b][h][i] . k[b][h][t] / sqrt(dim)) v[b][h][t], float32.

   q and out (batch, heads, queries, dim) contiguous; k and v (batch, heads, keys, dim)
   with each key's dim contiguous and keys adjacent, batch and head strides as given (a
   slice of a cache); `scores` scratch of batch * heads * queries * padded keys floats.
   `mask` (batch rows of `mask_stride` bytes, one query per row) leaves out the keys
   whose byte is 0. Each (batch, head) is one thread's. The sums over keys run in blocks
   of eight with the tail padded, and a left-out key is skipped, so a row's result is the
   same with keys masked beyond its position as with the keys cut there. */
void susurrus_attention(const float *q, const float *k, const float *v, const uint8_t *mask,
                        float *out, float *scores, int64_t batch, int64_t heads,
                        int64_t queries, int64_t keys, int64_t dim, int64_t k_batch,
                        int64_t k_head, int64_t v_batch, int64_t v_head, int64_t mask_stride,
                        int threads) {
    int64_t padded = (keys + 7) & ~(int64_t)7;
    float scale = 1.0f / sqrtf((float)dim);
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t bh = 0; bh < batch * heads; bh++) {
        int64_t b = bh / heads, h = bh % heads;
        const float *kb = k + b * k_batch + h * k_head, *vb = v + b * v_batch + h * v_head;
        const uint8_t *m = mask ? mask + b * mask_stride : 0;
        for (int64_t i = 0; i < queries; i++) {
            const float *qi = q + (bh * queries + i) * dim;
            float *s = scores + (bh * queries + i) * padded;
            float *o = out + (bh * queries + i) * dim;
            for (int64_t t = 0; t < keys; t++) {
                if (m && !m[t]) {
                    s[t] = -INFINITY;
                    continue;
                }
                const float *kt = kb + t * dim;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0;
                int64_t d = 0;
                for (; d + 16 <= dim; d += 16) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d), _mm256_loadu_ps(kt + d), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d + 8),
                                         _mm256_loadu_ps(kt + d + 8), a1);
                }
                for (; d < dim; d += 8)
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d), _mm256_loadu_ps(kt + d), a0);
                s[t] = sum8(_mm256_add_ps(a0, a1)) * scale;
            }
            for (int64_t t = keys; t < padded; t++) s[t] = -INFINITY;
            __m256 top = _mm256_set1_ps(-INFINITY);
            for (int64_t t = 0; t < padded; t += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + t));
            __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
            t4 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
            t4 = _mm_max_ss(t4, _mm_movehdup_ps(t4));
            __m256 most = _mm256_set1_ps(_mm_cvtss_f32(t4)), total = _mm256_setzero_ps();
            for (int64_t t = 0; t < padded; t += 8) {
                __m256 e = _ZGVdN8v_expf(_mm256_sub_ps(_mm256_loadu_ps(s + t), most));
                _mm256_storeu_ps(s + t, e);
                total = _mm256_add_ps(total, e);
            }
            __m256 sum = _mm256_set1_ps(sum8(total));
            for (int64_t t = 0; t < padded; t += 8)
                _mm256_storeu_ps(s + t, _mm256_div_ps(_mm256_loadu_ps(s + t), sum));
            for (int64_t d0 = 0; d0 < dim; d0 += 64) {
                int64_t width = dim - d0 < 64 ? dim - d0 : 64, lanes = width / 8;
                __m256 acc[8];
                for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
                for (int64_t t = 0; t < keys; t++) {
                    if (m && !m[t]) continue;
                    __m256 p = _mm256_set1_ps(s[t]);
                    const float *vt = vb + t * dim + d0;
                    if (lanes == 8) {
                        _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++)
                            acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * j), acc[j]);
                    } else {
                        for (int64_t j = 0; j < lanes; j++)
                            acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * j), acc[j]);
                    }
                }
                for (int64_t j = 0; j < lanes; j++) _mm256_storeu_ps(o + d0 + 8 * j, acc[j]);
            }
        }
    }
}
