/* A decoding step's products and attention, for the CPU (AVX2, FMA, F16C).

   Products of a few rows with a weight read once:

   y[r][o] = scale[o] * sum_i w[o][i] x[r][i] + bias[o], the weight int8 (one scale per
   output row) or float32 (no scale), the activations float32 and never rounded (see
   susurrus_int8_rows_q16 below for the products of int8 weights that decoding steps use).

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
#include <omp.h>
#include <stdint.h>

#define BLOCK 8 /* weight rows per block: 8 x 2048 int8 or float rows fit the L1 cache */

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* The largest of x[0..n) (-inf for none). */
static float row_max(const float *x, int64_t n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    float most = max8(m);
    for (; i < n; i++) most = x[i] > most ? x[i] : most;
    return most;
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
        int64_t out, int add) {                                                           \
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
            float v = t * s + b;                                                          \
            y[r * out] = add ? y[r * out] + v : v;                                        \
        }                                                                                 \
    }

GROUP(int8_t)
GROUP(float)

/* How many of the `left` input rows go together against each weight row: three at a
   time, then two (four as two and two: no group of one until the last row). */
static inline int row_group(int64_t left) { return left >= 3 && left != 4 ? 3 : left >= 2 ? 2 : 1; }

/* One block of weight rows against every input row, in groups of row_group's. */
#define BLOCK_ROWS(TYPE)                                                                  \
    static inline void block_##TYPE(const TYPE *w, const float *scale, const float *bias, \
                                    const float *x, float *y, int64_t out, int64_t in,    \
                                    int64_t rows, int64_t block, int add) {               \
        int64_t first = block * BLOCK, last = first + BLOCK < out ? first + BLOCK : out;  \
        int64_t r = 0;                                                                    \
        while (r < rows) {                                                                \
            int g = row_group(rows - r);                                                  \
            for (int64_t o = first; o < last; o++) {                                      \
                const TYPE *wo = w + o * in;                                              \
                float s = scale ? scale[o] : 1.0f, b = bias ? bias[o] : 0.0f;             \
                const float *xr = x + r * in;                                             \
                float *yr = y + r * out + o;                                              \
                if (g == 3) group_##TYPE(wo, xr, in, 3, s, b, yr, out, add);              \
                else if (g == 2) group_##TYPE(wo, xr, in, 2, s, b, yr, out, add);         \
                else group_##TYPE(wo, xr, in, 1, s, b, yr, out, add);                     \
            }                                                                             \
            r += g;                                                                       \
        }                                                                                 \
    }

BLOCK_ROWS(int8_t)
BLOCK_ROWS(float)

#define ROWS(NAME, TYPE)                                                                  \
    void NAME(const TYPE *w, const float *scale, const float *bias, const float *x,      \
              float *y, int64_t out, int64_t in, int64_t rows, int threads) {             \
        int64_t blocks = (out + BLOCK - 1) / BLOCK;                                       \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                 \
        for (int64_t block = 0; block < blocks; block++)                                  \
            block_##TYPE(w, scale, bias, x, y, out, in, rows, block, 0);                  \
    }

ROWS(susurrus_int8_rows, int8_t)
ROWS(susurrus_float_rows, float)

/* ---- int8 weights against activations rounded to 16 bits ----

   Converting each int8 weight to float32 for an FMA costs more than reading it: tiny.en's
   output projection (51865 x 384) takes 0.95 ms a row on one Zen 4 thread through the
   products above, 0.30 ms to read. Here each input row is rounded to int16, with a scale
   per QGROUP inputs (the group's largest |x| maps to 32767), and the weights are widened
   to int16 only: pairs of products summed in int32 (vpmaddwd), exact, then each group's
   sum scaled in float32: 0.57 ms. The rounding of the activations moves a product by
   about 3e-5 of its size, some 300 times less than the int8 rounding of the weights does.
   Sums are integers within a group and in one fixed order across groups, so a row's
   results still depend neither on the rows beside it nor on the thread count. */
#define QGROUP 128

