/* plans.h - query plans in the control plane: the agents' uploads, the store, the view. */
#ifndef PGRELAY_CONTROL_PLANS_H
#define PGRELAY_CONTROL_PLANS_H

#include <jansson.h>
#include <stdint.h>

#include "http.h"

/* POST /api/v1/agent/plans: {node_id, plans: [...], changes: [...]} (docs/protocol.md). */
void plans_upload(http_call *call);

/* GET /api/v1/deployments/NAME/plans[?query=TEXT][&changed=1][&id=ID]. */
void plans_view(http_call *call);

/* store_plans.c: keep one plan (the latest per deployment and plan id) or one change. 0 or -1
 * (the store's error recorded). */
int store_plan_put(const char *deployment, const char *node_id, json_t *plan);
int store_plan_change_add(const char *deployment, const char *node_id, json_t *change);

/* The plans (or with changed, the plan changes) of a deployment that arrived within
 * retention_ms, newest first; text_like (may be NULL) keeps those whose text contains it, id
 * (may be NULL) the one plan. NULL when the store failed. */
json_t *store_plans_list(const char *deployment, const char *text_like, const char *id,
                         int changed, int64_t retention_ms);

/* Delete plans and changes received more than retention_ms ago. Returns how many, or -1. */
int store_plans_expire(int64_t retention_ms);

#endif
