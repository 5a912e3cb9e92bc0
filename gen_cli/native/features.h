/* What the compiler targets, tested once: every other file asks for GEN_* and never for a compiler's own
 * ISA macro. The kernel is built with -march=native, so no vector ISA is assumed: each GEN_* path has a
 * portable fallback, and the tests build the AVX-512, AVX2 and portable variants.
 */
#ifndef GEN_FEATURES_H
#define GEN_FEATURES_H

#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __AVX512F__
#define GEN_AVX512 1 /* fp32 dot products, attention's vector path */
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GEN_AVX512_BW 1 /* masked 16-bit loads, byte ops on 512-bit vectors */
#endif
#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define GEN_VNNI 1 /* int16 dot products (vpdpwssd): int8 matrices and quantized K */
#endif
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define GEN_AVX512_BF16 1 /* fp32 -> bf16 conversion in one instruction */
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define GEN_AVX2_FMA 1 /* 256-bit float FMAs: the float-activation block products without AVX-512 */
#endif
#ifdef __F16C__
#define GEN_F16C 1 /* fp16 block scales converted in one instruction */
#endif
/* GGML block dot products: VNNI's dpbusd with VBMI's byte permutes, else AVX2's maddubs, else plain loops. */
#if defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VBMI__)
#define GEN_BLOCKS_512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define GEN_BLOCKS_256 1
#endif

#define GEN_ALWAYS_INLINE static inline __attribute__((always_inline))

/* The calling thread's number in its OpenMP team (0 without OpenMP): which per-thread buffer is its own. */
static inline int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}
/* GCC 12 vectorizes some signed byte loops into vpdpbusd, which reads one operand as unsigned: such loops
 * opt out of the vectorizer. */
#if defined(__GNUC__) && !defined(__clang__)
#define GEN_NO_VECTORIZE __attribute__((optimize("no-tree-vectorize")))
#else
#define GEN_NO_VECTORIZE
#endif

#ifdef GEN_AVX2_FMA
/* The sum of a 256-bit vector's 8 floats (matmul's fp32 rows, attention's AVX2 path, the AVX2 block products). */
static inline float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* e^x for x <= 0, 8 lanes (attention's AVX2 softmax, a prompt's tiles): attention.h's exp16 steps. Below -87 it
 * returns e^-87 rather than a subnormal (2^n is built in the exponent bits, which hold no n < -126). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

#endif