/* x (in floats, a multiple of QGROUP) as int16 q, with each group's scale in s. */
static void quantize_row(const float *x, int64_t in, int16_t *q, float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t g = 0; g < in; g += QGROUP) {
        __m256 m = _mm256_setzero_ps();
        for (int64_t i = g; i < g + QGROUP; i += 8)
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
        float most = max8(m);
        __m256 inverse = _mm256_set1_ps(most > 0.0f ? 32767.0f / most : 0.0f);
        s[g / QGROUP] = most / 32767.0f;
        for (int64_t i = g; i < g + QGROUP; i += 16) {
            /* Rounded to nearest (the default mode); packing saturates the last ulp. */
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inverse));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), inverse));
            _mm256_storeu_si256((__m256i *)(q + i),
                                _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
        }
    }
}

/* One int8 weight row `wo` against `g` (1-3) rounded input rows q, q + in, ... with group
   scales qs, qs + in / QGROUP, ...; results to y, y + out, ... */
static inline __attribute__((always_inline)) void group_q16(const int8_t *wo, const int16_t *q,
                                                            const float *qs, int64_t in, int g,
                                                            float s, float b, float *y,
                                                            int64_t out, int add) {
    int64_t groups = in / QGROUP;
    __m256 f[3];
    _Pragma("GCC unroll 3") for (int r = 0; r < g; r++) f[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < groups; k++) {
        const int8_t *wk = wo + k * QGROUP;
        const int16_t *qk = q + k * QGROUP;
        __m256i a[3];
        _Pragma("GCC unroll 3") for (int r = 0; r < g; r++) a[r] = _mm256_setzero_si256();
        _Pragma("GCC unroll 8") for (int64_t i = 0; i < QGROUP; i += 16) {
            __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wk + i)));
            _Pragma("GCC unroll 3") for (int r = 0; r < g; r++)
                a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(
                    w, _mm256_loadu_si256((const __m256i *)(qk + r * in + i))));
        }
        _Pragma("GCC unroll 3") for (int r = 0; r < g; r++)
            f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]), _mm256_set1_ps(qs[r * groups + k]),
                                   f[r]);
    }
    _Pragma("GCC unroll 3") for (int r = 0; r < g; r++) {
        float v = sum8(f[r]) * s + b;
        y[r * out] = add ? y[r * out] + v : v;
    }
}

/* group_q16 on AVX512-VNNI: 32 pairs of products a row per instruction (vpdpwssd sums them
   into the int32 lanes itself), a group's 16 lanes then scaled in float32. Built for any
   x86-64 (the target attribute), run only where the CPU has it (q16_vnni). */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline __attribute__((always_inline)) VNNI void group_q16_vnni(
    const int8_t *wo, const int16_t *q, const float *qs, int64_t in, int g, float s, float b,
    float *y, int64_t out, int add) {
    int64_t groups = in / QGROUP;
    __m512 f[3];
    _Pragma("GCC unroll 3") for (int r = 0; r < g; r++) f[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < groups; k++) {
        const int8_t *wk = wo + k * QGROUP;
        const int16_t *qk = q + k * QGROUP;
        __m512i a[3];
        _Pragma("GCC unroll 3") for (int r = 0; r < g; r++) a[r] = _mm512_setzero_si512();
        _Pragma("GCC unroll 4") for (int64_t i = 0; i < QGROUP; i += 32) {
            __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wk + i)));
            _Pragma("GCC unroll 3") for (int r = 0; r < g; r++)
                a[r] = _mm512_dpwssd_epi32(a[r], w, _mm512_loadu_si512(qk + r * in + i));
        }
        _Pragma("GCC unroll 3") for (int r = 0; r < g; r++)
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r]), _mm512_set1_ps(qs[r * groups + k]),
                                   f[r]);
    }
    _Pragma("GCC unroll 3") for (int r = 0; r < g; r++) {
        float v = _mm512_reduce_add_ps(f[r]) * s + b;
        y[r * out] = add ? y[r * out] + v : v;
    }
}

/* One block of weight rows against every rounded input row, in groups of row_group's,
   through GROUP (group_q16 or group_q16_vnni), as NAME with the attributes ATTR. */
