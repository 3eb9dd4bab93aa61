/* members.c - declared membership: the operator creates and deletes a deployment's proxies and
 * sets their options; only declared proxies vote, take commands and acknowledge them.
 *
 * A node id the operator has not declared is "pending": recorded in memory when its agent calls
 * (at most STATE_PENDING_MAX per deployment, state.c), answered 403 on everything but register,
 * and shown by show-proxies so that the operator can declare it. auto_declare (control.ini)
 * declares at register, for development.
 */
#include "members.h"
#include "agents.h"
#include "control.h"
#include "log.h"
#include "store.h"
#include "store_members.h"
#include "store_worker.h"

#include <arpa/inet.h>
#include <event2/http.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MEMBERS_VALUE_MAX 64 /* longest option value accepted as text */

/* The type of a proxy option's value. */
typedef enum members_option_type {
    MEMBERS_OPT_BOOL,    /* on/off (true/false, yes/no, 1/0) or a JSON boolean */
    MEMBERS_OPT_ADDRESS, /* a numeric IPv4 or IPv6 address, kept as written */
} members_option_type;

/* One per-proxy option: its name, type, and what it does (pgrelay-control(8) lists them). */
typedef struct members_option {
    const char *name;
    members_option_type type;
    const char *help;
} members_option;

static const members_option members_options[] = {
    {"maintenance_exempt", MEMBERS_OPT_BOOL,
     "operator maintenance on/off leaves the proxy out (a switchover still pauses it)"},
    {"address", MEMBERS_OPT_ADDRESS,
     "the proxy's calls are taken only from this IP address (others are 403)"},
    {"read_only", MEMBERS_OPT_BOOL,
     "pushed to the proxy: its write port serves sessions as its read-only port does (a "
     "replica within the lag limits), so that it never routes a write"},
};
#define MEMBERS_N_OPTIONS (sizeof(members_options) / sizeof(members_options[0]))

static const members_option *members_find_option(const char *name)
{
    for (size_t i = 0; i < MEMBERS_N_OPTIONS; i++)
        if (strcmp(members_options[i].name, name) == 0)
            return &members_options[i];
    return NULL;
}

/* "maintenance_exempt" and the others, for messages. */
static void members_option_names(char *out, size_t len)
{
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < MEMBERS_N_OPTIONS && used < len; i++) {
        int n = snprintf(out + used, len - used, "%s%s", i ? ", " : "", members_options[i].name);
        used += n > 0 ? (size_t)n : 0;
    }
}

/* A value for opt as JSON (new reference), or NULL when it does not fit the type. An empty
 * string or null means "back to the default": json null is returned for it. */
static json_t *members_option_value(const members_option *opt, json_t *v)
{
    if (json_is_null(v) || (json_is_string(v) && json_string_length(v) == 0))
        return json_null();
    switch (opt->type) {
    case MEMBERS_OPT_BOOL: {
        static const char *const yes[] = {"on", "true", "yes", "1"};
        static const char *const no[] = {"off", "false", "no", "0"};
        if (json_is_boolean(v))
            return json_incref(v);
        if (!json_is_string(v) || json_string_length(v) > MEMBERS_VALUE_MAX)
            return NULL;
        for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
            if (strcasecmp(json_string_value(v), yes[i]) == 0)
                return json_true();
            if (strcasecmp(json_string_value(v), no[i]) == 0)
                return json_false();
        }
        return NULL;
    }
    case MEMBERS_OPT_ADDRESS: {
        unsigned char buf[sizeof(struct in6_addr)];
        const char *text = json_string_value(v);
        if (!text || (inet_pton(AF_INET, text, buf) != 1 && inet_pton(AF_INET6, text, buf) != 1))
            return NULL;
        return json_incref(v);
    }
    }
    return NULL;
}

/* options (a request's object) checked and merged into a copy of base (new reference); NULL
 * after answering 400. */
static json_t *members_merge_options(http_call *call, json_t *base, json_t *options)
{
    char names[256];
    const char *key;
    json_t *v;
    json_t *merged = base ? json_deep_copy(base) : json_object();
    if (!merged) {
        http_reply_error(call->req, 500, "out of memory");
        return NULL;
    }
    json_object_foreach(options, key, v)
    {
        const members_option *opt = members_find_option(key);
        if (!opt) {
            members_option_names(names, sizeof(names));
            http_reply_error(call->req, 400, "unknown proxy option %s (known: %s)", key, names);
            json_decref(merged);
            return NULL;
        }
        json_t *value = members_option_value(opt, v);
        if (!value) {
            http_reply_error(call->req, 400, "option %s must be %s", key,
                             opt->type == MEMBERS_OPT_BOOL ? "on or off"
                                                           : "a numeric IPv4 or IPv6 address");
            json_decref(merged);
            return NULL;
        }
        if (json_is_null(value))
            json_object_del(merged, key);
        else
            json_object_set(merged, key, value);
        json_decref(value);
    }
    return merged;
}

