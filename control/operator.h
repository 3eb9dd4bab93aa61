/* operator.h - operator orchestrations: maintenance, reload, switchover, unfence, config apply. */
#ifndef PGRELAY_OPERATOR_H
#define PGRELAY_OPERATOR_H

#include "http.h"
#include "state.h"

#include <stdbool.h>
#include <stdint.h>

#define OPERATOR_DEFAULT_TIMEOUT_S 30   /* timeout_s when the request gives none */
#define OPERATOR_MAX_TIMEOUT_S     3600 /* longest timeout_s accepted */
#define OPERATOR_PAUSE_MARGIN_S    5    /* a switchover's pause ends this long after its deadline */

void operator_maintenance(http_call *call);
void operator_reload(http_call *call);
void operator_switchover(http_call *call); /* switchover.c */
void operator_unfence(http_call *call);    /* switchover.c: lift a node's fence */
void operator_operations(http_call *call); /* switchover.c: the operation records */

/* switchover.c, agent route: is this operation still running here ({"live", "step"})? An agent
 * asks before pg_promote(). */
void operator_operation_status(http_call *call);

/* A new holder's first act once its state is loaded (recovery.c): load the operator's
 * maintenance, finish or roll back the operations left running, renew the maintenance pauses.
 * Read and written by the store worker; operation_recovering() until every write is back. */
void operation_recover(void);
bool operation_recovering(void);

/* The state was dropped: a recovery under way is void. */
void operation_recovery_reset(void);

/* A job of the recovery whose writes are not all queued yet: the recovery ends (and
 * orchestrations resume) only after the last one released it. */
void operation_recovery_hold(void);
void operation_recovery_release(void);
void operator_config_apply(http_call *call); /* config_apply.c: prepare, commit or roll back */

/* config_apply.c, agent route: the deployment's desired configuration ({"version", "text"}),
 * which a proxy on another version converges to. */
void operator_config_desired(http_call *call);

/* A proxy acknowledged a command: the orchestration waiting for it goes on. */
void operator_on_ack(state_deployment *dep, int64_t command_id, const char *node_id, bool ok,
                     const char *detail);

/* A switchover is running: coordinated decisions wait for it. */
bool operator_leadership_frozen(state_deployment *dep);

/* End every orchestration with 503 and reason (lease lost, shutdown). */
void operator_cancel_all(const char *reason);

#endif