#define BLOCK_Q16(NAME, GROUP, ATTR)                                                      \
    static ATTR void NAME(const int8_t *w, const float *scale, const float *bias,         \
                          const int16_t *q, const float *qs, float *y, int64_t out,       \
                          int64_t in, int64_t rows, int64_t block, int add) {             \
        int64_t first = block * BLOCK, last = first + BLOCK < out ? first + BLOCK : out;  \
        int64_t groups = in / QGROUP, r = 0;                                              \
        while (r < rows) {                                                                \
            int g = row_group(rows - r);                                                  \
            for (int64_t o = first; o < last; o++) {                                      \
                const int8_t *wo = w + o * in;                                            \
                float s = scale[o], b = bias ? bias[o] : 0.0f;                            \
                const int16_t *qr = q + r * in;                                           \
                const float *sr = qs + r * groups;                                        \
                float *yr = y + r * out + o;                                              \
                if (g == 3) GROUP(wo, qr, sr, in, 3, s, b, yr, out, add);                 \
                else if (g == 2) GROUP(wo, qr, sr, in, 2, s, b, yr, out, add);            \
                else GROUP(wo, qr, sr, in, 1, s, b, yr, out, add);                        \
            }                                                                             \
            r += g;                                                                       \
        }                                                                                 \
    }

BLOCK_Q16(block_q16_avx2, group_q16, inline)
BLOCK_Q16(block_q16_vnni, group_q16_vnni, VNNI)

/* Whether the 16-bit products take the AVX512-VNNI version: where the CPU has it, unless
   switched off (susurrus_q16_vnni). One choice for the process, made as the library loads
   (before any product), so that its numbers are one kernel's. */
static int q16_vnni_able, q16_vnni;

__attribute__((constructor)) static void find_q16_vnni(void) {
    __builtin_cpu_init();
    q16_vnni_able = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vnni");
    q16_vnni = q16_vnni_able;
}

/* on: 1 (where the CPU has it) or 0; -1 leaves it. Returns whether it is on. */
int susurrus_q16_vnni(int on) {
    if (on >= 0) q16_vnni = on && q16_vnni_able;
    return q16_vnni;
}

/* One block of weight rows against every rounded input row: the version the CPU takes. */
static inline void block_q16(const int8_t *w, const float *scale, const float *bias,
                             const int16_t *q, const float *qs, float *y, int64_t out,
                             int64_t in, int64_t rows, int64_t block, int add) {
    if (q16_vnni > 0)
        block_q16_vnni(w, scale, bias, q, qs, y, out, in, rows, block, add);
    else
        block_q16_avx2(w, scale, bias, q, qs, y, out, in, rows, block, add);
}

/* Numbers (as floats) a thread's rounded copy of `rows` input rows of `in` takes. */
static inline int64_t quantized_floats(int64_t rows, int64_t in) {
    return rows * (in / 2 + in / QGROUP) + 16;
}

/* susurrus_int8_rows with the activations rounded to 16 bits (where `in` is a multiple of
   QGROUP; else it is susurrus_int8_rows); `work`: quantized_floats(rows, in) floats. */
void susurrus_int8_rows_q16(const int8_t *w, const float *scale, const float *bias,
                            const float *x, float *y, int64_t out, int64_t in, int64_t rows,
                            float *work, int threads) {
    if (in % QGROUP) {
        susurrus_int8_rows(w, scale, bias, x, y, out, in, rows, threads);
        return;
    }
    int16_t *q = (int16_t *)work;
    float *qs = work + rows * in / 2;
    for (int64_t r = 0; r < rows; r++) quantize_row(x + r * in, in, q + r * in, qs + r * (in / QGROUP));
    int64_t blocks = (out + BLOCK - 1) / BLOCK;
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t block = 0; block < blocks; block++)
        block_q16(w, scale, bias, q, qs, y, out, in, rows, block, 0);
}

int64_t susurrus_quantized_floats(int64_t rows, int64_t in) { return quantized_floats(rows, in); }

/* glibc's vector expf (libmvec), within 4 ulp as its scalar one. */
extern __m256 _ZGVdN8v_expf(__m256 x);

/* Eight keys' or values' numbers from p + i: float32, or float16 (`half`) widened
   exactly to float32 (F16C). */
