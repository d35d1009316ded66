/* The CPU pool's decode loop in C: poll the mailbox slots (shared/mailbox.py), run each request's
 * layer (expert_kernel.c: moe_layer), answer it, and read the next layer's likely experts ahead
 * until the next request comes (krasis_lookahead), without returning to Python between layers.
 * cpu_worker/main.py calls krasis_loop while decode is under way and keeps what is rare: control
 * messages, error replies, requests that the C kernel does not serve (fp16 x, the numba fallback).
 *
 * Why: in Python the loop cost the lent hosts (whose Python ran 3-5x slower than the dev machine's)
 * ~15 us a layer on the request's path (poll, the slot's views, ctypes, the answer) and kept the
 * lookahead's first read ~35 us behind the answer (its bookkeeping and its C call's arguments), while
 * the GPU's turn between two layers of a step is ~60 us (session 24). Here the request is seen by
 * a load, the answer is a store, and the lookahead's guess starts at once.
 *
 * The lookahead's policy is lookahead.py's (it documents why): which layer comes next (learned per
 * slot, the store's next MoE layer until then), experts unasked for QUIET requests left out (hcs
 * hybrid's hot ones), a layer whose lookahead read nothing EMPTY times in a row skipped for its next
 * SKIP requests with the team held running instead (krasis_hold), and its guesses scored.
 */
#include "expert_kernel.c"

/* shared/mailbox.py's header words, and its dtype codes of x (_DTYPES) that the kernel takes */
enum { REQUEST_WORD, REPLY_WORD, LAYER_WORD, M_WORD, DTYPE_WORD, ERROR_WORD, VERSION_WORD, FILLED_WORD, GUESS_WORD,
       GUESS_LAYER_WORD };
enum { X_FLOAT32, X_BF16 };

/* The loop's counters (cpu_worker/native.py: LOOP_STATS names them in this order), in seconds where
 * a time: calls, tokens, pairs run, the largest M; the kernel, from seeing a request to answering it;
 * the wait since the previous answer when the request is a later layer of the same step (gap) or a
 * new step (step_gap), and their counts, waits longer than idle_s left out (the pool was idle: a
 * prefill, no request); the kernel of the requests that start a step; from answering to polling
 * again (after); the lookahead's calls, bytes read, skipped lookaheads; of the chosen experts of the
 * pool's block in requests for a guessed layer, how many the guess named; the lookaheads that read
 * the GPU worker's guess (the slot's) instead of making their own. */
enum { S_CALLS, S_TOKENS, S_PAIRS, S_MAX_M, S_KERNEL, S_SERVE, S_GAP, S_GAPS, S_STEP_GAP, S_STEP_GAPS, S_STEP_KERNEL,
       S_AFTER, S_AHEAD_CALLS, S_AHEAD_BYTES, S_AHEAD_SKIPPED, S_GUESSED, S_CHOSEN, S_POSTED, S_N };

typedef struct { /* one mailbox slot's parts, as shared/mailbox.py lays them out */
    int64_t *hdr;
    const void *x;
    const int32_t *ids;
    const float *weights;
    float *out;
    const int32_t *guess;
} slot_t;

typedef struct {
    int nslots, nlayers, max_m, topk;
    slot_t *slots;
    const int64_t *const *words; /* [nslots]: each slot's request word, for krasis_lookahead's and krasis_hold's halt */
    int64_t *seen;               /* [nslots]: the request numbers taken */
    const block_t *const *blocks; /* [nlayers]: the pool's block of a layer, NULL: not served here */
    const ahead_t *const *routers; /* [nlayers]: a layer's router for guessing it (router, bias, E: the rest
                                    * is filled per lookahead), NULL: none */
    int32_t *next;               /* [nlayers]: the layer looked ahead at after this one, -1 none */
    int32_t *previous;           /* [nslots]: the layer of the slot's last request, -1 none */
    int32_t *experts;            /* [nlayers]: the layer's number of experts */
    int64_t **last;              /* [nlayers] -> [experts]: the request count at which each expert was last asked for */
    int64_t *asked;              /* [nlayers]: requests of the layer */
    int32_t *empty, *skip;       /* [nlayers]: lookaheads in a row that read nothing; requests left to skip */
    uint8_t *allowed;            /* [the most experts of a layer]: scratch */
    int32_t *guess;              /* [max_m * topk]: the last guess, for layer `pending` (-1: none) */
    int32_t pending, last_layer;
    int64_t budget, quiet;       /* lookahead bytes (0: off); QUIET */
    int32_t empty_max, skip_n;   /* EMPTY, SKIP */
    double hold_s, idle_s;       /* HOLD_S; decode_loop.py's IDLE_S */
    double answered;             /* when the last answer was written (0: none yet) */
    double stats[S_N];
} loop_t;

/* Of the experts of layer's block that ids [mk] chose, how many the pending guess named. */
static void score(loop_t *L, int layer, const int32_t *ids, int mk) {
    const int pending = L->pending;
    L->pending = -1;
    if (pending != layer) return;
    const block_t *b = L->blocks[layer];
    for (int i = 0; i < mk; i++) {
        const int64_t e = ids[i];
        if (e < b->first || e >= b->first + b->count) continue;
        int dup = 0, hit = 0;
        for (int j = 0; j < i; j++) dup |= ids[j] == e;
        if (dup) continue; /* counted once, as a set */
        for (int j = 0; j < mk; j++) hit |= L->guess[j] == e;
        L->stats[S_CHOSEN] += 1, L->stats[S_GUESSED] += hit;
    }
}

