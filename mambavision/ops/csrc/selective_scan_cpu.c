/* Selective scan forward and backward on CPU (mambavision.ops.cpu_scan builds and calls them).
 *
 * Layout (float32, contiguous): u, delta, y (batch, L, D); A (D, N); B, C (batch, L, N); D_skip and
 * delta_bias (D,) or NULL. Per channel d and state n, with dt = softplus(delta + delta_bias):
 *     h_t = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * u_t * B_t[n],   y_t = sum_n h_t[n] * C_t[n] + D_skip[d] * u_t
 *
 * Work item: one sequence and a group of LANES channels, whose N states stay in vector registers
 * for the whole sweep over t. Written with GCC/Clang vector extensions, so that exp and log are
 * vectorised whatever the target (AVX-512, AVX2, NEON); OpenMP splits the work items over threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define MAX_STATE 64
#define MAX_RANK 256 /* step-size rank of the fused mixer kernel */
#define CHUNK 32     /* tokens whose step sizes the fused mixer kernel computes ahead */
#define MAX_WIDTH 15 /* depthwise conv width of the fused mixer kernel */

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

int mv_max_state(void) { return MAX_STATE; }
int mv_max_rank(void) { return MAX_RANK; }
int mv_max_width(void) { return MAX_WIDTH; }

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf select_mask(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* exp(x) to a few ulp: x = k ln2 + r, |r| <= ln2 / 2 (ln2 split in two for exactness), exp(r) by a
   degree-7 polynomial, 2^k from the exponent bits. x is clamped to [-87, 88], inside float's normal range. */
static inline vf exp_f32(vf x) {
    x = select_mask(x < -87.0f, splat(-87.0f), x);
    x = select_mask(x > 88.0f, splat(88.0f), x);
    vf k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    vf r = x - k * 0.693359375f + k * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (vf)((__builtin_convertvector(k, vi) + 127) << 23);
}

/* log(x) for normal x >= 1 to a few ulp: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a
   polynomial in f = m - 1. */
static inline vf log_f32(vf x) {
    vi bits = (vi)x;
    vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 127, vf);
    vf m = (vf)((bits & 0x007fffff) | 0x3f800000);
    vi big = m > 1.41421356f;
    m = select_mask(big, m * 0.5f, m);
    e = select_mask(big, e + 1.0f, e);
    vf f = m - 1.0f, z = f * f;
    vf p = splat(7.0376836292e-2f);
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    p = p * f * z - e * 2.12194440e-4f - 0.5f * z;
    return f + p + e * 0.693359375f;
}

/* softplus(x) = log(1 + exp(x)), x itself above 20; the rounding lost in 1 + z is added back. */
static inline vf softplus_f32(vf x) {
    vi large = x > 20.0f;
    vf z = exp_f32(select_mask(large, splat(20.0f), x));
    vf w = 1.0f + z;
    return select_mask(large, x, log_f32(w) + (z - (w - 1.0f)) / w);
}

/* d softplus(x) / dx = 1 / (1 + exp(-x)). */
static inline vf sigmoid_f32(vf x) { return 1.0f / (1.0f + exp_f32(-x)); }

static inline float sum_lanes(vf v) {
    float s = 0.0f;
    for (int k = 0; k < LANES; k++) s += v[k];
    return s;
}

/* The first w <= LANES floats at p, zeros after them. */
static inline vf load(const float *p, int w) {
    vf v = splat(0.0f);
    if (w == LANES) { memcpy(&v, p, sizeof v); return v; }
    memcpy(&v, p, sizeof(float) * (size_t)w);
    return v;
}

static inline void store(float *p, vf v, int w) {
    if (w == LANES) memcpy(p, &v, sizeof v);
    else memcpy(p, &v, sizeof(float) * (size_t)w);
}

/* The column n of A for channels [d0, d0 + w), zeros after them. */
static inline vf load_column(const float *A, long nstate, long n, long d0, int w) {
    float column[LANES] = {0};
    for (int k = 0; k < w; k++) column[k] = A[(d0 + k) * nstate + n];
    vf v;
    memcpy(&v, column, sizeof v);
    return v;
}

/* One sequence, channels [d0, d0 + w). Pointers are at the sequence's start. Writes y unless it is NULL,
   and every state h_t into hist (L * N * LANES floats) unless that is NULL. */
