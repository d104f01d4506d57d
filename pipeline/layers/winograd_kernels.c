/* Fused tile transforms for Winograd F(4x4, 3x3) on CPU (see pipeline/layers/winograd.py).
 *
 * Each function reads one tensor once and writes the transformed one once. In plain PyTorch the same
 * work is a gather copy (unfold -> reshape), a small GEMM against the 36x36 (or 16x36) transform
 * matrix, and for the output a second copy that reassembles the tiles: three passes over tensors
 * 2.25x the size of the activations, and memory traffic is what these transforms are bound by.
 * Here the transforms are applied row by row with the sparse closed forms of B^T, A^T and A, on blocks
 * of channels that the compiler vectorises (channels are innermost in NHWC memory).
 *
 * Tensors are passed as data pointers with element strides, so any memory layout works; the channel
 * stride 1 (NHWC) is the fast case. Transformed tensors are (36, tiles, channels) contiguous, with
 * tiles ordered (n, tile row, tile column) and the tile's pixel index a*6+b outermost.
 * Built by pipeline/layers/winograd_native.py with the system C compiler: gcc -O3 -march=native -fopenmp.
 */
#include <stdint.h>

#define CB 32 /* channels per block: 36 blocks of CB floats (4.6 KB) stay in L1 */

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

/* In-place 1-D transforms on 6 (or 4) rows of nc channels, rows `s` floats apart. */
static inline void bt6(float *d, int64_t s, int nc) {
    /* B^T of F(4,3): rows (4,0,-5,0,1,0) (0,-4,-4,1,1,0) (0,4,-4,-1,1,0) (0,-2,-1,2,1,0) (0,2,-1,-2,1,0) (0,4,0,-5,0,1) */
#pragma omp simd
    for (int c = 0; c < nc; c++) {
        float d0 = d[c], d1 = d[s + c], d2 = d[2 * s + c], d3 = d[3 * s + c], d4 = d[4 * s + c], d5 = d[5 * s + c];
        d[c] = 4.0f * d0 - 5.0f * d2 + d4;
        d[s + c] = -4.0f * (d1 + d2) + d3 + d4;
        d[2 * s + c] = 4.0f * (d1 - d2) - d3 + d4;
        d[3 * s + c] = 2.0f * (d3 - d1) - d2 + d4;
        d[4 * s + c] = 2.0f * (d1 - d3) - d2 + d4;
        d[5 * s + c] = 4.0f * d1 - 5.0f * d3 + d5;
    }
}

/* In-place adjoint of A^T: 4 rows g (stored in the first 4 of 6 slots) -> 6 rows u = A g. */
static inline void a6(float *d, int64_t s, int nc) {
#pragma omp simd
    for (int c = 0; c < nc; c++) {
        float g0 = d[c], g1 = d[s + c], g2 = d[2 * s + c], g3 = d[3 * s + c];
        float e = g0 + g2, o = g1 + g3, e4 = g0 + 4.0f * g2, o8 = 2.0f * g1 + 8.0f * g3;
        d[c] = g0;
        d[s + c] = e + o;
        d[2 * s + c] = e - o;
        d[3 * s + c] = e4 + o8;
        d[4 * s + c] = e4 - o8;
        d[5 * s + c] = g3;
    }
}

/* A^T on 6 rows -> 4 rows (stored in the first 4 slots). */
static inline void at4(float *d, int64_t s, int nc) {
#pragma omp simd
    for (int c = 0; c < nc; c++) {
        float m0 = d[c], m1 = d[s + c], m2 = d[2 * s + c], m3 = d[3 * s + c], m4 = d[4 * s + c], m5 = d[5 * s + c];
        float p12 = m1 + m2, q12 = m1 - m2, p34 = m3 + m4, q34 = m3 - m4;
        d[c] = m0 + p12 + p34;
        d[s + c] = q12 + 2.0f * q34;
        d[2 * s + c] = p12 + 4.0f * p34;
        d[3 * s + c] = q12 + 8.0f * q34 + m5;
    }
}

/* Reads a 6x6 (or 4x4) window of channels [c0, c0+nc) at rows r0.., columns q0.. into buf[(p*6+q)*CB + c],
 * with zeros outside the h x w map. */
static inline void load_window(const float *x, int64_t sh, int64_t sw, int64_t sc, int64_t h, int64_t w,
                               int64_t r0, int64_t q0, int size, int nc, float *buf) {
    for (int p = 0; p < size; p++) {
        int64_t r = r0 + p;
        for (int q = 0; q < size; q++) {
            int64_t col = q0 + q;
            float *dst = buf + (p * 6 + q) * CB;
            if (r < 0 || r >= h || col < 0 || col >= w) {
                for (int c = 0; c < nc; c++) dst[c] = 0.0f;
            } else {
                const float *src = x + r * sh + col * sw;
                if (sc == 1) {
#pragma omp simd
                    for (int c = 0; c < nc; c++) dst[c] = src[c];
                } else {
                    for (int c = 0; c < nc; c++) dst[c] = src[c * sc];
                }
            }
        }
    }
}

