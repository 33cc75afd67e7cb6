/* SentenceKV's per-layer decode bookkeeping on CPU, one pass each (see __init__.py for why and how it is built).
 *
 * skv_plan_blocks:   core/blocks.py's per-step block plan (plan_blocks: fixed blocks, budgets, candidate lists).
 * skv_select_blocks: core/blocks.py's paged selection (score units, block scores, rank, top-k, ascending order,
 *                    head-split block tables) for the sentencekv policy (unit score = query sum . centroid).
 * skv_fold:          UnitStore.fold_open for sum statistics (the open sentence's query and key sums).
 * skv_copy_rows:     the host tier's spill on CPU: device cache rows straight into host slots, every layer.
 * skv_hot_resolve:   the host tier's hot-set resolution and swap-in for one layer (tier/hotset.py, host_reads.py).
 *
 * Every row and head is computed on its own, in a fixed order: a row's result never depends on the batch.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* units ahead whose centroid rows the selection prefetches (the hardware prefetchers did not keep up even on
 * contiguous rows, and a row's units may be scattered over the pool): measured at 8 x 7.5k (bf16, 13-token
 * sentences, caches flushed, variants interleaved in one process): 208 -> 136 us per layer on two threads, 4 to
 * 16 units ahead alike */
#ifndef PF
#define PF 4
#endif
#define FIXED 1e30f
#define UNCOVERED (-1e38f)

/* a ranks before b: the higher score, then the lower block (core/blocks.py: select_blocks) */
static inline int ranks_before(float sa, int64_t ia, float sb, int64_t ib) {
    return sa > sb || (sa == sb && ia < ib);
}

static inline float from_bf16(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define AS_FLOAT(x) ((float)(x))

/* q . c over d_len elements; c in float32, bf16 or fp16 (the index is kept in the model's dtype), converted on
 * load; one body for the three element types (T: f32_t, bf16_t, f16_t). With AVX2 + FMA + F16C: two 8-lane
 * accumulators and a shuffle-tree sum in registers (the compiler's own reduction summed the lanes one by one
 * through the stack: 10-17 % of the selection, measured interleaved at 1 and 8 rows, cold and L2-resident);
 * elsewhere a SIMD reduction the compiler vectorises. Either way the order is fixed by the build, not by the data
 * or the batch. */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LOAD8_f32_t(p) _mm256_loadu_ps(p)
#define LOAD8_bf16_t(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define LOAD8_f16_t(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define DEFINE_DOT(NAME, T, CVT)                                                     \
    static inline float NAME(const float *q, const T *c, int64_t d_len) {          \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                 \
        int64_t d = 0;                                                             \
        for (; d + 16 <= d_len; d += 16) {                                         \
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), LOAD8_##T(c + d), a0);    \
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), LOAD8_##T(c + d + 8), a1); \
        }                                                                          \
        const __m256 a = _mm256_add_ps(a0, a1);                                    \
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)); \
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                    \
        s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));                                \
        float tot = _mm_cvtss_f32(s);                                              \
        for (; d < d_len; d++) tot += q[d] * CVT(c[d]);                            \
        return tot;                                                                \
    }
#else
#define DEFINE_DOT(NAME, T, CVT)                                                    \
    static inline float NAME(const float *q, const T *c, int64_t d_len) {        \
        float tot = 0.f;                                                         \
        _Pragma("omp simd reduction(+:tot)")                                     \
        for (int64_t d = 0; d < d_len; d++) tot += q[d] * CVT(c[d]);             \
        return tot;                                                              \
    }
#endif
typedef float f32_t;
typedef uint16_t bf16_t;
typedef _Float16 f16_t;
DEFINE_DOT(dot_f32, f32_t, AS_FLOAT)
DEFINE_DOT(dot_bf16, bf16_t, from_bf16)
DEFINE_DOT(dot_f16, f16_t, AS_FLOAT)