static inline __attribute__((always_inline)) __m256 load8(const void *p, int64_t i, int half) {
    if (half)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

/* One query qi over `keys` keys at kb and values at vb (each key's dim numbers adjacent,
   float32 or float16 as `half` says: the arithmetic is float32 either way), leaving out
   keys whose mask byte is 0 (m may be NULL); s: scratch of the keys padded to eight; the
   result to o. Inlined into one function per type below, `half` a constant in each. */
static inline __attribute__((always_inline)) void attend(const float *qi, const void *kb,
                                                         const void *vb, int half,
                                                         const uint8_t *m, int64_t keys,
                                                         int64_t dim, float scale, float *s,
                                                         float *o) {
    int64_t padded = (keys + 7) & ~(int64_t)7;
    for (int64_t t = 0; t < keys; t++) {
        if (m && !m[t]) {
            s[t] = -INFINITY;
            continue;
        }
        int64_t kt = t * dim;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        int64_t d = 0;
        for (; d + 16 <= dim; d += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d), load8(kb, kt + d, half), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d + 8), load8(kb, kt + d + 8, half), a1);
        }
        for (; d < dim; d += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d), load8(kb, kt + d, half), a0);
        s[t] = sum8(_mm256_add_ps(a0, a1)) * scale;
    }
    for (int64_t t = keys; t < padded; t++) s[t] = -INFINITY;
    __m256 most = _mm256_set1_ps(row_max(s, padded)), total = _mm256_setzero_ps();
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
            int64_t vt = t * dim + d0;
            if (lanes == 8) {
                _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++)
                    acc[j] = _mm256_fmadd_ps(p, load8(vb, vt + 8 * j, half), acc[j]);
            } else {
                for (int64_t j = 0; j < lanes; j++)
                    acc[j] = _mm256_fmadd_ps(p, load8(vb, vt + 8 * j, half), acc[j]);
            }
        }
        for (int64_t j = 0; j < lanes; j++) _mm256_storeu_ps(o + d0 + 8 * j, acc[j]);
    }
}

static void attend_query(const float *qi, const float *kb, const float *vb, const uint8_t *m,
                         int64_t keys, int64_t dim, float scale, float *s, float *o) {
    attend(qi, kb, vb, 0, m, keys, dim, scale, s, o);
}

static void attend_query_half(const float *qi, const uint16_t *kb, const uint16_t *vb,
                              const uint8_t *m, int64_t keys, int64_t dim, float scale,
                              float *s, float *o) {
    attend(qi, kb, vb, 1, m, keys, dim, scale, s, o);
}

/* Either of the two, as `half` says. */
static void attend_any(const float *qi, const void *kb, const void *vb, int half,
                       const uint8_t *m, int64_t keys, int64_t dim, float scale, float *s,
                       float *o) {
    if (half)
        attend_query_half(qi, kb, vb, m, keys, dim, scale, s, o);
    else
        attend_query(qi, kb, vb, m, keys, dim, scale, s, o);
}

/* Attention of a step's queries over keys and values read once:
   out[b][h][i] = softmax_t(q[b][h][i] . k[b][h][t] / sqrt(dim)) v[b][h][t], float32.

   q and out (batch, heads, queries, dim) contiguous; k and v (batch, heads, keys, dim),
   float32 or float16 (`half`: kept narrow for their memory, widened as read), with each
   key's dim contiguous and keys adjacent, batch and head strides (in numbers) as given (a
   slice of a cache); `scores` scratch of batch * heads * queries * padded keys floats.
   `mask` (batch rows of `mask_stride` bytes, one query per row) leaves out the keys
   whose byte is 0. Each (batch, head) is one thread's. The sums over keys run in blocks
   of eight with the tail padded, and a left-out key is skipped, so a row's result is the
   same with keys masked beyond its position as with the keys cut there. */
void susurrus_attention(const float *q, const void *k, const void *v, const uint8_t *mask,
                        float *out, float *scores, int64_t batch, int64_t heads,
                        int64_t queries, int64_t keys, int64_t dim, int64_t k_batch,
                        int64_t k_head, int64_t v_batch, int64_t v_head, int64_t mask_stride,
                        int half, int threads) {
    int64_t padded = (keys + 7) & ~(int64_t)7, size = half ? 2 : 4;
    float scale = 1.0f / sqrtf((float)dim);
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t bh = 0; bh < batch * heads; bh++) {
        int64_t b = bh / heads, h = bh % heads;
        const char *kb = (const char *)k + (b * k_batch + h * k_head) * size;
        const char *vb = (const char *)v + (b * v_batch + h * v_head) * size;
        const uint8_t *m = mask ? mask + b * mask_stride : 0;
        for (int64_t i = 0; i < queries; i++)
            attend_any(q + (bh * queries + i) * dim, kb, vb, half, m, keys, dim, scale,
                       scores + (bh * queries + i) * padded, out + (bh * queries + i) * dim);
    }
}

