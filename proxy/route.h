/* route.h - which node a new session goes to, and what live sessions do when routing changes. */
#ifndef PGRELAY_ROUTE_H
#define PGRELAY_ROUTE_H

#include "session.h"

struct worker;

typedef enum route_result {
    ROUTE_OK = 0,  /* *node is set */
    ROUTE_WAIT,    /* no write leader yet, and no_leader_wait allows waiting */
    ROUTE_REFUSE,  /* no node: *sqlstate and msg say why */
} route_result;

/* Pick the node for session s from the worker's current table. */
route_result route_pick(struct worker *w, session *s, int *node, const char **sqlstate,
                        char *msg, size_t msglen);

/* The table is the master's static guess while an agent is about to probe: no write session
 * may be routed by it. */
bool route_leader_unconfirmed(const struct worker *w, const shm_route_table *t);

/* How long a new write session may be held for a (confirmed) write leader: no_leader_wait, and
 * while the leader is unconfirmed at least the agent's first probe (health_timeout + 1s). */
int route_leader_wait_ms(const struct worker *w);

/* Log that a client was refused a node (no leader, no replica): at most one line a second per
 * worker, the others counted and logged with the next line or the next change of leader. */
void route_log_refusal(const char *client, const char *why);
void route_log_refusals_flush(void);

/* The table changed from `old` to the worker's current one: close or re-route the sessions
 * that are on the wrong node now, release sessions waiting for a leader. */
void route_table_changed(struct worker *w, const shm_route_table *old);

#endif
