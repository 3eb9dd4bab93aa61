/* plan_ring.c - a worker's side of query plans: pick slow and sampled statements, queue them.
 *
 * At the end of each statement relay.c calls plan_statement_ended: one compare against
 * plan_slow_threshold and, with plan_sample_rate, one xorshift draw. A statement picked is
 * copied into this worker's ring in shared memory (text, user, database, node, and for the
 * extended protocol the Parse's types and the Bind's text-format values); the agent's planner
 * takes it from there. A full ring drops the request and counts it: the worker never waits.
 */
#include "plan_ring.h"
#include "session.h"
#include "worker.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* This worker's random state (xorshift64*: a few shifts per draw, no lock, no syscall). */
static uint64_t plan_rng;

static uint64_t plan_random(void)
{
    if (plan_rng == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        plan_rng = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ ((uint64_t)getpid() << 40);
        if (plan_rng == 0)
            plan_rng = 0x9e3779b97f4a7c15ull;
    }
    plan_rng ^= plan_rng >> 12;
    plan_rng ^= plan_rng << 25;
    plan_rng ^= plan_rng >> 27;
    return plan_rng * 0x2545f4914f6cdd1dull;
}

bool plan_enabled(const worker *w)
{
    return w->cfg->plan_slow_threshold_ms > 0 || w->cfg->plan_sample_rate > 0.0;
}

/* Read a big-endian int16/int32 from a bounded buffer; false past its end. */
static bool get16(const uint8_t *p, uint32_t len, uint32_t *off, uint16_t *v)
{
    if (*off + 2 > len)
        return false;
    *v = (uint16_t)((p[*off] << 8) | p[*off + 1]);
    *off += 2;
    return true;
}

static bool get32(const uint8_t *p, uint32_t len, uint32_t *off, uint32_t *v)
{
    if (*off + 4 > len)
        return false;
    *v = pg_get_u32(p + *off);
    *off += 4;
    return true;
}

void plan_parse_seen(session *s, const uint8_t *body, uint32_t captured, uint32_t body_len)
{
    plan_capture *pc = &s->plan;
    (void)body_len;
    pc->extended = true;
    pc->function_call = false;
    if (!plan_enabled(worker_self))
        return; /* planning off: no scan of the body */
    pc->n_types = 0;
    pc->truncated = false;
    /* statement name \0 query \0 int16 n, n * int32 type */
    const uint8_t *nul = memchr(body, '\0', captured);
    size_t name_len = nul ? (size_t)(nul - body) : captured;
    pc->parse_name_long = name_len >= sizeof(pc->parse_name) || !nul;
    memcpy(pc->parse_name, body, pc->parse_name_long ? 0 : name_len);
    pc->parse_name[pc->parse_name_long ? 0 : name_len] = '\0';
    if (!nul)
        return;
    const uint8_t *q = nul + 1;
    const uint8_t *qend = memchr(q, '\0', captured - (uint32_t)(q - body));
    if (!qend) {
        /* The text is longer than what was captured: cut (the planner skips it). */
        pc->truncated = true;
        return;
    }
    uint32_t off = (uint32_t)(qend + 1 - body);
    uint16_t n;
    if (!get16(body, captured, &off, &n))
        return;
    for (uint16_t i = 0; i < n && i < SHM_PLAN_TYPES_MAX; i++) {
        uint32_t t;
        if (!get32(body, captured, &off, &t))
            break;
        pc->types[pc->n_types++] = t;
    }
}

uint32_t plan_text_begin(session *s, pg_scan *scan, uint32_t body_len)
{
    plan_capture *pc = &s->plan;
    pc->long_used = false;
    if (body_len > SHM_STMT_MAX - 1 && plan_enabled(worker_self) &&
        (pc->long_text || (pc->long_text = malloc(PLAN_LONG_CAPTURE + 1)))) {
        scan->capture = (uint8_t *)pc->long_text;
        scan->capture_cap = PLAN_LONG_CAPTURE;
        pc->long_used = true;
    } else {
        scan->capture = (uint8_t *)s->slot->stmt;
        scan->capture_cap = SHM_STMT_MAX - 1;
    }
    return scan->capture_cap;
}

void plan_text_end(session *s, uint8_t type, uint32_t captured, uint32_t body_len)
{
    plan_capture *pc = &s->plan;
    char *text = pc->long_text;
    text[captured] = '\0';
    if (type == PG_MSG_PARSE) {
        plan_parse_seen(s, (const uint8_t *)text, captured, body_len);
        size_t name_len = strnlen(text, captured);
        if (name_len < captured)
            memmove(text, text + name_len + 1, captured - name_len);
        else
            text[0] = '\0';
    } else {
        /* the text and its NUL: cut when the NUL is not in what was kept */
        pc->truncated = captured < body_len;
    }
    size_t len = strnlen(text, SHM_PLAN_TEXT_MAX);
    if (len > SHM_PLAN_TEXT_MAX - 1)
        pc->truncated = true;
    size_t head = len < SHM_STMT_MAX - 1 ? len : SHM_STMT_MAX - 1;
    memcpy(s->slot->stmt, text, head);
    s->slot->stmt[head] = '\0';
}