static void scan_group(const float *u, const float *delta, const float *A, const float *B, const float *C,
                       const float *D_skip, const float *delta_bias, int softplus, float *y, float *hist,
                       long length, long channels, long nstate, long d0, int w) {
    vf a_neg[MAX_STATE], h[MAX_STATE];
    for (long n = 0; n < nstate; n++) {
        a_neg[n] = load_column(A, nstate, n, d0, w);
        h[n] = splat(0.0f);
    }
    vf bias = delta_bias ? load(delta_bias + d0, w) : splat(0.0f);
    vf skip = D_skip ? load(D_skip + d0, w) : splat(0.0f);
    for (long t = 0; t < length; t++) {
        vf ut = load(u + t * channels + d0, w);
        vf dt = load(delta + t * channels + d0, w) + bias;
        if (softplus) dt = softplus_f32(dt);
        vf du = dt * ut, out = skip * ut;
        for (long n = 0; n < nstate; n++) {
            h[n] = exp_f32(dt * a_neg[n]) * h[n] + du * B[t * nstate + n];
            out += h[n] * C[t * nstate + n];
            if (hist) memcpy(hist + (t * nstate + n) * LANES, &h[n], sizeof(vf));
        }
        if (y) store(y + t * channels + d0, out, w);
    }
}

void mv_selective_scan_fwd(const float *u, const float *delta, const float *A, const float *B, const float *C,
                           const float *D_skip, const float *delta_bias, int softplus, float *y,
                           long batch, long length, long channels, long nstate, int threads) {
    long groups = (channels + LANES - 1) / LANES;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < batch * groups; item++) {
        long b = item / groups, d0 = (item % groups) * LANES;
        int w = (int)(channels - d0 < LANES ? channels - d0 : LANES);
        scan_group(u + b * length * channels, delta + b * length * channels, A, B + b * length * nstate,
                   C + b * length * nstate, D_skip, delta_bias, softplus, y + b * length * channels, NULL,
                   length, channels, nstate, d0, w);
    }
}

/* Gradients of one sequence's channels [d0, d0 + w): du, ddelta (its rows), dA, dD and ddelta_bias (its
   rows of per-sequence sums), and dB, dC (per-sequence, per-group partial sums, (L, N)). The forward
   sweep (scan_group) is redone with every state kept in hist; the reverse sweep carries the adjoint
   g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1} of each state. */
static void scan_group_backward(const float *u, const float *delta, const float *A, const float *B, const float *C,
                                const float *D_skip, const float *delta_bias, int softplus, const float *dy,
                                float *du, float *ddelta, float *dA, float *dB, float *dC, float *dD, float *dbias,
                                float *hist, long length, long channels, long nstate, long d0, int w) {
    scan_group(u, delta, A, B, C, D_skip, delta_bias, softplus, NULL, hist, length, channels, nstate, d0, w);
    vf a_neg[MAX_STATE], g[MAX_STATE], dA_sum[MAX_STATE];
    for (long n = 0; n < nstate; n++) {
        a_neg[n] = load_column(A, nstate, n, d0, w);
        g[n] = dA_sum[n] = splat(0.0f);
    }
    vf bias = delta_bias ? load(delta_bias + d0, w) : splat(0.0f);
    vf skip = D_skip ? load(D_skip + d0, w) : splat(0.0f);
    vf dskip_sum = splat(0.0f), dbias_sum = splat(0.0f);
    for (long t = length - 1; t >= 0; t--) {
        vf x = load(delta + t * channels + d0, w) + bias;
        vf dt = softplus ? softplus_f32(x) : x;
        vf ut = load(u + t * channels + d0, w), dyt = load(dy + t * channels + d0, w);
        vf du_in = dt * ut, d_du_in = splat(0.0f), d_dt = splat(0.0f);
        for (long n = 0; n < nstate; n++) {
            vf h_t, h_prev = splat(0.0f);
            memcpy(&h_t, hist + (t * nstate + n) * LANES, sizeof(vf));
            if (t > 0) memcpy(&h_prev, hist + ((t - 1) * nstate + n) * LANES, sizeof(vf));
            vf a = exp_f32(dt * a_neg[n]);
            g[n] += dyt * C[t * nstate + n];
            dC[t * nstate + n] = sum_lanes(dyt * h_t);
            dB[t * nstate + n] = sum_lanes(g[n] * du_in);
            d_du_in += g[n] * B[t * nstate + n];
            vf d_exponent = g[n] * h_prev * a; /* d loss / d (dt * A) */
            d_dt += d_exponent * a_neg[n];
            dA_sum[n] += d_exponent * dt;
            g[n] *= a;
        }
        d_dt += d_du_in * ut;
        vf dx = softplus ? d_dt * sigmoid_f32(x) : d_dt;
        store(du + t * channels + d0, d_du_in * dt + dyt * skip, w);
        store(ddelta + t * channels + d0, dx, w);
        dskip_sum += dyt * ut;
        dbias_sum += dx;
    }
    for (long n = 0; n < nstate; n++)
        for (int k = 0; k < w; k++) dA[(d0 + k) * nstate + n] = dA_sum[n][k];
    if (dD) store(dD + d0, dskip_sum, w);
    if (dbias) store(dbias + d0, dbias_sum, w);
}

