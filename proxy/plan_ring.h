/* plan_ring.h - a worker's side of query plans: pick slow and sampled statements, queue them. */
#ifndef PGRELAY_PLAN_RING_H
#define PGRELAY_PLAN_RING_H

#include <stdbool.h>
#include <stdint.h>

#include "shm.h"

/* Body bytes kept of a Query or Parse with a long text: name, text, types. */
#define PLAN_LONG_CAPTURE (SHM_PLAN_TEXT_MAX + 64 + 2 + 4 * SHM_PLAN_TYPES_MAX)
/* Body bytes kept of a Bind: names, formats, values. */
#define PLAN_BIND_CAPTURE (SHM_PLAN_PARAMS_MAX + 256)

/* What a session keeps of its extended-protocol statement for a plan request: the Parse's
 * statement name and declared types, and the raw head of the last Bind (decoded only when the
 * statement is queued). Filled only while planning is on. */
typedef struct plan_capture {
    bool extended;        /* the current statement came by Parse/Bind, not Query */
    bool truncated;       /* its text was longer than what was kept of it: cut */
    bool long_used;       /* its text is in long_text (longer than the slot's stmt) */
    char *long_text;      /* malloc'd on the first long text while planning is on:
                           * PLAN_LONG_CAPTURE + 1 bytes; freed with the session */
    bool function_call;   /* it is a FunctionCall: no text to plan */
    char parse_name[64];  /* name of the last Parse's prepared statement ("" unnamed) */
    bool parse_name_long; /* that name did not fit */
    uint16_t n_types;     /* types the last Parse declared (kept up to the max) */
    uint32_t types[SHM_PLAN_TYPES_MAX];
    uint32_t bind_len;  /* the last Bind's body length */
    uint32_t bind_have; /* bytes of it in bind */
    uint8_t bind[PLAN_BIND_CAPTURE];
} plan_capture;

struct session;
struct worker;

/* Is planning on in this worker's settings (a threshold or a sample rate)? */
bool plan_enabled(const struct worker *w);

/* A statement ended after latency_us: queue it when it is slow or picked at random. A few
 * compares when it is neither. */
void plan_statement_ended(struct worker *w, struct session *s, uint64_t latency_us);

/* A Query or Parse begins (body_len bytes): where the scanner keeps its text. The slot's stmt,
 * or, for a text longer than it while planning is on, the session's long buffer (the slot
 * gets its head in plan_text_end). Returns the bytes to capture. */
struct pg_scan;
uint32_t plan_text_begin(struct session *s, struct pg_scan *scan, uint32_t body_len);

/* The Query or Parse whose text went to the long buffer has passed: its Parse name and types
 * are noted, the text moved to the front, its head copied to the slot's stmt. */
void plan_text_end(struct session *s, uint8_t type, uint32_t captured, uint32_t body_len);

/* A session ends: free what the capture allocated. */
void plan_capture_free(plan_capture *pc);

/* The Parse body in the session slot's stmt (captured bytes): keep its name and types. Called
 * before the text is moved to the front of stmt. */
void plan_parse_seen(struct session *s, const uint8_t *body, uint32_t captured, uint32_t body_len);

#endif