void plan_capture_free(plan_capture *pc)
{
    free(pc->long_text);
    pc->long_text = NULL;
}

/* Decode the captured Bind into the request: the statement name must be the last Parse's, the
 * values all in text format and within SHM_PLAN_PARAMS_MAX. */
static void plan_fill_params(const plan_capture *pc, shm_plan_request *r)
{
    const uint8_t *b = pc->bind;
    uint32_t len = pc->bind_have, off = 0;
    r->flags |= PLAN_REQ_EXTENDED;
    /* portal name \0 statement name \0 */
    const uint8_t *nul = memchr(b, '\0', len);
    if (!nul)
        goto too_long;
    off = (uint32_t)(nul + 1 - b);
    nul = memchr(b + off, '\0', len - off);
    if (!nul)
        goto too_long;
    size_t name_len = (size_t)(nul - (b + off));
    if (pc->parse_name_long || name_len != strlen(pc->parse_name) ||
        memcmp(b + off, pc->parse_name, name_len) != 0) {
        r->flags |= PLAN_REQ_UNKNOWN_STMT;
        return;
    }
    off = (uint32_t)(nul + 1 - b);
    uint16_t n_formats, n_params;
    if (!get16(b, len, &off, &n_formats))
        goto too_long;
    uint32_t formats_at = off;
    if (n_formats > len - off) /* 2 bytes each: cheap bound before looking at them */
        goto too_long;
    off += 2u * n_formats;
    if (!get16(b, len, &off, &n_params))
        goto too_long;
    if (n_params > (uint16_t)(sizeof(r->binary) * 8) || (n_formats > 1 && n_formats != n_params))
        goto too_long;
    memset(r->binary, 0, sizeof(r->binary));
    for (uint16_t i = 0; i < n_params && n_formats > 0; i++) {
        uint32_t at = formats_at + 2u * (n_formats == 1 ? 0 : i);
        if (at + 2 > len)
            goto too_long;
        if (b[at] != 0 || b[at + 1] != 0) {
            r->binary[i / 8] |= (uint8_t)(1u << (i % 8));
            r->flags |= PLAN_REQ_BINARY;
        }
    }
    uint32_t start = off;
    for (uint16_t i = 0; i < n_params; i++) {
        uint32_t vlen;
        if (!get32(b, len, &off, &vlen))
            goto too_long;
        if (vlen != 0xffffffffu) {
            if (vlen > len - off)
                goto too_long;
            off += vlen;
        }
    }
    if (off - start > sizeof(r->params))
        goto too_long;
    memcpy(r->params, b + start, off - start);
    r->params_len = off - start;
    r->n_params = n_params;
    r->n_types = pc->n_types;
    memcpy(r->types, pc->types, sizeof(uint32_t) * pc->n_types);
    return;
too_long:
    r->flags |= PLAN_REQ_PARAMS_LONG;
}

void plan_statement_ended(worker *w, session *s, uint64_t latency_us)
{
    const config *cfg = w->cfg;
    shm_plan_reason reason = PLAN_REASON_NONE;
    if (cfg->plan_slow_threshold_ms > 0 &&
        latency_us >= (uint64_t)cfg->plan_slow_threshold_ms * 1000)
        reason = PLAN_REASON_SLOW;
    else if (cfg->plan_sample_rate > 0.0 &&
             (double)(plan_random() >> 11) * (1.0 / 9007199254740992.0) < cfg->plan_sample_rate)
        reason = PLAN_REASON_SAMPLED;
    if (reason == PLAN_REASON_NONE || s->plan.function_call)
        return;

    shm_plan_ring *ring = shm_plan_ring_of(w->shm, (uint32_t)w->index);
    if (reason == PLAN_REASON_SAMPLED)
        shm_stat_add(&ring->sampled, 1);
    uint64_t head = atomic_load_explicit(&ring->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&ring->tail, memory_order_acquire);
    if (head - tail >= SHM_PLAN_RING) {
        shm_stat_add(&ring->dropped, 1);
        return;
    }
    shm_plan_request *r = &ring->req[head % SHM_PLAN_RING];
    shm_session *slot = s->slot;
    r->at_us = shm_now_us();
    r->duration_us = (int64_t)latency_us;
    r->reason = reason;
    r->flags = 0;
    r->n_types = r->n_params = 0;
    r->params_len = 0;
    memcpy(r->node_name, slot->node_name, sizeof(r->node_name));
    memcpy(r->user, slot->user, sizeof(r->user));
    memcpy(r->database, slot->database, sizeof(r->database));
    const char *text = s->plan.long_used ? s->plan.long_text : slot->stmt;
    size_t tlen = strnlen(text, s->plan.long_used ? sizeof(r->text) - 1 : sizeof(slot->stmt) - 1);
    memcpy(r->text, text, tlen);
    r->text[tlen] = '\0';
    if (s->plan.truncated)
        r->flags |= PLAN_REQ_TRUNCATED;
    if (s->plan.extended)
        plan_fill_params(&s->plan, r);
    atomic_store_explicit(&ring->head, head + 1, memory_order_release);
}
