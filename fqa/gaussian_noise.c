/* Counter-based N(0, 1) noise for the CPU (fqa/gaussian_noise.py compiles and loads it).
 *
 * Word w of the stream with key (k0, k1) is hash(w) = mix32(mix32(w ^ k0) ^ k1), the
 * hash fqa/noise.py uses for spsa's signs. Value e of a draw that starts at word s is
 * one half of a Box-Muller pair on the words s + 2(e/2) and s + 2(e/2) + 1:
 *   r = sqrt(-2 ln u1), u1 = (hi24(a) + 1/2) / 2^24;   θ = 2π hi24(b) / 2^24
 *   value 2p = r cos θ,  value 2p + 1 = r sin θ  (as cos(θ − π/2)).
 * No state: any part of any stream is computed from its key and offset alone, in
 * blocks that the compiler turns into vector code (glibc's vector logf and cosf). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define BLOCK 256

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x5BD1E995u;
    return x ^ (x >> 16);
}

void fqa_fill_normal(float *restrict out, size_t n, uint32_t start, uint32_t k0, uint32_t k1) {
    float u1[BLOCK], u2[BLOCK], c[BLOCK], s[BLOCK];
    size_t pairs = (n + 1) / 2;
    for (size_t p0 = 0; p0 < pairs; p0 += BLOCK) {
        size_t m = pairs - p0 < BLOCK ? pairs - p0 : BLOCK;
        for (size_t j = 0; j < BLOCK; j++) {  /* whole blocks: a fixed trip count vectorises */
            uint32_t w = start + 2u * (uint32_t)(p0 + j);
            uint32_t a = mix32(mix32(w ^ k0) ^ k1), b = mix32(mix32((w + 1u) ^ k0) ^ k1);
            u1[j] = ((float)(a >> 8) + 0.5f) * 0x1.0p-24f;
            u2[j] = (float)(b >> 8) * 0x1.0p-24f;
        }
        for (size_t j = 0; j < BLOCK; j++) {
            float r = sqrtf(-2.0f * logf(u1[j]));
            float theta = 6.28318530717958648f * u2[j];
            c[j] = r * cosf(theta);
            s[j] = r * cosf(theta - 1.57079632679489662f);
        }
        size_t base = 2 * p0;
        for (size_t j = 0; j < m; j++) {
            out[base + 2 * j] = c[j];
            if (base + 2 * j + 1 < n) out[base + 2 * j + 1] = s[j];
        }
    }
}