/* Shapes as the forward's, dy like y; outputs du, ddelta (batch, L, D); dA (batch, D, N), dD and dbias
   (batch, D) or NULL: per-sequence sums; dB, dC (batch, groups, L, N): per-group sums. Returns 0, or -1
   when out of memory. */
int mv_selective_scan_bwd(const float *u, const float *delta, const float *A, const float *B, const float *C,
                          const float *D_skip, const float *delta_bias, int softplus, const float *dy,
                          float *du, float *ddelta, float *dA, float *dB, float *dC, float *dD, float *dbias,
                          long batch, long length, long channels, long nstate, int threads) {
    long groups = (channels + LANES - 1) / LANES;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        float *hist = malloc(sizeof(vf) * (size_t)(length * nstate > 0 ? length * nstate : 1));
        failed = hist == NULL;
#pragma omp for schedule(static)
        for (long item = 0; item < batch * groups; item++) {
            if (!hist) continue;
            long b = item / groups, d0 = (item % groups) * LANES;
            int w = (int)(channels - d0 < LANES ? channels - d0 : LANES);
            long seq = b * length * channels, seq_n = b * length * nstate;
            scan_group_backward(u + seq, delta + seq, A, B + seq_n, C + seq_n, D_skip, delta_bias, softplus,
                                dy + seq, du + seq, ddelta + seq, dA + b * channels * nstate,
                                dB + item * length * nstate, dC + item * length * nstate,
                                dD ? dD + b * channels : NULL, dbias ? dbias + b * channels : NULL,
                                hist, length, channels, nstate, d0, w);
        }
        free(hist);
    }
    return failed ? -1 : 0;
}

/* ---- The MambaVision mixer's inference path, in the tokens-first layout of its linear layers ----
 *
 * mv_mixer_fwd computes everything between the mixer's in_proj and out_proj, in one parallel region of
 * three phases over each sequence of xz (batch, L, 2D), the output of in_proj:
 *   1. a = silu(depthwise conv along t), 'same' zero padding, of all 2D channels, with the kernel conv_w
 *      (2D, width), width odd; u = a[..., :D] goes to the scratch, z = a[..., D:] to out[..., D:];
 *   2. x_proj: proj = u . x_w^T, (L, R + 2N) = [low-rank step size, B, C], into the scratch;
 *   3. the selective scan of u with softplus, delta = (w_dt . proj[:R] + dt_bias) + dt_bias (dt_proj, whose bias
 *      enters twice, as in the published mixer), A (D, N) and D_skip (D,), into out[..., :D].
 * xz and out are float32, or bfloat16 where xz_bf16 / out_bf16 are set (as autocast's linear layers write and
 * read them); x_w (R + 2N, D) is float32 or bfloat16 (x_w_bf16); the rest is float32. Everything is computed
 * in float32. scratch holds mv_mixer_scratch(batch, length, channels, rank, nstate) floats. */

static inline vf silu_f32(vf x) { return x / (1.0f + exp_f32(-x)); }

typedef uint16_t vh __attribute__((vector_size(2 * LANES)));

