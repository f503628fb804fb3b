/* Fused CPU loops for the blockwise scaled sign codec (ddp_hooks.native).
 *
 * Plain C99, no Python or torch headers: ddp_hooks.native compiles this file with the system C
 * compiler on first use and calls it through ctypes (which releases the GIL). Every function
 * works on a half-open element range [lo, hi) so that callers can split a bucket over threads.
 * The semantics are those of the torch reference in ddp_hooks/compress/sign.py:
 *   sign bit of x is 1 iff x >= 0 (so +0, -0 -> 1, NaN -> 0); packed 8 per byte, LSB first;
 *   C(x)_i = +s_b if bit else -s_b, with s_b the block's mean |x| summed in double.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The input of the compressor, one pass:
 *   mode 0: p = g + rho * e
 *   mode 1: m_new = g + mu * m;  p = m_new + rho * e
 *   mode 2: m_new = g + mu * m;  p = g + mu * m_new + rho * e      (Nesterov)
 * e may be NULL (no error term). */
void dh_ef_input(int64_t lo, int64_t hi, const float *g, const float *m, float *m_new, float mu, int mode,
                 const float *e, float rho, float *p) {
    if (mode == 0) {
        if (e) for (int64_t i = lo; i < hi; ++i) p[i] = g[i] + rho * e[i];
        else for (int64_t i = lo; i < hi; ++i) p[i] = g[i];
        return;
    }
    for (int64_t i = lo; i < hi; ++i) {
        float mn = g[i] + mu * m[i];
        float v = mode == 2 ? g[i] + mu * mn : mn;
        m_new[i] = mn;
        p[i] = e ? v + rho * e[i] : v;
    }
}

/* sum |x_i| over [lo, hi) in double, with 8 independent accumulators added in a fixed order */
static double abs_sum(const float *x, int64_t lo, int64_t hi) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8)
        for (int k = 0; k < 8; ++k) acc[k] += (double)fabsf(x[i + k]);
    double tail = 0;
    for (; i < hi; ++i) tail += (double)fabsf(x[i]);
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

/* Partial block sums: for each block b (bounds[b] .. bounds[b+1]) the sum of |x| over its
 * intersection with [lo, hi), written to sums[b] (0 for blocks outside). */
void dh_block_abs_sums(int64_t lo, int64_t hi, const float *x, int64_t nblocks, const int64_t *bounds,
                       double *sums) {
    for (int64_t b = 0; b < nblocks; ++b) {
        int64_t a = bounds[b] > lo ? bounds[b] : lo;
        int64_t z = bounds[b + 1] < hi ? bounds[b + 1] : hi;
        sums[b] = a < z ? abs_sum(x, a, z) : 0.0;
    }
}

/* SIGNS[b][k] = +1 if bit k of byte b is set, else -1; filled by dh_init, which the loader
 * calls once before any other function. */
static float SIGNS[256][8];

void dh_init(void) {
    for (int b = 0; b < 256; ++b)
        for (int k = 0; k < 8; ++k) SIGNS[b][k] = ((b >> k) & 1) ? 1.0f : -1.0f;
}

/* Pack x >= 0 of elements [lo, hi) (lo a multiple of 8) into bytes lo/8 ..; elements at or
 * beyond n are padding (bit 1). */
void dh_pack_signs(int64_t lo, int64_t hi, int64_t n, const float *x, uint8_t *packed) {
    int64_t i = lo;
    for (; i + 8 <= hi && i + 8 <= n; i += 8) {
        unsigned byte = 0;
        for (int k = 0; k < 8; ++k) byte |= (unsigned)(x[i + k] >= 0.0f) << k;
        packed[i >> 3] = (uint8_t)byte;
    }
    for (; i < hi; i += 8) {
        unsigned byte = 0;
        for (int k = 0; k < 8; ++k) byte |= (unsigned)(i + k >= n || x[i + k] >= 0.0f) << k;
        packed[i >> 3] = (uint8_t)byte;
    }
}

/* dh_pack_signs and, for every block b and element i of it, residual[i] = x_i - (+-s_b) by the
 * sign of x_i, in one pass over [lo, hi) (lo a multiple of 8; blocks
 * contiguous from 0, elements past the last block, up to n, are packed only). Runs of whole
 * bytes inside one block go tile by tile: the residual loop, then the packing loop over the
 * same tile while it is in L1 (both vectorize; one loop doing both does not). */