/* ---- The leading logits again, from a finer copy of the weights ----

   For each row of `logits` (rows x n, from int8 weights), the k largest are computed again
   as hidden . (w1 * s1 + w2 * s2): the int8 weight row and a second int8 row holding its
   rounding error. A top-k scan of 8 lanes at a time against the k-th value found so far
   (few lanes ever pass it), then k dot products. Ties keep the lower index. Each row on
   its own (one thread each), in the same order whatever the rows beside it. */
void susurrus_exact_top(const float *hidden, float *logits, const int8_t *w1, const float *s1,
                        const int8_t *w2, const float *s2, int64_t rows, int64_t n,
                        int64_t width, int64_t k, int64_t *found, int threads) {
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t r = 0; r < rows; r++) {
        const float *x = logits + r * n;
        int64_t *top = found + r * k;
        float value[64];
        int64_t have = 0;
        float least = -INFINITY; /* the k-th largest so far, once k are held */
        for (int64_t j = 0; j < n; j += 8) {
            int lanes;
            if (j + 8 <= n) {
                __m256 v = _mm256_loadu_ps(x + j);
                lanes = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(least), _CMP_GT_OQ));
                if (have < k) lanes = 0xff;
            } else {
                lanes = (1 << (n - j)) - 1;
            }
            while (lanes) {
                int lane = __builtin_ctz(lanes);
                lanes &= lanes - 1;
                float y = x[j + lane];
                if (!(y > least) && have == k) continue;
                if (y != y) continue; /* NaN */
                int64_t at = have < k ? have++ : k - 1; /* insert, dropping the k-th */
                while (at > 0 && value[at - 1] < y) {
                    value[at] = value[at - 1];
                    top[at] = top[at - 1];
                    at--;
                }
                value[at] = y;
                top[at] = j + lane;
                if (have == k) least = value[k - 1];
            }
        }
        for (int64_t i = 0; i < have; i++) {
            const int8_t *a = w1 + top[i] * width, *b = w2 + top[i] * width;
            const float *h = hidden + r * width;
            __m256 sa = _mm256_setzero_ps(), sb = _mm256_setzero_ps();
            for (int64_t c = 0; c < width; c += 8) {
                __m256 hv = _mm256_loadu_ps(h + c);
                sa = _mm256_fmadd_ps(load_int8_t(a + c), hv, sa);
                sb = _mm256_fmadd_ps(load_int8_t(b + c), hv, sb);
            }
            logits[r * n + top[i]] = sum8(sa) * s1[top[i]] + sum8(sb) * s2[top[i]];
        }
        for (int64_t i = have; i < k; i++) top[i] = -1;
    }
}

/* ---- A whole decoding step of the decoder in one call ----

   Every layer of every row, one position per row, in one parallel region: each phase
   (layer norm, product, attention) is shared between the threads and ends at a barrier.
   A step through PyTorch makes about twelve operator calls a layer, each of which costs
   more than its arithmetic on a small model (and wakes the threads again); here they are
   loops. The arithmetic is the kernels' above, in the same order: a product's sums as
   susurrus_int8_rows_q16' / susurrus_float_rows', an attention's as susurrus_attention's. */

typedef struct {
    const void *weight; /* (out, in): int8 where `scale` is set, else float32 */
    const float *scale, *bias; /* per output; either may be NULL */
    int64_t out, in;
} susurrus_linear;

typedef struct {
    const float *attn_ln_w, *attn_ln_b, *cross_ln_w, *cross_ln_b, *mlp_ln_w, *mlp_ln_b;
    susurrus_linear qkv, out, cross_query, cross_out, fc1, fc2;
    void *self_k, *self_v; /* (rows, heads, length, dim), float32 or float16: this step's
                              keys are written */
    const void *cross_k, *cross_v; /* (audios, heads, frames, dim), float32 or float16 */
} susurrus_layer;