static json_t *members_describe(const state_proxy *p)
{
    return json_pack("{s:s, s:b, s:o}", "node_id", p->node_id, "declared", p->declared, "options",
                     p->options ? json_incref(p->options) : json_object());
}

bool members_peer_allowed(const state_proxy *p, struct evhttp_request *req, char *peer,
                          size_t peer_len)
{
    const char *pinned = json_string_value(json_object_get(p->options, "address"));
    struct in6_addr want6;
    struct in_addr want4;
    bool is4 = pinned && inet_pton(AF_INET, pinned, &want4) == 1;
    if (!pinned || (!is4 && inet_pton(AF_INET6, pinned, &want6) != 1))
        return true;
    struct evhttp_connection *conn = evhttp_request_get_connection(req);
    const struct sockaddr *sa = conn ? evhttp_connection_get_addr(conn) : NULL;
    snprintf(peer, peer_len, "an unknown address");
    if (!sa)
        return false;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, peer, (socklen_t)peer_len);
        return is4 && memcmp(&in->sin_addr, &want4, sizeof(want4)) == 0;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, peer, (socklen_t)peer_len);
        if (is4) /* an IPv4 client of an IPv6 socket: ::ffff:a.b.c.d */
            return IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr) &&
                   memcmp(&in6->sin6_addr.s6_addr[12], &want4, sizeof(want4)) == 0;
        return memcmp(&in6->sin6_addr, &want6, sizeof(want6)) == 0;
    }
    return false;
}

int members_maintenance_targets(state_deployment *dep, state_proxy ***out)
{
    int n = state_live_proxies(dep, out), kept = 0;
    for (int i = 0; i < n; i++)
        if (!json_is_true(json_object_get((*out)[i]->options, "maintenance_exempt")))
            (*out)[kept++] = (*out)[i];
    return n < 0 ? n : kept;
}

/* A membership change on its way to the store (the store worker's); applied here once it is
 * in. While a deletion is on its way no orchestration starts (op_begin), so none addresses a
 * proxy that is leaving. */
typedef enum members_change { MEMBERS_CREATE, MEMBERS_DELETE, MEMBERS_OPTIONS } members_change;

typedef struct members_job {
    store_job job;
    members_change change;
    struct evhttp_request *req;
    char deployment[CCONFIG_NAME_MAX];
    char node_id[STATE_NODE_ID_MAX];
    json_t *options; /* the merged options (the worker's copy) */
    bool created;    /* a create that declares the proxy */
    char *row;       /* its proxies row (store_proxies_json) */
} members_job;

static int members_run(store_job *job)
{
    members_job *j = (members_job *)job;
    if (j->change == MEMBERS_DELETE)
        return store_member_delete(j->deployment, j->node_id);
    if (store_member_save(j->deployment, j->node_id, j->options) != 0)
        return -1;
    return j->row ? store_proxies_save_text(j->row) : 0;
}

static void members_created(members_job *j, state_deployment *dep)
{
    state_proxy *p = state_find_proxy(dep, j->node_id);
    if (!p)
        p = state_get_proxy(dep, j->node_id);
    if (!p) {
        http_reply_error(j->req, 500, "out of memory");
        return;
    }
    bool created = !p->declared;
    state_set_declared(p, true);
    json_decref(p->options);
    p->options = j->options;
    j->options = NULL;
    if (j->row) {
        p->dirty = false;
        p->saved_seen_ms = p->last_seen_ms;
    }
    if (created)
        log_info("deployment %s: proxy %s declared by an operator (%d declared)", dep->name,
                 p->node_id, dep->n_declared);
    json_t *answer = members_describe(p);
    json_object_set_new(answer, "created", json_boolean(created));
    http_reply_json(j->req, created ? 201 : 200, answer);
}

static void members_deleted(members_job *j, state_deployment *dep)
{
    state_proxy *p = state_find_proxy(dep, j->node_id);
    if (!p || !p->declared) { /* deleted twice: the first one answered for it */
        http_reply_json(
            j->req, 200,
            json_pack("{s:s, s:b, s:b}", "node_id", j->node_id, "declared", 0, "deleted", 1));
        return;
    }
    /* its parked poll ends now: it may not take commands any more */
    agents_refuse_poll(p, "proxy was deleted from its deployment");
    /* its observations no longer count, nor show */
    json_decref(p->nodes);
    p->nodes = NULL;
    log_info("deployment %s: proxy %s deleted by an operator (%d declared)", dep->name, p->node_id,
             dep->n_declared - 1);
    json_t *answer = members_describe(p);
    json_object_set_new(answer, "declared", json_false());
    json_object_set_new(answer, "deleted", json_true());
    state_set_declared(p, false); /* pending again; may be forgotten at once when over the bound */
    http_reply_json(j->req, 200, answer);
}

static void members_options_set(members_job *j, state_deployment *dep)
{
    state_proxy *p = state_find_proxy(dep, j->node_id);
    if (!p || !p->declared) {
        http_reply_error(j->req, 404, "proxy %s is no longer declared in deployment %s", j->node_id,
                         dep->name);
        return;
    }
    json_decref(p->options);
    p->options = j->options;
    j->options = NULL;
    char *text = json_dumps(p->options, JSON_COMPACT);
    log_info("deployment %s: proxy %s options %s", dep->name, p->node_id,
             text ? text : "(changed)");
    free(text);
    http_reply_json(j->req, 200, members_describe(p));
}