void dh_pack_residual(int64_t lo, int64_t hi, int64_t n, const float *x, int64_t nblocks, const int64_t *bounds,
                      const float *scales, uint8_t *packed, float *residual) {
    const int64_t TILE = 1024;
    int64_t b = 0, end = nblocks > 0 ? bounds[nblocks] : 0;
    int64_t i = lo;
    while (i < hi) {
        while (b < nblocks && bounds[b + 1] <= i) ++b;
        if (b < nblocks && i + 8 <= n && i + 8 <= bounds[b + 1]) {  /* whole bytes in block b */
            int64_t z = bounds[b + 1] < n ? bounds[b + 1] : n;
            z = z < hi ? z : hi;
            z = i + (z - i) / 8 * 8;
            const float s = scales[b];
            for (int64_t t = i; t < z; t += TILE) {
                int64_t e = t + TILE < z ? t + TILE : z;
                for (int64_t j = t; j < e; ++j) residual[j] = x[j] - (x[j] >= 0.0f ? s : -s);
                for (int64_t j = t; j < e; j += 8) {
                    unsigned byte = 0;
                    for (int k = 0; k < 8; ++k) byte |= (unsigned)(x[j + k] >= 0.0f) << k;
                    packed[j >> 3] = (uint8_t)byte;
                }
            }
            i = z;
            continue;
        }
        unsigned byte = 0;  /* a byte across a block boundary, or past the blocks or n */
        int64_t bb = b;
        for (int k = 0; k < 8; ++k) {
            int64_t j = i + k;
            int bit = j >= n || x[j] >= 0.0f;
            byte |= (unsigned)bit << k;
            if (j < end && j < n) {
                while (bounds[bb + 1] <= j) ++bb;
                residual[j] = x[j] - (bit ? scales[bb] : -scales[bb]);
            }
        }
        packed[i >> 3] = (uint8_t)byte;
        i += 8;
    }
}

/* Decode packed signs with per-block scales over the blocks' elements within [lo, hi):
 * out[i] = v (accumulate 0) or out[i] += v (accumulate 1), v = +s_b if bit i else -s_b
 * (s * +-1 is exact, so this equals the reference's bit * 2s - s). */
void dh_sign_decode(int64_t lo, int64_t hi, const uint8_t *packed, int64_t nblocks, const int64_t *bounds,
                    const float *scales, float *out, int accumulate) {
    for (int64_t b = 0; b < nblocks; ++b) {
        int64_t a = bounds[b] > lo ? bounds[b] : lo;
        int64_t z = bounds[b + 1] < hi ? bounds[b + 1] : hi;
        const float s = scales[b];
        int64_t i = a;
        for (; i < z && (i & 7); ++i) {  /* up to the next whole byte */
            float v = SIGNS[packed[i >> 3]][i & 7] * s;
            out[i] = accumulate ? out[i] + v : v;
        }
        if (accumulate)
            for (; i + 8 <= z; i += 8) {
                const float *t = SIGNS[packed[i >> 3]];
                for (int k = 0; k < 8; ++k) out[i + k] += t[k] * s;
            }
        else
            for (; i + 8 <= z; i += 8) {
                const float *t = SIGNS[packed[i >> 3]];
                for (int k = 0; k < 8; ++k) out[i + k] = t[k] * s;
            }
        for (; i < z; ++i) {
            float v = SIGNS[packed[i >> 3]][i & 7] * s;
            out[i] = accumulate ? out[i] + v : v;
        }
    }
}

/* ---- LAQ's innovation quantizer (ddp_hooks/compress/laq.py) ---------------------------------- */

/* max |g_i - q_i| over [lo, hi); NaN if any difference is NaN (like torch's inf-norm) */
float dh_absmax_diff(int64_t lo, int64_t hi, const float *g, const float *q) {
    float m = 0.0f;
    int nan = 0;
    for (int64_t i = lo; i < hi; ++i) {
        float d = fabsf(g[i] - q[i]);
        nan |= d != d;
        m = d > m ? d : m;
    }
    return nan ? NAN : m;
}

/* The b-bit grid of radius R around q_ref, in the reference's float32 operation order:
 *   code  = clamp(floor((g - q_ref + R) / step + 0.5), 0, levels) * (R > 0)
 *   q_new = code * unit + q_ref - R                 (step = 2R/levels or 2/levels when R = 0,
 *   innovation = q_new - q_ref                        unit = 2R/levels)
 * and float64 partial sums: sums[0] = sum (g - q_new)^2, sums[1] = sum innovation^2; codes
 * (may be NULL) receive the uint8 codes. Clamping before truncating gives floor-then-clamp's
 * integer for every finite value (and vectorizes, where floorf is a call without SSE4.1);
 * NaN stays NaN (code 0). */