/* Writes buf[k*CB + c] (k < 36) to v[k, t, c0 + c] of the (36, tiles, C) tensor. */
static inline void store_tiles(const float *buf, float *v, int64_t tiles, int64_t C, int64_t t, int64_t c0, int nc) {
    for (int k = 0; k < 36; k++) {
        float *dst = v + (k * tiles + t) * C + c0;
        const float *src = buf + k * CB;
#pragma omp simd
        for (int c = 0; c < nc; c++) dst[c] = src[c];
    }
}

static inline void load_tiles(const float *v, int64_t tiles, int64_t C, int64_t t, int64_t c0, int nc, float *buf) {
    for (int k = 0; k < 36; k++) {
        const float *src = v + (k * tiles + t) * C + c0;
        float *dst = buf + k * CB;
#pragma omp simd
        for (int c = 0; c < nc; c++) dst[c] = src[c];
    }
}

/* The loop both forward-direction transforms share: for every tile position, read the size x size window
 * at (4i + offset, 4j + offset) of x (n, c, h, w) with strides s*, transform its columns then its rows
 * in place (bt: B^T on 6x6 windows, else A on 4x4 ones), and store the 36 results to v (36, tiles, c). */
static inline void windows_to_tiles(const float *x, int64_t n, int64_t c, int64_t h, int64_t w, int64_t sn,
                                    int64_t sc, int64_t sh, int64_t sw, float *v, int threads, int bt) {
    int64_t th = (h + 3) / 4, tw = (w + 3) / 4, tiles = n * th * tw;
    int size = bt ? 6 : 4, offset = bt ? -1 : 0; /* the 3x3 conv's same-padding of 1 sits before the input */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float buf[36 * CB];
        int64_t img = t / (th * tw), i = (t / tw) % th, j = t % tw;
        for (int64_t c0 = 0; c0 < c; c0 += CB) {
            int nc = (int)imin(CB, c - c0);
            load_window(x + img * sn + c0 * sc, sh, sw, sc, h, w, 4 * i + offset, 4 * j + offset, size, nc, buf);
            for (int q = 0; q < size; q++) { /* columns of the window: B^T d, or A g (4 rows in, 6 out) */
                if (bt) bt6(buf + q * CB, 6 * CB, nc); else a6(buf + q * CB, 6 * CB, nc);
            }
            for (int p = 0; p < 6; p++) { /* rows: (B^T d) B, or (A g) A^T */
                if (bt) bt6(buf + p * 6 * CB, CB, nc); else a6(buf + p * 6 * CB, CB, nc);
            }
            store_tiles(buf, v, tiles, c, t, c0, nc);
        }
    }
}

/* V = B^T d B of every 6x6 tile of x, same-padded by 1: x (n, c, h, w) with strides s*, v (36, n*th*tw, c). */
void winograd_input(const float *x, int64_t n, int64_t c, int64_t h, int64_t w,
                    int64_t sn, int64_t sc, int64_t sh, int64_t sw, float *v, int threads) {
    windows_to_tiles(x, n, c, h, w, sn, sc, sh, sw, v, threads, 1);
}

/* y = A^T m A of every tile, cropped to h x w: m (36, n*th*tw, k), y (n, k, h, w) with strides s*. */
void winograd_output(const float *m, int64_t n, int64_t k, int64_t h, int64_t w,
                     float *y, int64_t sn, int64_t sk, int64_t sh, int64_t sw, int threads) {
    int64_t th = (h + 3) / 4, tw = (w + 3) / 4, tiles = n * th * tw;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float buf[36 * CB];
        int64_t img = t / (th * tw), i = (t / tw) % th, j = t % tw;
        for (int64_t c0 = 0; c0 < k; c0 += CB) {
            int nc = (int)imin(CB, k - c0);
            load_tiles(m, tiles, k, t, c0, nc, buf);
            for (int q = 0; q < 6; q++) at4(buf + q * CB, 6 * CB, nc);  /* A^T m: rows 0..3 */
            for (int p = 0; p < 4; p++) at4(buf + p * 6 * CB, CB, nc);  /* (A^T m) A: columns 0..3 */
            for (int p = 0; p < 4 && 4 * i + p < h; p++) {
                for (int q = 0; q < 4 && 4 * j + q < w; q++) {
                    float *dst = y + img * sn + (4 * i + p) * sh + (4 * j + q) * sw + c0 * sk;
                    const float *src = buf + (p * 6 + q) * CB;
                    if (sk == 1) {
#pragma omp simd
                        for (int c = 0; c < nc; c++) dst[c] = src[c];
                    } else {
                        for (int c = 0; c < nc; c++) dst[c * sk] = src[c];
                    }
                }
            }
        }
    }
}

/* The transpose of winograd_output: u = A g A^T of every 4x4 tile g of dy (zero beyond h x w),
 * dy (n, k, h, w) with strides s*, u (36, n*th*tw, k). */
void winograd_output_adjoint(const float *dy, int64_t n, int64_t k, int64_t h, int64_t w,
                             int64_t sn, int64_t sk, int64_t sh, int64_t sw, float *u, int threads) {
    windows_to_tiles(dy, n, k, h, w, sn, sk, sh, sw, u, threads, 0);
}