typedef struct {
    int64_t rows, state, heads, layers, frames;
    int64_t self_row, self_head; /* strides (numbers) of every self_k / self_v */
    int64_t self_half; /* 1: self_k / self_v hold float16 */
    int64_t cross_audio, cross_head; /* strides (numbers) of every cross_k / cross_v */
    int64_t cross_half; /* 1: cross_k / cross_v hold float16 */
    const int64_t *positions; /* per row: where its key goes, and the last it attends */
    const int64_t *tasks; /* n_tasks x (audio, first row, rows): rows that read one audio */
    int64_t n_tasks;
    const float *ln_w, *ln_b; /* the decoder's final layer norm */
    float eps;
    float *x; /* (rows, state): the embedded tokens in, the final normed states out */
    float *work; /* scratch: rows * 10 * state + threads * (scratch + quant) floats */
    int64_t scratch; /* a thread's scores: the most keys (frames or positions), padded */
    const susurrus_layer *layer;
    int threads;
    int64_t quant; /* a thread's rounded input rows (quantized_floats), after the scores */
} susurrus_step;

/* y = LayerNorm(x) over n features: mean, then the variance of the centred values. */
static void layer_norm_row(const float *x, const float *w, const float *b, float eps, int64_t n,
                           float *y) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
    float total = sum8(acc);
    for (; i < n; i++) total += x[i];
    float mean = total / (float)n;
    __m256 m = _mm256_set1_ps(mean);
    acc = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), m);
        acc = _mm256_fmadd_ps(d, d, acc);
    }
    float squares = sum8(acc);
    for (; i < n; i++) squares += (x[i] - mean) * (x[i] - mean);
    float rstd = 1.0f / sqrtf(squares / (float)n + eps);
    for (i = 0; i < n; i++) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

static void layer_norm_rows(const float *x, const float *w, const float *b, float eps,
                            int64_t rows, int64_t n, float *y) {
    _Pragma("omp for schedule(static)")
    for (int64_t r = 0; r < rows; r++) layer_norm_row(x + r * n, w, b, eps, n, y + r * n);
}

/* glibc's vector erff (libmvec). */
extern __m256 _ZGVdN8v_erff(__m256 x);

/* The exact GELU, x (1 + erf(x / sqrt 2)) / 2, on n floats. */
static void gelu(float *y, int64_t n) {
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f),
                 root = _mm256_set1_ps((float)M_SQRT1_2);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(y + i);
        __m256 e = _ZGVdN8v_erff(_mm256_mul_ps(v, root));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, e)));
    }
    for (; i < n; i++) y[i] = 0.5f * y[i] * (1.0f + erff(y[i] * (float)M_SQRT1_2));
}

enum { STORE, ADD, GELU };

/* y (rows, out) = x (rows, in) l, stored, added to y, or through the GELU; the blocks of
   weight rows shared between the threads. An int8 weight takes the input rows rounded to
   16 bits as susurrus_int8_rows_q16 does, each thread rounding them into its own `q`
   (a few microseconds: cheaper than a barrier). */
static void linear(const susurrus_linear *l, const float *x, float *y, int64_t rows, int mode,
                   float *q) {
    int64_t blocks = (l->out + BLOCK - 1) / BLOCK, in = l->in;
    int rounded = l->scale && in % QGROUP == 0;
    float *qs = q + rows * in / 2;
    if (rounded)
        for (int64_t r = 0; r < rows; r++)
            quantize_row(x + r * in, in, (int16_t *)q + r * in, qs + r * (in / QGROUP));
    _Pragma("omp for schedule(static)")
    for (int64_t block = 0; block < blocks; block++) {
        if (rounded)
            block_q16(l->weight, l->scale, l->bias, (const int16_t *)q, qs, y, l->out, in, rows,
                      block, mode == ADD);
        else if (l->scale)
            block_int8_t(l->weight, l->scale, l->bias, x, y, l->out, in, rows, block, mode == ADD);
        else
            block_float(l->weight, NULL, l->bias, x, y, l->out, in, rows, block, mode == ADD);
        if (mode == GELU) {
            int64_t first = block * BLOCK, width = (first + BLOCK < l->out ? BLOCK : l->out - first);
            for (int64_t r = 0; r < rows; r++) gelu(y + r * l->out + first, width);
        }
    }
}