static void members_done(store_job *job)
{
    members_job *j = (members_job *)job;
    state_deployment *dep = control.active ? state_find_deployment(j->deployment) : NULL;
    if (dep && j->change == MEMBERS_DELETE)
        dep->deleting--;
    if (dep)
        json_object_del(dep->members_busy, j->node_id);
    if (job->rc != 0)
        http_reply_error(j->req, 503, "store unreachable: %s", job->error);
    else if (!dep)
        http_reply_error(j->req, 503, "not serving: the state was dropped");
    else if (j->change == MEMBERS_CREATE)
        members_created(j, dep);
    else if (j->change == MEMBERS_DELETE)
        members_deleted(j, dep);
    else
        members_options_set(j, dep);
    json_decref(j->options);
    free(j->row);
    free(j);
}

/* Queue the change (merged stolen: the worker gets a copy of its own). */
static void members_submit(http_call *call, members_change change, const char *node_id,
                           json_t *merged, state_proxy *created)
{
    state_deployment *dep = call->dep;
    if (json_object_get(dep->members_busy, node_id)) {
        /* its last change is on its way: this one would be made against what it replaces
         * (two option changes, one lost), or write again what a deletion removes */
        json_decref(merged);
        http_reply_error(call->req, 409,
                         "a change of proxy %s of deployment %s is being stored; try again",
                         node_id, dep->name);
        return;
    }
    if (!dep->members_busy)
        dep->members_busy = json_object();
    if (!dep->members_busy || json_object_set_new(dep->members_busy, node_id, json_true()) != 0) {
        json_decref(merged);
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    members_job *j = calloc(1, sizeof(*j));
    if (j && merged && !(j->options = json_deep_copy(merged)))
        j = (free(j), NULL);
    if (j && created && !(j->row = store_proxies_json(&created, 1))) {
        json_decref(j->options);
        j = (free(j), NULL);
    }
    json_decref(merged);
    if (!j) {
        json_object_del(dep->members_busy, node_id);
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    j->change = change;
    j->req = call->req;
    snprintf(j->deployment, sizeof(j->deployment), "%s", call->dep->name);
    snprintf(j->node_id, sizeof(j->node_id), "%s", node_id);
    j->job.run = members_run;
    j->job.done = members_done;
    if (change == MEMBERS_DELETE)
        call->dep->deleting++;
    store_worker_submit(&j->job);
}

void members_create(http_call *call)
{
    const char *node_id = NULL;
    json_t *options = NULL;
    if (!http_field_string(call, call->body, NULL, "node_id", true, STATE_NODE_ID_MAX - 1,
                           &node_id) ||
        !http_field_container(call, call->body, NULL, "options", false, true, &options))
        return;
    if (!http_node_id_valid(node_id)) {
        http_reply_error(call->req, 400,
                         "node_id must be 1 to %d printable characters without blanks",
                         STATE_NODE_ID_MAX - 1);
        return;
    }
    state_proxy *existing = state_find_proxy(call->dep, node_id);
    bool created = !existing || !existing->declared;
    json_t *merged = members_merge_options(call, existing ? existing->options : NULL, options);
    if (!merged)
        return;
    state_proxy *p = existing ? existing : state_get_proxy(call->dep, node_id);
    if (!p) {
        json_decref(merged);
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    members_submit(call, MEMBERS_CREATE, node_id, merged, created ? p : NULL);
}

/* The declared proxy named by the path (args[1], URL-decoded), or NULL after answering 404. */
static state_proxy *members_path_proxy(http_call *call)
{
    char *id = evhttp_uridecode(call->args[1], 0, NULL);
    state_proxy *p = id ? state_find_proxy(call->dep, id) : NULL;
    if (p && p->declared) {
        free(id);
        return p;
    }
    http_reply_error(call->req, 404, "proxy %s is not declared in deployment %s%s",
                     id ? id : call->args[1], call->dep->name, p ? " (it is pending)" : "");
    free(id);
    return NULL;
}

void members_delete(http_call *call)
{
    state_proxy *p = members_path_proxy(call);
    if (!p)
        return;
    if (call->dep->op) {
        http_reply_error(call->req, 409,
                         "an orchestration is in progress on deployment %s: delete the proxy "
                         "after it ends",
                         call->dep->name);
        return;
    }
    members_submit(call, MEMBERS_DELETE, p->node_id, NULL, NULL);
}

void members_set_options(http_call *call)
{
    json_t *options = NULL;
    if (!http_field_container(call, call->body, NULL, "options", true, true, &options))
        return;
    state_proxy *p = members_path_proxy(call);
    if (!p)
        return;
    json_t *merged = members_merge_options(call, p->options, options);
    if (!merged)
        return;
    members_submit(call, MEMBERS_OPTIONS, p->node_id, merged, NULL);
}
