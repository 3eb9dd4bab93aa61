/* agents.h - the agent endpoints: register, telemetry uploads, command long poll and acks. */
#ifndef PGRELAY_AGENTS_H
#define PGRELAY_AGENTS_H

#include "http.h"
#include "state.h"

#define AGENTS_POLL_WAIT_SUGGESTED_S 25 /* poll_wait_s suggested at register (capped by max) */

void agents_register(http_call *call);
void agents_metrics(http_call *call);
void agents_queries(http_call *call);
/* The declared proxy a call's node_id names (marked as seen), or NULL after answering 400
 * (bad node_id), 403 (not declared, or from another address) or 500. */
state_proxy *agents_caller(http_call *call);
void agents_config(http_call *call);
void agents_schema(http_call *call);
void agents_commands(http_call *call);
void agents_ack(http_call *call);

/* New commands were queued for this proxy: answer its parked long poll now. */
void agents_wake(state_proxy *p);

/* The answer to a metrics call of p (NULL: gone meanwhile): the leader and epoch, the desired
 * configuration version, p's options. */
void agents_metrics_reply(struct evhttp_request *req, state_deployment *d, state_proxy *p);

/* Answer p's parked long poll, if any, with 403 and why (the proxy was deleted). */
void agents_refuse_poll(state_proxy *p, const char *why);

/* Answer every parked long poll with 503 and reason (lease lost, shutdown). */
void agents_release_all(const char *reason);

#endif