void dh_laq_quantize(int64_t lo, int64_t hi, const float *g, const float *q_ref, float radius, float step,
                     float unit, float levels, float *q_new, float *innovation, uint8_t *codes, double *sums) {
    const float positive = radius > 0.0f ? 1.0f : 0.0f;
    enum { TILE = 1024 };
    float level[TILE];  /* the tile's codes as floats, NaN -> 0 */
    float qt[TILE], dt[TILE];  /* the tile's q_new and innovation (copied out when wanted) */
    double eps2[8] = {0, 0, 0, 0, 0, 0, 0, 0}, inno2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = lo; t < hi; t += TILE) {  /* elementwise loops, then the sums over the tile */
        int64_t e = t + TILE < hi ? t + TILE : hi, len = e - t;
        const float *gt = g + t, *rt = q_ref + t;
        for (int64_t j = 0; j < len; ++j) {
            float v = (gt[j] - rt[j] + radius) / step + 0.5f;
            v = v < 0.0f ? 0.0f : (v > levels ? levels : v);
            float whole = (float)(int32_t)(v == v ? v : 0.0f);  /* no branch: vectorizes */
            float qn = (v == v ? whole : v) * positive * unit + rt[j] - radius;
            level[j] = whole * positive;
            qt[j] = qn;
            dt[j] = qn - rt[j];
        }
        if (codes)
            for (int64_t j = 0; j < len; ++j) codes[t + j] = (uint8_t)(int32_t)level[j];
        if (q_new) memcpy(q_new + t, qt, (size_t)len * sizeof(float));
        if (innovation) memcpy(innovation + t, dt, (size_t)len * sizeof(float));
        int64_t j = 0;
        for (; j + 8 <= len; j += 8)  /* 8 independent float64 accumulators, a fixed order */
            for (int k = 0; k < 8; ++k) {
                float r = gt[j + k] - qt[j + k], d = dt[j + k];
                eps2[k] += (double)r * r;
                inno2[k] += (double)d * d;
            }
        for (; j < len; ++j) {
            float r = gt[j] - qt[j], d = dt[j];
            eps2[(t + j) & 7] += (double)r * r;
            inno2[(t + j) & 7] += (double)d * d;
        }
    }
    sums[0] = ((eps2[0] + eps2[1]) + (eps2[2] + eps2[3])) + ((eps2[4] + eps2[5]) + (eps2[6] + eps2[7]));
    sums[1] = ((inno2[0] + inno2[1]) + (inno2[2] + inno2[3])) + ((inno2[4] + inno2[5]) + (inno2[6] + inno2[7]));
}

/* q_ref[i] = Q(g)_i from the codes the quantizer above wrote, in place over [lo, hi): the same
 * expression as its q_new (codes hold whole * positive), so the same floats. */
void dh_laq_apply_codes(int64_t lo, int64_t hi, const uint8_t *codes, float radius, float unit, float *q_ref) {
    for (int64_t i = lo; i < hi; ++i) q_ref[i] = (float)codes[i] * unit + q_ref[i] - radius;
}

/* Codes [lo, hi) (lo a multiple of 8) of `bits` bits each into bytes, LSB first: bit j of code
 * i is bit (i * bits + j) of the stream; n codes in all (padding bits of the last byte are 1,
 * as in the sign packing). */
void dh_pack_codes(int64_t lo, int64_t hi, int64_t n, const uint8_t *codes, int bits, uint8_t *out) {
    for (int64_t i = lo; i < hi; i += 8) {
        uint64_t word = 0;
        int m = n - i < 8 ? (int)(n - i) : 8;
        for (int k = 0; k < m; ++k) word |= (uint64_t)codes[i + k] << (k * bits);
        if (m < 8) word |= ~(uint64_t)0 << (m * bits);
        int64_t at = i / 8 * bits;
        int nbytes = (m * bits + 7) / 8;
        for (int q = 0; q < nbytes; ++q) out[at + q] = (uint8_t)(word >> (8 * q));
    }
}

/* out[i] (+)= (0 - R) + unit * code_i for codes [lo, hi) (lo a multiple of 8) of a packed
 * stream of n codes: the receiver's reconstruction of an innovation, as the reference does it. */
void dh_unpack_dequantize(int64_t lo, int64_t hi, int64_t n, const uint8_t *packed, int bits, float radius,
                          float unit, float *out, int accumulate) {
    const uint64_t mask = (1u << bits) - 1;
    const float base = 0.0f - radius;
    for (int64_t i = lo; i < hi; i += 8) {
        int m = n - i < 8 ? (int)(n - i) : 8;
        int64_t at = i / 8 * bits;
        int nbytes = (m * bits + 7) / 8;
        uint64_t word = 0;
        for (int q = 0; q < nbytes; ++q) word |= (uint64_t)packed[at + q] << (8 * q);
        for (int k = 0; k < m; ++k) {
            float v = base + unit * (float)((word >> (k * bits)) & mask);
            out[i + k] = accumulate ? out[i + k] + v : v;
        }
    }
}

/* sum (dst_i - src_i)^2 in float64 over [lo, hi), then dst = src */
double dh_sqdiff_copy(int64_t lo, int64_t hi, const float *src, float *dst) {
    double acc = 0.0;
    for (int64_t i = lo; i < hi; ++i) {
        double d = (double)dst[i] - (double)src[i];
        acc += d * d;
        dst[i] = src[i];
    }
    return acc;
}