/* Bookkeeping after answering slot i's request for `layer`, then the lookahead (lookahead.py's run). */
static void after(loop_t *L, int i, int layer, const tokens_t *t) {
    const int mk = t->M * t->topk;
    const int before = L->previous[i];
    if (before >= 0 && before < layer && L->routers[layer]) L->next[before] = layer;
    L->previous[i] = layer;
    score(L, layer, t->ids, mk);
    int64_t *last = L->last[layer];
    for (int j = 0; j < mk; j++)
        if (t->ids[j] >= 0 && t->ids[j] < L->experts[layer]) last[t->ids[j]] = L->asked[layer];
    L->asked[layer]++;
    if (L->skip[layer] > 0) {
        L->skip[layer]--;
        L->stats[S_AHEAD_SKIPPED] += 1;
        krasis_hold(L->words, L->seen, L->nslots, L->hold_s, L->blocks[layer]->nthreads);
        return;
    }
    /* The GPU worker's guess, when it posted one after this request (its router on this x, for the
     * layer it will send next: shared/mailbox.py), is taken as made; otherwise the pool makes its own
     * for the layer that followed this one last time. */
    const slot_t *s = &L->slots[i];
    const int64_t posted_layer = s->hdr[GUESS_LAYER_WORD];
    const int posted = __atomic_load_n(&s->hdr[GUESS_WORD], __ATOMIC_ACQUIRE) == L->seen[i] && posted_layer >= 0
                       && posted_layer < L->nlayers && L->blocks[posted_layer];
    const int nxt = posted ? (int)posted_layer : L->next[layer];
    if (nxt < 0) return;
    ahead_t a = {0};
    if (posted) {
        for (int j = 0; j < mk; j++) L->guess[j] = s->guess[j];
        L->stats[S_POSTED] += 1;
    } else {
        a = *L->routers[nxt];
    }
    a.nwords = L->nslots, a.words = L->words, a.seen = L->seen, a.max_s = 0.0, a.budget = L->budget;
    a.predicted = L->guess, a.allowed = NULL, a.experts = L->experts[nxt];
    if (L->asked[nxt] >= L->quiet) {
        for (int e = 0; e < L->experts[nxt]; e++) L->allowed[e] = L->last[nxt][e] >= L->asked[nxt] - L->quiet;
        a.allowed = L->allowed;
    }
    const int64_t read = krasis_lookahead(L->blocks[nxt], t, &a);
    if (read < 0) return; /* out of memory: no lookahead, the layers are still served */
    L->stats[S_AHEAD_CALLS] += 1, L->stats[S_AHEAD_BYTES] += (double)read;
    L->pending = nxt;
    L->empty[layer] = read ? 0 : L->empty[layer] + 1;
    if (L->empty[layer] >= L->empty_max) L->empty[layer] = 0, L->skip[layer] = L->skip_n;
}

/* Serve the slots until none has a request for idle_s seconds (returns -1), or until max_s seconds
 * have passed when a request comes (-2: the caller checks its control socket and calls again, the
 * request still waiting), or until slot i has a request this loop does not serve: a layer with no
 * block here, x in fp16, M outside [1, max_m], or a kernel that could not allocate (returns i,
 * the request not taken: the caller serves it, with an error reply where it must). */
int krasis_loop(loop_t *L, double idle_s, double max_s) {
    const double start = omp_get_wtime();
    double last_work = start;
    for (;;) {
        int i = -1;
        while (i < 0) {
            for (int j = 0; j < L->nslots && i < 0; j++)
                if (__atomic_load_n(L->words[j], __ATOMIC_ACQUIRE) != L->seen[j]) i = j;
            if (i >= 0) break;
            if (omp_get_wtime() - last_work > idle_s) return -1;
            relax(); /* expert_kernel.c says why */
        }
        const double seen_at = omp_get_wtime();
        if (seen_at - start > max_s) return -2;
        slot_t *s = &L->slots[i];
        const int64_t number = __atomic_load_n(&s->hdr[REQUEST_WORD], __ATOMIC_ACQUIRE);
        const int64_t layer = s->hdr[LAYER_WORD], m = s->hdr[M_WORD], code = s->hdr[DTYPE_WORD];
        if (layer < 0 || layer >= L->nlayers || !L->blocks[layer] || m < 1 || m > L->max_m || (code != X_FLOAT32 && code != X_BF16)) return i;
        const tokens_t t = {(int)m, L->topk, code == X_BF16, s->x, s->ids, s->weights, s->out};
        const int pairs = krasis_moe_layer(L->blocks[layer], &t);
        if (pairs < 0) return i;
        const double done = omp_get_wtime();
        L->seen[i] = number;
        s->hdr[ERROR_WORD] = 0;
        __atomic_store_n(&s->hdr[REPLY_WORD], number, __ATOMIC_RELEASE);
        const double answered = omp_get_wtime();
        double *st = L->stats;
        st[S_CALLS] += 1, st[S_TOKENS] += (double)m, st[S_PAIRS] += pairs;
        if (m > st[S_MAX_M]) st[S_MAX_M] = (double)m;
        st[S_KERNEL] += done - seen_at, st[S_SERVE] += answered - seen_at;
        if (L->answered > 0 && seen_at - L->answered < L->idle_s) {
            const int later = layer > L->last_layer;
            st[later ? S_GAP : S_STEP_GAP] += seen_at - L->answered;
            st[later ? S_GAPS : S_STEP_GAPS] += 1;
            if (!later) st[S_STEP_KERNEL] += done - seen_at;
        }
        L->answered = answered, L->last_layer = (int32_t)layer;
        if (L->budget) after(L, i, (int)layer, &t);
        last_work = omp_get_wtime();
        st[S_AFTER] += last_work - answered;
    }
}
