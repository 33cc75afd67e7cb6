/* SentenceKV's per-layer decode bookkeeping on CPU, one pass each (see __init__.py for why and how it is built).
 *
 * skv_select_blocks: core/blocks.py's paged selection (score units, block scores, rank, top-k, ascending order,
 *                    head-split block tables) for the sentencekv policy (unit score = query sum . centroid).
 * skv_fold:          UnitStore.fold_open for sum statistics (the open sentence's query and key sums).
 * skv_copy_rows:     the host tier's spill on CPU: device cache rows straight into host slots, every layer.
 *
 * Every row and head is computed on its own, in a fixed order: a row's result never depends on the batch.
 */
#include <stdint.h>
#include <string.h>

#define FIXED 1e30f
#define UNCOVERED (-1e38f)

/* a ranks before b: the higher score, then the lower block (core/blocks.py: select_blocks) */
static inline int ranks_before(float sa, int64_t ia, float sb, int64_t ib) {
    return sa > sb || (sa == sb && ia < ib);
}

static inline float dot(const float *q, const float *c, int64_t d_len) {
    float acc[16] = {0};
    int64_t d = 0;
    for (; d + 16 <= d_len; d += 16)
        for (int j = 0; j < 16; j++) acc[j] += q[d + j] * c[d + j];
    float tot = 0.f;
    for (; d < d_len; d++) tot += q[d] * c[d];
    for (int j = 0; j < 16; j++) tot += acc[j];
    return tot;
}

/* The top k blocks of one (row, KV head) by rank, in ascending block order, into top[0..k). */
static int64_t top_blocks(const float *score, int64_t nb1, int64_t k, int64_t *top) {
    int64_t n = 0;
    for (int64_t b = 0; b < nb1; b++) {
        const float sc = score[b];
        if (n == k && !ranks_before(sc, b, score[top[n - 1]], top[n - 1])) continue;
        int64_t i = n < k ? n++ : k - 1;
        while (i > 0 && ranks_before(sc, b, score[top[i - 1]], top[i - 1])) { top[i] = top[i - 1]; i--; }
        top[i] = b;
    }
    for (int64_t i = 1; i < n; i++) {
        const int64_t v = top[i];
        int64_t j = i;
        while (j > 0 && top[j - 1] > v) { top[j] = top[j - 1]; j--; }
        top[j] = v;
    }
    return n;
}

/* cent: one layer's centroid pool, ``cent_row`` floats per unit ([Hk, D]); qsum: one layer's open query sums,
 * ``q_row`` floats per request slot; slot [R]; unit_slots [R, S]; valid [R, S, Hk] (bytes); cand [R, NB1 * M]
 * (BlockPlan.cand: indices into the unit scores extended by UNCOVERED, FIXED, -inf); nblocks [R] blocks per row;
 * tables [R, Hk, NB1] int32 head-split ids (may be NULL); ext [Hk, S + 3], score [NB1], top [W]: workspaces.
 * Out: blocks [R, Hk, W] int64 logical blocks (may be NULL) and / or out_tables [R * Hk, W] int32 (needs tables);
 * slots past a row's own block count hold the padding column NB1 - 1.
 * A row's units are scored in one pass over their pool rows (all heads of a unit are contiguous), then each head
 * ranks its blocks. */
void skv_select_blocks(const float *cent, int64_t cent_row, const float *qsum, int64_t q_row, const int64_t *slot,
                       const int64_t *unit_slots, int64_t S, const uint8_t *valid, const int64_t *cand,
                       int64_t NB1, int64_t M, const int64_t *nblocks, const int32_t *tables, int64_t R,
                       int64_t H, int64_t D, int64_t W, float *ext, float *score, int64_t *top,
                       int64_t *blocks, int32_t *out_tables) {
    const int64_t E = S + 3;
    for (int64_t r = 0; r < R; r++) {
        const float *q = qsum + slot[r] * q_row;
        for (int64_t s = 0; s < S; s++) {
            const float *c = cent + unit_slots[r * S + s] * cent_row;
            const uint8_t *ok = valid + (r * S + s) * H;
            for (int64_t h = 0; h < H; h++)
                ext[h * E + s] = ok[h] ? dot(q + h * D, c + h * D, D) : -__builtin_inff();
        }
        const int64_t *c = cand + r * NB1 * M;
        for (int64_t h = 0; h < H; h++) {
            float *x = ext + h * E;
            x[S] = UNCOVERED;
            x[S + 1] = FIXED;
            x[S + 2] = -__builtin_inff();
            for (int64_t b = 0; b < NB1; b++) {
                float m = x[c[b * M]];
                for (int64_t j = 1; j < M; j++) {
                    const float v = x[c[b * M + j]];
                    if (v > m) m = v;
                }
                score[b] = m;
            }
            const int64_t n = top_blocks(score, NB1, nblocks[r], top);
            const int64_t row = r * H + h;
            for (int64_t i = 0; i < W; i++) {
                const int64_t blk = i < n ? top[i] : NB1 - 1;
                if (blocks) blocks[row * W + i] = blk;
                if (out_tables) out_tables[row * W + i] = tables[row * NB1 + blk];
            }
        }
    }
}

/* dtype codes: 0 float32, 1 bfloat16, 2 float16 */
static inline float load(const void *p, int64_t i, int dtype) {
    if (dtype == 0) return ((const float *)p)[i];
    if (dtype == 1) {
        uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    return (float)((const _Float16 *)p)[i];
}

/* Add each row's token to its request's open statistics, one layer: qsum[slot] += the query summed over each KV
 * head's group of G query heads (in head order), ksum[slot] += the key (ksum may be NULL). q / k rows start every
 * q_row / k_row elements, heads are contiguous [heads, D]; qsum / ksum rows every ``row`` floats ([Hk, D]). */
void skv_fold(const void *q, int64_t q_row, const void *k, int64_t k_row, int dtype, const int64_t *tok,
              const int64_t *slot, int64_t R, int64_t H, int64_t G, int64_t D, float *qsum, float *ksum,
              int64_t row) {
    for (int64_t r = 0; r < R; r++) {
        const int64_t t = tok[r];
        float *qs = qsum + slot[r] * row;
        for (int64_t h = 0; h < H; h++) {
            for (int64_t d = 0; d < D; d++) {
                float g = load(q, t * q_row + (h * G) * D + d, dtype);
                for (int64_t j = 1; j < G; j++) g += load(q, t * q_row + (h * G + j) * D + d, dtype);
                qs[h * D + d] += g;
            }
        }
        if (ksum) {
            float *ks = ksum + slot[r] * row;
            for (int64_t i = 0; i < H * D; i++) ks[i] += load(k, t * k_row + i, dtype);
        }
    }
}

/* The host tier's spill on CPU (HostPool.spill): row src_rows[i] of every layer's device cache into row dst_rows[i]
 * of that layer's host pool, one memcpy per (layer, row) -- no staging buffer, no temporary. */
void skv_copy_rows(void *const *dst, void *const *src, int64_t layers, const int64_t *dst_rows,
                   const int64_t *src_rows, int64_t n, int64_t row_bytes) {
    for (int64_t l = 0; l < layers; l++) {
        char *d = (char *)dst[l];
        const char *s = (const char *)src[l];
        for (int64_t i = 0; i < n; i++) memcpy(d + dst_rows[i] * row_bytes, s + src_rows[i] * row_bytes, row_bytes);
    }
}