/* dtype codes: 0 float32, 1 bfloat16, 2 float16 */
static inline float dot_any(const float *q, const void *c, int64_t d_len, int dtype) {
    if (dtype == 0) return dot_f32(q, (const float *)c, d_len);
    if (dtype == 1) return dot_bf16(q, (const uint16_t *)c, d_len);
    return dot_f16(q, (const _Float16 *)c, d_len);
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

/* One row of skv_select_blocks (below): its units scored in one pass over their pool rows (all heads of a unit
 * are contiguous), then each head ranks its blocks. ext [Hk, S + 3], score [NB1], top [W]: this thread's
 * workspaces. */
static void select_row(int64_t r, const void *cent, int64_t cent_row, int cdt, const float *qsum, int64_t q_row,
                       const int64_t *slot, const int64_t *unit_slots, int64_t S, const uint8_t *valid,
                       const int64_t *cand, int64_t NB1, int64_t M, const int64_t *nblocks, const int32_t *tables,
                       int64_t H, int64_t D, int64_t W, float *ext, float *score, int64_t *top, int64_t *blocks,
                       int32_t *out_tables) {
    const int64_t E = S + 3;
    const int64_t esize = cdt == 0 ? 4 : 2;
    const float *q = qsum + slot[r] * q_row;
    const int64_t row_bytes = cent_row * esize;
    for (int64_t s = 0; s < S; s++) {
        const char *c = (const char *)cent + unit_slots[r * S + s] * row_bytes;
        if (PF > 0 && s + PF < S) {
            const char *n = (const char *)cent + unit_slots[r * S + s + PF] * row_bytes;
            for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(n + o, 0, 3);
        }
        const uint8_t *ok = valid + unit_slots[r * S + s] * H;
        for (int64_t h = 0; h < H; h++)
            ext[h * E + s] = ok[h] ? dot_any(q + h * D, c + h * D * esize, D, cdt) : -__builtin_inff();
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

/* cent: one layer's centroid pool, ``cent_row`` elements per unit ([Hk, D]) of dtype ``cdt`` (codes below); qsum: one layer's open query sums,
 * ``q_row`` floats per request slot; slot [R]; unit_slots [R, S]; valid: one layer's unit-pool masks [P, Hk] (bytes:
 * the head may take the unit); cand [R, NB1 * M]
 * (BlockPlan.cand: indices into the unit scores extended by UNCOVERED, FIXED, -inf); nblocks [R] blocks per row;
 * tables [R, Hk, NB1] int32 head-split ids (may be NULL); ext [T, Hk, S + 3], score [T, NB1], top [T, W]: one
 * workspace per thread, T = ``threads``.
 * Out: blocks [R, Hk, W] int64 logical blocks (may be NULL) and / or out_tables [R * Hk, W] int32 (needs tables);
 * slots past a row's own block count hold the padding column NB1 - 1.
 * query (may be NULL): the layer's query, row tok[r] at byte offset tok[r] * query_stride, its heads' query_bytes
 * contiguous; copied to row r of query_out, the head-split kernel's query (so the layer makes no tensor for it).
 * Rows are independent: with OpenMP they are shared among up to ``threads`` threads (the caller's team: in a
 * served worker, the threads vLLM pinned for torch). */
void skv_select_blocks(const void *cent, int64_t cent_row, int cdt, const float *qsum, int64_t q_row, const int64_t *slot,
                       const int64_t *unit_slots, int64_t S, const uint8_t *valid, const int64_t *cand,
                       int64_t NB1, int64_t M, const int64_t *nblocks, const int32_t *tables, int64_t R,
                       int64_t H, int64_t D, int64_t W, float *ext, float *score, int64_t *top,
                       int64_t *blocks, int32_t *out_tables, const char *query, int64_t query_stride,
                       const int64_t *tok, char *query_out, int64_t query_bytes, int64_t threads) {
    const int64_t nt = threads < R ? threads : R;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (int64_t r = 0; r < R; r++) {
        int64_t t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        if (query) memcpy(query_out + r * query_bytes, query + tok[r] * query_stride, (size_t)query_bytes);
        select_row(r, cent, cent_row, cdt, qsum, q_row, slot, unit_slots, S, valid, cand, NB1, M, nblocks, tables,
                   H, D, W, ext + t * H * (S + 3), score + t * NB1, top + t * W, blocks, out_tables);
    }
    (void)nt;
}

/* 1 when built with OpenMP (skv_select_blocks then shares rows among threads). */
int skv_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The blocks [first, last] a unit [start, end) touches (core/blocks.py: clamped at 0, at least one block). */
static inline void unit_blocks(int64_t start, int64_t end, int64_t bs, int64_t *first, int64_t *last) {
    *first = (start < 0 ? 0 : start) / bs;
    *last = (end - 1 < 0 ? 0 : end - 1) / bs;
    if (*last < *first) *last = *first;
}

/* core/blocks.py's plan_blocks for R rows (see BlockPlan there for every output). starts / ends [R, S] int64,
 * valid [R, S] bytes, seq / budget / tail_start [R] int64; NB1 = the widest row's blocks + 1 (padding column).
 * Out: base [R, NB1] float, fixed [R, NB1] bytes, k / seq_out [R] int64, cand [R, NB1, M] int64 with M = the most
 * valid units overlapping one block + 1, written only when R * NB1 * M <= cap (else nothing: the caller retries
 * with room for M); counts [R * NB1] workspace. Returns M. A block's units are listed in ascending unit order,
 * padded with S (UNCOVERED); sink / tail blocks hold S + 1 (FIXED), blocks past the row S + 2 (-inf). */
int64_t skv_plan_blocks(const int64_t *starts, const int64_t *ends, const uint8_t *valid, int64_t R, int64_t S,
                        const int64_t *seq, const int64_t *budget, const int64_t *tail_start, int64_t sinks,
                        int64_t bs, int64_t NB1, float *base, uint8_t *fixed, int64_t *k_out, int64_t *seq_out,
                        int64_t *counts, int64_t *cand, int64_t cap) {
    int64_t M = 1;
    memset(counts, 0, (size_t)(R * NB1) * sizeof *counts);
    for (int64_t r = 0; r < R; r++) {
        const int64_t nb = (seq[r] + bs - 1) / bs;
        const int64_t per = budget[r] / bs < 1 ? 1 : budget[r] / bs;
        const int64_t k = nb < per ? nb : per;
        const int64_t sink_blocks = (sinks + bs - 1) / bs;
        const int64_t n_sink = sink_blocks < k - 1 ? sink_blocks : k - 1;
        const int64_t ts = (tail_start[r] < 0 ? 0 : tail_start[r]) / bs;
        const int64_t tail_first = ts > nb - (k - n_sink) ? ts : nb - (k - n_sink);
        k_out[r] = k;
        seq_out[r] = (k - 1) * bs + seq[r] - (nb - 1) * bs;
        for (int64_t b = 0; b < NB1; b++) {
            const int in_range = b < nb;
            base[r * NB1 + b] = in_range ? UNCOVERED : -__builtin_inff();
            fixed[r * NB1 + b] = (uint8_t)(in_range && (b < n_sink || b >= tail_first));
        }
        for (int64_t s = 0; s < S; s++) {
            if (!valid[r * S + s]) continue;
            int64_t first, last;
            unit_blocks(starts[r * S + s], ends[r * S + s], bs, &first, &last);
            for (int64_t b = first; b <= last && b < NB1; b++)
                if (++counts[r * NB1 + b] + 1 > M) M = counts[r * NB1 + b] + 1;
        }
    }
    if (R * NB1 * M > cap) return M;
    for (int64_t r = 0; r < R; r++) {
        int64_t *c = cand + r * NB1 * M;
        for (int64_t i = 0; i < NB1 * M; i++) c[i] = S;
        memset(counts + r * NB1, 0, (size_t)NB1 * sizeof *counts);
        for (int64_t s = 0; s < S; s++) {
            if (!valid[r * S + s]) continue;
            int64_t first, last;
            unit_blocks(starts[r * S + s], ends[r * S + s], bs, &first, &last);
            for (int64_t b = first; b <= last && b < NB1; b++) c[b * M + counts[r * NB1 + b]++] = s;
        }
        for (int64_t b = 0; b < NB1; b++) {
            const int64_t pin = base[r * NB1 + b] == UNCOVERED ? (fixed[r * NB1 + b] ? S + 1 : -1) : S + 2;
            if (pin >= 0)
                for (int64_t j = 0; j < M; j++) c[b * M + j] = pin;
        }
    }
    return M;
}

/* dtype codes: 0 float32, 1 bfloat16, 2 float16 */
static inline float load(const void *p, int64_t i, int dtype) {
    if (dtype == 0) return ((const float *)p)[i];
    if (dtype == 1) return from_bf16(((const uint16_t *)p)[i]);
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

/* hotset.HotSets.resolve + host_reads.make_resident for one layer, every row: the step's selected host keys
 * (key = logical block * Hk + KV head) ranked by selected count (ties: lower key), the top ones made resident in
 * the row's hot entries (misses copied, one head slice each, into the entries holding no top key: least recently
 * used first, ties by entry order), then the rows' tables remapped to the entries now holding their keys.
 *
 * rows [R] request slots; logical / valid [R, N] (N = Hk * selected per head, head-major); host_slots [R, M] host
 * slot of each logical block (-1 on the device); block_ids [slots, H] hot entries (p * Hk + s, -1 none); holds /
 * last [slots, H] this layer's key held (-1 none) and step of last use, updated in place; dev / host: the layer's
 * device cache and host pool as rows of one head slice (``slice_bytes``): device row = entry, host row =
 * slot * Hk + head. entries / host_tab [R, Hk * M] (copies of the step's tables) are remapped in place. Workspaces:
 * count [Hk * M] int32, mark / tmark [Hk * M] bytes, top [N] keys, victims [H]. stats[0..3) += hits, misses,
 * loaded. */
static void rank_keys(int64_t *keys, int64_t n, const int32_t *count) {
    for (int64_t i = 1; i < n; i++) {           /* insertion sort: count descending, then key ascending */
        const int64_t v = keys[i];
        int64_t j = i;
        while (j > 0 && (count[keys[j - 1]] < count[v] || (count[keys[j - 1]] == count[v] && keys[j - 1] > v))) {
            keys[j] = keys[j - 1];
            j--;
        }
        keys[j] = v;
    }
}

void skv_hot_resolve(const int64_t *rows, int64_t R, const int64_t *logical, const uint8_t *valid, int64_t N,
                     const int64_t *host_slots, int64_t M, int64_t Hk, int64_t step, const int64_t *block_ids,
                     int64_t H, int64_t *holds, int64_t *last, char *dev, const char *host, int64_t slice_bytes,
                     int64_t *entries, int64_t *host_tab, int32_t *count, uint8_t *mark, uint8_t *tmark,
                     int64_t *top, int64_t *victims, int64_t *stats) {
    const int64_t K = Hk * M;
    for (int64_t r = 0; r < R; r++) {
        const int64_t slot = rows[r];
        const int64_t *ids = block_ids + slot * H;
        int64_t *hold = holds + slot * H, *lst = last + slot * H;
        const int64_t *hs = host_slots + r * M;
        memset(count, 0, K * sizeof *count);
        memset(mark, 0, K);
        memset(tmark, 0, K);
        for (int64_t i = 0; i < N; i++) {
            if (!valid[r * N + i]) continue;
            const int64_t b = logical[r * N + i], h = i / (N / Hk);
            if (hs[b] >= 0) count[b * Hk + h]++;
        }
        int64_t size = 0;
        for (int64_t e = 0; e < H; e++) {
            if (ids[e] < 0) continue;
            size++;
            if (hold[e] >= 0 && hold[e] < K) mark[hold[e]] = 1;
        }
        int64_t n = 0;
        for (int64_t key = 0; key < K; key++) {
            if (count[key] <= 0) continue;
            top[n++] = key;
            stats[0] += mark[key];
            if (size) stats[1] += !mark[key];
        }
        for (int64_t e = 0; e < H; e++)
            if (ids[e] >= 0 && hold[e] < K && count[hold[e] < 0 ? 0 : hold[e]] > 0) lst[e] = step;
        rank_keys(top, n, count);
        const int64_t ntop = n < size ? n : size;      /* size <= H, and H <= K whenever entries exist */
        for (int64_t j = 0; j < ntop; j++) tmark[top[j]] = 1;
        int64_t nv = 0;
        for (int64_t e = 0; e < H; e++) {               /* entries holding no top key, least recently used first */
            if (ids[e] < 0 || (hold[e] < K && tmark[hold[e] < 0 ? 0 : hold[e]])) continue;
            int64_t j = nv++;
            while (j > 0 && lst[victims[j - 1]] > lst[e]) { victims[j] = victims[j - 1]; j--; }
            victims[j] = e;
        }
        int64_t used = 0;
        for (int64_t j = 0; j < ntop; j++) {
            const int64_t key = top[j];
            if (mark[key]) continue;
            const int64_t e = victims[used++];
            memcpy(dev + ids[e] * slice_bytes, host + (hs[key / Hk] * Hk + key % Hk) * slice_bytes, slice_bytes);
            hold[e] = key;
            lst[e] = step;
            stats[2]++;
        }
        for (int64_t e = 0; e < H; e++) {
            if (ids[e] < 0 || hold[e] < 0 || hold[e] >= K) continue;
            const int64_t col = (hold[e] % Hk) * M + hold[e] / Hk;
            entries[r * K + col] = ids[e];
            host_tab[r * K + col] = -1;
        }
    }
}

/* BlockLayout.range_keys: the keys of positions [lo, hi) of one request, [hi - lo, n] elements of ``esize`` bytes,
 * from its blocks block_row[] of a cache whose blocks are ``block_bytes`` apart; k_off [bs, n] the element offset
 * of each (token in block, head * D + d) inside a block (the probed layout: AMX's packed keys too). Tokens are
 * shared among ``threads`` threads. Replaces copying the blocks whole (values too) and then picking the keys. */
void skv_gather_keys(const char *cache, int64_t block_bytes, const int64_t *block_row, const int64_t *k_off,
                     int64_t bs, int64_t n, int64_t esize, int64_t lo, int64_t hi, char *out, int64_t threads) {
    const int64_t nt = threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && hi - lo > 64)
#endif
    for (int64_t t = lo; t < hi; t++) {
        const char *block = cache + block_row[t / bs] * block_bytes;
        const int64_t *off = k_off + (t % bs) * n;
        char *dst = out + (t - lo) * n * esize;
        if (esize == 2)
            for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = ((const uint16_t *)block)[off[i]];
        else
            for (int64_t i = 0; i < n; i++) ((uint32_t *)dst)[i] = ((const uint32_t *)block)[off[i]];
    }
    (void)nt;
}

/* core/index.py's sentence_centroids, float32 keys [T, H, D]: per span [start, end) and head the mean of all its
 * keys and of its retained ones (retained [H, T] bytes, may be NULL: all), summed in token order from zero as
 * index_add_ does (the same bits). cent [S, H, D]: the retained mean, or the mean of all keys where the head
 * retained none; has [S, H]: whether it retained any. Spans are shared among ``threads`` threads. */
void skv_centroids(const float *keys, int64_t T, int64_t H, int64_t D, const int64_t *spans, int64_t S,
                   const uint8_t *retained, float *cent, uint8_t *has, int64_t threads) {
    const int64_t nt = threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && S > 8)
#endif
    for (int64_t s = 0; s < S; s++) {
        const int64_t a = spans[2 * s] < 0 ? 0 : spans[2 * s], b = spans[2 * s + 1] > T ? T : spans[2 * s + 1];
        const float all_cnt = (float)(spans[2 * s + 1] - spans[2 * s] < 1 ? 1 : spans[2 * s + 1] - spans[2 * s]);
        for (int64_t h = 0; h < H; h++) {
            float all[D], kept[D];
            float cnt = 0.f;
            for (int64_t d = 0; d < D; d++) all[d] = kept[d] = 0.f;
            for (int64_t t = a; t < b; t++) {
                const float *k = keys + (t * H + h) * D;
                const int r = retained ? retained[h * T + t] : 1;
                for (int64_t d = 0; d < D; d++) all[d] += k[d];
                if (r) {
                    for (int64_t d = 0; d < D; d++) kept[d] += k[d];
                    cnt += 1.f;
                }
            }
            float *c = cent + (s * H + h) * D;
            has[s * H + h] = cnt > 0;
            for (int64_t d = 0; d < D; d++) c[d] = cnt > 0 ? kept[d] / cnt : all[d] / all_cnt;
        }
    }
    (void)nt;
}