void susurrus_decoder_step(const susurrus_step *a) {
    const int64_t rows = a->rows, n = a->state, heads = a->heads, dim = n / heads;
    const float scale = 1.0f / sqrtf((float)dim);
    float *h = a->work, *qkv = h + rows * n, *att = qkv + rows * 3 * n, *mlp = att + rows * n,
          *scores = mlp + rows * 4 * n;
    _Pragma("omp parallel num_threads(a->threads)")
    {
        float *s = scores + (int64_t)omp_get_thread_num() * a->scratch;
        float *q = scores + (int64_t)a->threads * a->scratch +
                   (int64_t)omp_get_thread_num() * a->quant;
        for (int64_t i = 0; i < a->layers; i++) {
            const susurrus_layer *l = a->layer + i;
            layer_norm_rows(a->x, l->attn_ln_w, l->attn_ln_b, a->eps, rows, n, h);
            linear(&l->qkv, h, qkv, rows, STORE, q);
            /* Each (row, head) writes its key and value, then attends to its positions up
               to its own: nobody else reads that row's cache in this phase. */
            _Pragma("omp for schedule(static)")
            for (int64_t rh = 0; rh < rows * heads; rh++) {
                int64_t r = rh / heads, hd = rh % heads, p = a->positions[r];
                const float *qr = qkv + r * 3 * n + hd * dim;
                int64_t at = r * a->self_row + hd * a->self_head;
                if (a->self_half) {
                    /* Rounded to the nearest float16 (ties to even), as PyTorch's cast. */
                    uint16_t *kc = (uint16_t *)l->self_k + at, *vc = (uint16_t *)l->self_v + at;
                    for (int64_t d = 0; d < dim; d += 8) {
                        _mm_storeu_si128((__m128i *)(kc + p * dim + d),
                                         _mm256_cvtps_ph(_mm256_loadu_ps(qr + n + d),
                                                         _MM_FROUND_TO_NEAREST_INT));
                        _mm_storeu_si128((__m128i *)(vc + p * dim + d),
                                         _mm256_cvtps_ph(_mm256_loadu_ps(qr + 2 * n + d),
                                                         _MM_FROUND_TO_NEAREST_INT));
                    }
                    attend_query_half(qr, kc, vc, NULL, p + 1, dim, scale, s,
                                      att + r * n + hd * dim);
                } else {
                    float *kc = (float *)l->self_k + at, *vc = (float *)l->self_v + at;
                    for (int64_t d = 0; d < dim; d++) {
                        kc[p * dim + d] = qr[n + d];
                        vc[p * dim + d] = qr[2 * n + d];
                    }
                    attend_query(qr, kc, vc, NULL, p + 1, dim, scale, s, att + r * n + hd * dim);
                }
            }
            linear(&l->out, att, a->x, rows, ADD, q);
            layer_norm_rows(a->x, l->cross_ln_w, l->cross_ln_b, a->eps, rows, n, h);
            linear(&l->cross_query, h, qkv, rows, STORE, q);
            /* A task's rows (a window's beams) are its audio's queries: its keys and values
               are read from memory once for them all. */
            _Pragma("omp for schedule(static)")
            for (int64_t th = 0; th < a->n_tasks * heads; th++) {
                const int64_t *task = a->tasks + 3 * (th / heads);
                int64_t hd = th % heads;
                int64_t at = (task[0] * a->cross_audio + hd * a->cross_head) *
                             (a->cross_half ? 2 : 4);
                const char *kb = (const char *)l->cross_k + at, *vb = (const char *)l->cross_v + at;
                for (int64_t r = task[1]; r < task[1] + task[2]; r++)
                    attend_any(qkv + r * n + hd * dim, kb, vb, (int)a->cross_half, NULL,
                               a->frames, dim, scale, s, att + r * n + hd * dim);
            }
            linear(&l->cross_out, att, a->x, rows, ADD, q);
            layer_norm_rows(a->x, l->mlp_ln_w, l->mlp_ln_b, a->eps, rows, n, h);
            linear(&l->fc1, h, mlp, rows, GELU, q);
            linear(&l->fc2, mlp, a->x, rows, ADD, q);
        }
        layer_norm_rows(a->x, a->ln_w, a->ln_b, a->eps, rows, n, h);
        _Pragma("omp single")
        for (int64_t i = 0; i < rows * n; i++) a->x[i] = h[i];
    }
}

/* ---- the token rules' timestamp part, and the greedy pick, per row of a step's logits ----

   In PyTorch these are some twenty operations over the vocabulary per step, each a
   dispatch and a pass over 200 KB (about 0.3 ms a step in the loop on a Zen 5, a tenth of
   a tiny.en step). Here they are fills of ranges and two reductions, on one thread: a
   row's numbers never depend on the thread count. */

