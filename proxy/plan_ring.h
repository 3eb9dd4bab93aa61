/* plan_ring.h - a worker's side of query plans: pick slow and sampled statements, queue them. */
#ifndef PGRELAY_PLAN_RING_H
#define PGRELAY_PLAN_RING_H

#include <stdbool.h>
#include <stdint.h>

#include "shm.h"

#define PLAN_BIND_CAPTURE (SHM_PLAN_PARAMS_MAX + 256) /* Bind body bytes kept: names, formats,
                                                       * values */

/* What a session keeps of its extended-protocol statement for a plan request: the Parse's
 * statement name and declared types, and the raw head of the last Bind (decoded only when the
 * statement is queued). Filled only while planning is on. */
typedef struct plan_capture {
    bool extended;                /* the current statement came by Parse/Bind, not Query */
    bool truncated;               /* its text was longer than the slot's stmt: cut */
    bool function_call;           /* it is a FunctionCall: no text to plan */
    char parse_name[64];          /* name of the last Parse's prepared statement ("" unnamed) */
    bool parse_name_long;         /* that name did not fit */
    uint16_t n_types;             /* types the last Parse declared (kept up to the max) */
    uint32_t types[SHM_PLAN_TYPES_MAX];
    uint32_t bind_len;            /* the last Bind's body length */
    uint32_t bind_have;           /* bytes of it in bind */
    uint8_t bind[PLAN_BIND_CAPTURE];
} plan_capture;

struct session;
struct worker;

/* Is planning on in this worker's settings (a threshold or a sample rate)? */
bool plan_enabled(const struct worker *w);

/* A statement ended after latency_us: queue it when it is slow or picked at random. A few
 * compares when it is neither. */
void plan_statement_ended(struct worker *w, struct session *s, uint64_t latency_us);

/* The Parse body in the session slot's stmt (captured bytes): keep its name and types. Called
 * before the text is moved to the front of stmt. */
void plan_parse_seen(struct session *s, const uint8_t *body, uint32_t captured,
                     uint32_t body_len);

#endif
