/* plans.c - query plans in the control plane: the agents' uploads and the operators' view.
 *
 * An agent uploads, with its running queries, the plans it made since its last upload and the
 * plan changes it recorded (agent/planner.c). They are kept in the store per deployment (the
 * latest plan per statement id, every change with both plans) for telemetry_retention, so that
 * a replica that takes the lease over serves them too. The store work (an upload's writes, the
 * view's query) is the store worker's: a slow store holds the request, never the event loop.
 */
#include "agents.h"
#include "control.h"
#include "log.h"
#include "plans.h"
#include "store.h"
#include "store_worker.h"

#include <event2/http.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PLANS_ID_MAX     32          /* characters of a plan id (16 hex digits today) */
#define PLANS_TEXT_MAX   (64 * 1024) /* longest statement text accepted */
#define PLANS_FIELD_MAX  255         /* node, database, user, reason, top node */
#define PLANS_ERROR_MAX  1024        /* an outcome's error text */
#define PLANS_PER_UPLOAD 256         /* plans or changes in one upload */

/* Check one plan (or, with is_change, one change) of an upload; answers 400 when bad. */
static bool plans_valid(http_call *call, json_t *o, const char *where, bool is_change)
{
    const char *s;
    int64_t v;
    json_t *c;
    if (!json_is_object(o)) {
        http_reply_error(call->req, 400, "%s must be an object", where);
        return false;
    }
    if (!http_field_string(call, o, where, "id", true, PLANS_ID_MAX, &s) ||
        !http_field_string(call, o, where, "node", true, PLANS_FIELD_MAX, &s) ||
        !http_field_string(call, o, where, "database", true, PLANS_FIELD_MAX, &s) ||
        !http_field_string(call, o, where, "user", true, PLANS_FIELD_MAX, &s) ||
        !http_field_string(call, o, where, "text", true, PLANS_TEXT_MAX, &s))
        return false;
    if (is_change)
        return http_field_int(call, o, where, "at_ms", true, 0, INT64_MAX, &v);
    if (!http_field_string(call, o, where, "reason", true, PLANS_FIELD_MAX, &s) ||
        !http_field_int(call, o, where, "duration_ms", true, 0, INT64_MAX, &v) ||
        !http_field_int(call, o, where, "planned_at_ms", true, 0, INT64_MAX, &v) ||
        !http_field_int(call, o, where, "changes", false, 0, INT32_MAX, &v) ||
        !http_field_string(call, o, where, "top_node", false, PLANS_FIELD_MAX, &s) ||
        !http_field_string(call, o, where, "error", false, PLANS_ERROR_MAX, &s) ||
        !http_field_container(call, o, where, "plan", false, false, &c))
        return false;
    json_t *cost = json_object_get(o, "total_cost");
    if (cost && !json_is_null(cost) && !json_is_number(cost)) {
        http_reply_error(call->req, 400, "field %s.total_cost must be a number", where);
        return false;
    }
    return true;
}

/* An upload's writes, or the view's query, for the store worker. */
typedef struct plans_job {
    store_job job;
    struct evhttp_request *req; /* answered when the store is done */
    char deployment[CCONFIG_NAME_MAX];
    char node_id[STATE_NODE_ID_MAX];
    json_t *plans, *changes; /* upload: copies, the worker's alone until done */
    char *query;             /* view: the text filter (malloc'd), or NULL */
    char *id;                /* view: the one plan asked for (malloc'd), or NULL */
    bool want_changes;
    int64_t retention_ms;
    json_t *list; /* view: what the store returned, or NULL */
} plans_job;

static void plans_job_free(plans_job *j)
{
    json_decref(j->plans);
    json_decref(j->changes);
    free(j->query);
    free(j->id);
    free(j);
}

static int plans_upload_run(store_job *job)
{
    plans_job *j = (plans_job *)job;
    size_t i;
    json_t *o;
    json_array_foreach(j->plans, i, o)
    {
        if (store_plan_put(j->deployment, j->node_id, o) != 0)
            return -1;
    }
    json_array_foreach(j->changes, i, o)
    {
        if (store_plan_change_add(j->deployment, j->node_id, o) != 0)
            return -1;
    }
    return 0;
}