static void fill_inf(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = -INFINITY;
}

/* log(sum(exp(x[0..n) - most))), given their largest `most` (not -inf). Blocks of 256
   summed in float32, the blocks in double: a plain float32 sum of 50,000 terms would be
   off by a few 1e-6 of it, more than PyTorch's cascaded sums are. */
static float row_log_sum(const float *x, int64_t n, float most) {
    __m256 m = _mm256_set1_ps(most);
    double sum = 0.0;
    int64_t i = 0;
    while (i + 8 <= n) {
        __m256 block = _mm256_setzero_ps();
        for (int64_t end = i + 256 < n ? i + 256 : n; i + 8 <= end; i += 8)
            block = _mm256_add_ps(block, _ZGVdN8v_expf(_mm256_sub_ps(_mm256_loadu_ps(x + i), m)));
        sum += sum8(block);
    }
    for (; i < n; i++) sum += expf(x[i] - most);
    return (float)log(sum);
}

/* The reference's timestamp rules on each row of logits (rows, vocab) whose `timestamps`
   byte is set, in place, from what the row has sampled: `sampled` tokens, whether the
   last two were timestamps (`last`, `penult`: bytes), its latest timestamp token
   (`latest`, -1 for none) and the latest index a first timestamp may take (`initial`, -1:
   no limit). tb: the first timestamp token; eot: end of text. engine/search.py's
   RowRules.apply is the same in PyTorch operations. */
void susurrus_timestamp_rules(float *logits, int64_t rows, int64_t vocab, int64_t tb,
                              int64_t eot, int64_t no_timestamps, const int64_t *sampled,
                              const uint8_t *last, const uint8_t *penult,
                              const int64_t *latest, const uint8_t *timestamps,
                              const int64_t *initial) {
    int64_t stamps = vocab - tb;
    for (int64_t r = 0; r < rows; r++) {
        if (!timestamps[r]) continue;
        float *x = logits + r * vocab;
        x[no_timestamps] = -INFINITY;
        int was_ts = sampled[r] > 0 && last[r];
        /* With one token sampled there is no penultimate: it counts as a timestamp. */
        int before_ts = sampled[r] > 0 && (sampled[r] > 1 ? penult[r] : 1);
        /* Timestamps come in pairs: after a closing pair only text, after one only a
           timestamp (or the end). */
        if (was_ts && before_ts) fill_inf(x + tb, stamps);
        if (was_ts && !before_ts) fill_inf(x, eot);
        /* Timestamps never go back; a new segment must start after the last one ended. */
        if (latest[r] >= tb) {
            int64_t floor = (was_ts && !before_ts ? latest[r] : latest[r] + 1) - tb;
            fill_inf(x + tb, floor < stamps ? floor : stamps);
        }
        if (sampled[r] == 0) {
            fill_inf(x, tb);
            if (initial[r] >= 0 && initial[r] + 1 < stamps)
                fill_inf(x + tb + initial[r] + 1, stamps - initial[r] - 1);
        }
        /* When the timestamps together outweigh every single text token, emit a timestamp
           (log-probabilities compared without their common normaliser). */
        float top = row_max(x + tb, stamps);
        float mass = top == -INFINITY ? -INFINITY : top + row_log_sum(x + tb, stamps, top);
        if (mass > row_max(x, tb)) fill_inf(x, tb);
    }
}

/* The log-probability (the logit less the row's log-sum-exp) of token best[r] of each row
   to `logprob`; with `pick` set, best[r] is first set to the row's largest logit's index
   (the first of equals). */
void susurrus_log_probs(const float *logits, int64_t rows, int64_t vocab, int pick,
                        int64_t *best, float *logprob) {
    for (int64_t r = 0; r < rows; r++) {
        const float *x = logits + r * vocab;
        float most = row_max(x, vocab);
        int64_t at = 0;
        if (pick) {
            while (at < vocab - 1 && !(x[at] == most)) at++;
            best[r] = at;
        }
        at = best[r];
        /* As log_softmax takes it: (x - max) - log(sum(exp(x - max))). */
        logprob[r] = most == -INFINITY ? NAN : (x[at] - most) - row_log_sum(x, vocab, most);
    }
}
