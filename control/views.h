/* views.h - the operator's read-only endpoints (views.c). */
#ifndef PGRELAY_VIEWS_H
#define PGRELAY_VIEWS_H

#include "http.h"

void views_deployments(http_call *call);
void views_proxies(http_call *call);
void views_nodes(http_call *call);
void views_queries(http_call *call);
void views_metrics(http_call *call);
void views_schema(http_call *call);
void views_config_get(http_call *call);
void views_leaders_get(http_call *call);
void views_metrics_history(http_call *call);

/* Note a change of dep's leader or epoch (already in dep) in the leader history that
 * GET /api/v1/deployments/D/leaders lists; why says what made it. */
void views_leader_changed(const state_deployment *dep, const char *why);

#endif