static void plans_upload_done(store_job *job)
{
    plans_job *j = (plans_job *)job;
    size_t i;
    json_t *o;
    if (job->rc != 0) {
        http_reply_error(j->req, 503, "store unreachable: %s", job->error);
        plans_job_free(j);
        return;
    }
    json_array_foreach(j->changes, i, o)
    {
        log_info("deployment %s: proxy %s reports a plan change of \"%.80s\"", j->deployment,
                 j->node_id, json_string_value(json_object_get(o, "text")));
    }
    http_reply_empty(j->req, 204);
    plans_job_free(j);
}

void plans_upload(http_call *call)
{
    json_t *plans = NULL, *changes = NULL, *o;
    size_t i;
    char where[64];
    state_proxy *p = agents_caller(call);
    if (!p)
        return;
    if (!http_field_container(call, call->body, NULL, "plans", false, false, &plans) ||
        !http_field_container(call, call->body, NULL, "changes", false, false, &changes))
        return;
    if (json_array_size(plans) > PLANS_PER_UPLOAD || json_array_size(changes) > PLANS_PER_UPLOAD) {
        http_reply_error(call->req, 400, "at most %d plans and %d changes in one upload",
                         PLANS_PER_UPLOAD, PLANS_PER_UPLOAD);
        return;
    }
    json_array_foreach(plans, i, o)
    {
        snprintf(where, sizeof(where), "plans[%zu]", i);
        if (!plans_valid(call, o, where, false))
            return;
    }
    json_array_foreach(changes, i, o)
    {
        snprintf(where, sizeof(where), "changes[%zu]", i);
        if (!plans_valid(call, o, where, true))
            return;
    }
    plans_job *j = calloc(1, sizeof(*j));
    if (!j || !(j->plans = plans ? json_deep_copy(plans) : json_array()) ||
        !(j->changes = changes ? json_deep_copy(changes) : json_array())) {
        if (j) {
            json_decref(j->plans);
            free(j);
        }
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    j->req = call->req;
    snprintf(j->deployment, sizeof(j->deployment), "%s", call->dep->name);
    snprintf(j->node_id, sizeof(j->node_id), "%s", p->node_id);
    j->job.run = plans_upload_run;
    j->job.done = plans_upload_done;
    store_worker_submit(&j->job);
}

static int plans_view_run(store_job *job)
{
    plans_job *j = (plans_job *)job;
    j->list = store_plans_list(j->deployment, j->query, j->id, j->want_changes,
                               j->retention_ms);
    return j->list ? 0 : -1;
}

static void plans_view_done(store_job *job)
{
    plans_job *j = (plans_job *)job;
    if (j->list)
        http_reply_json(j->req, 200, j->list);
    else
        http_reply_error(j->req, 503, "store unreachable: %s", job->error);
    plans_job_free(j);
}

void plans_view(http_call *call)
{
    const char *query = evhttp_find_header(&call->query, "query");
    const char *id = evhttp_find_header(&call->query, "id");
    const char *changed = evhttp_find_header(&call->query, "changed");
    bool want_changes = false;
    if (changed) {
        if (strcmp(changed, "1") != 0 && strcmp(changed, "true") != 0 &&
            strcmp(changed, "0") != 0 && strcmp(changed, "false") != 0) {
            http_reply_error(call->req, 400, "changed must be 1, true, 0 or false");
            return;
        }
        want_changes = changed[0] == '1' || changed[0] == 't';
    }
    plans_job *j = calloc(1, sizeof(*j));
    if (!j || (query && *query && !(j->query = strdup(query))) ||
        (id && *id && !(j->id = strdup(id)))) {
        if (j)
            plans_job_free(j);
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    j->req = call->req;
    snprintf(j->deployment, sizeof(j->deployment), "%s", call->dep->name);
    j->want_changes = want_changes;
    j->retention_ms = control.cfg->telemetry_retention_ms;
    j->job.run = plans_view_run;
    j->job.done = plans_view_done;
    store_worker_submit(&j->job);
}