/* The first w <= LANES values at element offset i of x (float32, or bfloat16 if bf16), zeros after them. */
static inline vf load_any(const void *x, long i, int w, int bf16) {
    if (!bf16) return load((const float *)x + i, w);
    vh v = {0};
    if (w == LANES) memcpy(&v, (const uint16_t *)x + i, sizeof v); /* a constant size: one vector load */
    else memcpy(&v, (const uint16_t *)x + i, sizeof(uint16_t) * (size_t)w);
    return (vf)(__builtin_convertvector(v, vi) << 16);
}

typedef uint32_t vu __attribute__((vector_size(4 * LANES)));

/* The first w values of v at element offset i of x: float32, or bfloat16 (rounded to nearest even, NaN kept)
   if bf16. */
static inline void store_any(void *x, long i, vf v, int w, int bf16) {
    if (!bf16) { store((float *)x + i, v, w); return; }
    vu bits = (vu)v, nan = (vu)(v != v);
    vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    vh h = __builtin_convertvector((nan & 0x7fc0u) | (~nan & rounded), vh);
    if (w == LANES) memcpy((uint16_t *)x + i, &h, sizeof h);
    else memcpy((uint16_t *)x + i, &h, sizeof(uint16_t) * (size_t)w);
}

static inline float to_f32(const void *x, long i, int bf16) {
    if (!bf16) return ((const float *)x)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Phase 3 of mv_mixer_fwd for channels [d0, d0 + lanes) of one sequence: u (its L x D rows at d0), proj (its
   L x ld rows), the output at element offset ys of out. */
static void mixer_scan_group(
        const float *u, const float *proj, const float *w_dt, const float *dt_bias, const float *A, const float *D_skip,
        void *out, long ys, int out_bf16, long length, long channels, long ld, long rank, long nstate, long d0,
        int lanes) {
    long row = 2 * channels;
    vf a_neg[MAX_STATE], h[MAX_STATE], w_cols[MAX_RANK], dus[CHUNK], dts[CHUNK];
    for (long n = 0; n < nstate; n++) {
        a_neg[n] = load_column(A, nstate, n, d0, lanes);
        h[n] = splat(0.0f);
    }
    for (long r = 0; r < rank; r++) w_cols[r] = load_column(w_dt, rank, r, d0, lanes);
    vf bias = load(dt_bias + d0, lanes), skip = load(D_skip + d0, lanes);
    for (long t0 = 0; t0 < length; t0 += CHUNK) {
        long steps = length - t0 < CHUNK ? length - t0 : CHUNK;
        /* the step sizes of a chunk first: no dependence between tokens, so their latency overlaps */
        for (long i = 0; i < steps; i++) {
            const float *pt = proj + (t0 + i) * ld;
            vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
            long r = 0;
            for (; r + 4 <= rank; r += 4) {
                a0 += w_cols[r] * pt[r];
                a1 += w_cols[r + 1] * pt[r + 1];
                a2 += w_cols[r + 2] * pt[r + 2];
                a3 += w_cols[r + 3] * pt[r + 3];
            }
            for (; r < rank; r++) a0 += w_cols[r] * pt[r];
            vf dt = softplus_f32((((a0 + a1) + (a2 + a3)) + bias) + bias);
            dus[i] = dt * load(u + (t0 + i) * channels, lanes);
            dts[i] = dt;
        }
        for (long i = 0; i < steps; i++) {
            long t = t0 + i;
            const float *bc = proj + t * ld + rank;
            vf yt = skip * load(u + t * channels, lanes);
            for (long n = 0; n < nstate; n++) {
                h[n] = exp_f32(dts[i] * a_neg[n]) * h[n] + dus[i] * bc[n];
                yt += h[n] * bc[nstate + n];
            }
            store_any(out, ys + t * row, yt, lanes, out_bf16);
        }
    }
}

#define TOKENS 8 /* tokens per work item of the x_proj phase */

static long padded(long n) { return (n + LANES - 1) / LANES * LANES; }

/* acc[i] = the LANES outputs of x_proj at x_wt's columns for token i of u (rows of channels floats), i < steps.
   Always inlined: a constant steps unrolls the token loop. */
static inline __attribute__((always_inline)) void project_tokens(const float *u, const float *x_wt, vf *acc,
                                                                 long channels, long ld, long steps) {
    for (long i = 0; i < steps; i++) acc[i] = splat(0.0f);
    for (long d = 0; d < channels; d++) {
        vf w;
        memcpy(&w, x_wt + d * ld, sizeof w);
        for (long i = 0; i < steps; i++) acc[i] += w * u[i * channels + d];
    }
}

long mv_mixer_scratch(long batch, long length, long channels, long rank, long nstate) {
    long width = padded(rank + 2 * nstate);
    return batch * length * channels + batch * length * width + channels * width;
}

void mv_mixer_fwd(const void *xz, int xz_bf16, const float *conv_w, const void *x_w, int x_w_bf16,
                  const float *w_dt, const float *dt_bias, const float *A, const float *D_skip, float *scratch,
                  void *out, int out_bf16, long batch, long length, long channels, long width, long rank,
                  long nstate, int threads) {
    long groups = (channels + LANES - 1) / LANES, row = 2 * channels, half = width / 2;
    long nproj = rank + 2 * nstate, ld = padded(nproj), blocks = (length + TOKENS - 1) / TOKENS;
    float *u_all = scratch, *proj_all = scratch + batch * length * channels;
    float *x_wt = proj_all + batch * length * ld; /* x_w transposed, (D, ld), zero columns after nproj */
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long d = 0; d < channels; d++)
            for (long p = 0; p < ld; p++)
                x_wt[d * ld + p] = p < nproj ? to_f32(x_w, p * channels + d, x_w_bf16) : 0.0f;
        /* phase 1: conv + silu of both halves */
#pragma omp for schedule(static)
        for (long item = 0; item < batch * 2 * groups; item++) {
            long b = item / (2 * groups), c0 = (item % (2 * groups)) * LANES;
            long in_z = c0 >= groups * LANES, ch0 = in_z ? c0 - groups * LANES : c0; /* channel within its half */
            long c = (in_z ? channels : 0) + ch0; /* channel of xz and conv_w */
            int lanes = (int)(channels - ch0 < LANES ? channels - ch0 : LANES);
            long xs = b * length * row + c;
            vf taps[MAX_WIDTH];
            for (long j = 0; j < width; j++) taps[j] = load_column(conv_w, width, j, c, lanes);
            for (long t = 0; t < length; t++) {
                vf acc = splat(0.0f);
                long lo = t - half < 0 ? half - t : 0, hi = t + half >= length ? length - 1 - t + half : width - 1;
                for (long j = lo; j <= hi; j++)
                    acc += taps[j] * load_any(xz, xs + (t + j - half) * row, lanes, xz_bf16);
                vf a = silu_f32(acc);
                if (in_z) store_any(out, b * length * row + t * row + channels + ch0, a, lanes, out_bf16);
                else store(u_all + (b * length + t) * channels + ch0, a, lanes);
            }
        }
        /* phase 2: x_proj, TOKENS tokens and LANES outputs at a time */
#pragma omp for schedule(static)
        for (long item = 0; item < batch * blocks; item++) {
            long b = item / blocks, t0 = (item % blocks) * TOKENS;
            long steps = length - t0 < TOKENS ? length - t0 : TOKENS;
            const float *u = u_all + (b * length + t0) * channels;
            float *proj = proj_all + (b * length + t0) * ld;
            for (long p0 = 0; p0 < ld; p0 += LANES) {
                vf acc[TOKENS];
                if (steps == TOKENS) project_tokens(u, x_wt + p0, acc, channels, ld, TOKENS); /* unrolled */
                else project_tokens(u, x_wt + p0, acc, channels, ld, steps);
                for (long i = 0; i < steps; i++) memcpy(proj + i * ld + p0, &acc[i], sizeof(vf));
            }
        }
        /* phase 3: dt_proj and the scan */
#pragma omp for schedule(static)
        for (long item = 0; item < batch * groups; item++) {
            long b = item / groups, d0 = (item % groups) * LANES;
            int lanes = (int)(channels - d0 < LANES ? channels - d0 : LANES);
            const float *u = u_all + b * length * channels + d0, *proj = proj_all + b * length * ld;
            mixer_scan_group(u, proj, w_dt, dt_bias, A, D_skip, out, b * length * row + d0, out_bf16, length, channels,
                             ld, rank, nstate, d0, lanes);
        }
    }
}
