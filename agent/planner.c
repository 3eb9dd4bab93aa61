/* planner.c - the agent's query planner: EXPLAIN of slow, sampled and running statements.
 *
 * A thread of its own, so that neither the health probes (the event loop) nor the control
 * plane's client wait on it. Every PLANNER_POLL_MS it takes the requests the workers queued in
 * their rings, and looks at the running-queries table for statements running longer than
 * plan_slow_threshold. Each request is deduplicated by its normalised text, database and user
 * within plan_max_age, checked to be one plannable statement, and held to plan_rate_limit;
 * then, on a connection to the node it ran on and to its database as the monitor user:
 *
 *   BEGIN READ ONLY; SET LOCAL statement_timeout, lock_timeout; SET LOCAL ROLE <user>;
 *   EXPLAIN (FORMAT JSON, VERBOSE, COSTS) <text>   -- never ANALYZE: nothing is executed
 *   ROLLBACK
 *
 * The extended protocol's parameter values go with the EXPLAIN as bound parameters (with the
 * Parse's types), which plans it as EXECUTE of a prepared statement with those values would.
 * Without values (binary format, too long, a running statement) PostgreSQL 16 and later get
 * EXPLAIN (GENERIC_PLAN); older ones record why there is no plan. An error is the plan's
 * outcome, not retried before plan_max_age. Plans go to shared memory for the console; a plan
 * whose shape (node types, relations, indexes) differs from the previous one for the same
 * statement is a plan change, kept for the control plane.
 */
#include "planner.h"
#include "log.h"
#include "normalize.h"
#include "pgproto.h"

#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PLANNER_POLL_MS         100 /* how often the rings and running queries are looked at */
#define PLANNER_CONNS           8   /* cached connections (node, database) */
#define PLANNER_CONN_IDLE_US    (60 * 1000000LL) /* a cached connection unused this long is closed */
#define PLANNER_RUNNING_SEEN    256 /* running statements already requested (session, start) */
#define PLANNER_CHANGES_MAX     32  /* plan changes kept for the control plane */
#define PLANNER_PARAMS_MAX      (SHM_PLAN_PARAMS_MAX / 4) /* values fit: 4 length bytes each */
#define PLANNER_EXPLAIN         "EXPLAIN (FORMAT JSON, VERBOSE, COSTS) "
#define PLANNER_EXPLAIN_GENERIC "EXPLAIN (FORMAT JSON, VERBOSE, COSTS, GENERIC_PLAN) "

/* A cached connection to one database of one node. */
typedef struct planner_conn {
    PGconn *conn; /* NULL when the slot is free */
    char node[CONFIG_NAME_MAX];
    char database[SHM_IDENT_MAX];
    int64_t used_us; /* last use (shm_mono_us) */
} planner_conn;

/* The planner's own view of a published plan (entry i is shm slot i). */
typedef struct planner_entry {
    bool used;
    uint64_t id;
    int64_t planned_at_us;
    uint64_t shape; /* hash of the plan's shape; 0 when there is no plan */
    char *json;     /* the plan's JSON (malloc'd), NULL when none */
} planner_entry;

/* A plan whose shape changed, kept for the reporter. */
typedef struct planner_change {
    uint64_t seq; /* 1, 2, ... */
    uint64_t id;
    int64_t at_us;
    char node[CONFIG_NAME_MAX];
    char database[SHM_IDENT_MAX];
    char user[SHM_IDENT_MAX];
    char *text;     /* normalised text (malloc'd) */
    char *old_json; /* previous plan (malloc'd) */
    char *new_json; /* the new one (malloc'd) */
} planner_change;

/* A running statement already requested. */
typedef struct planner_seen {
    uint64_t session;
    int64_t stmt_start_us;
} planner_seen;

typedef struct planner {
    shm_segment *shm;
    shm_plans *out;
    config cfg; /* this thread's copy of the settings */
    uint64_t settings_version;
    planner_conn conns[PLANNER_CONNS];
    planner_entry entries[SHM_PLANS_MAX];
    planner_seen seen[PLANNER_RUNNING_SEEN];
    uint32_t next_seen;
    double tokens; /* plan_rate_limit's bucket */
    int64_t tokens_at_us;
} planner;

/* Changes are shared with the reporter thread. */
static struct {
    pthread_mutex_t lock;
    planner_change ring[PLANNER_CHANGES_MAX];
    uint64_t count; /* changes recorded; change n is ring[(n-1) % MAX] */
} changes = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* FNV-1a over bytes, continuing from h. */
static uint64_t fnv(uint64_t h, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

uint64_t planner_plan_id(const char *norm, const char *database, const char *user)
{
    uint64_t h = 0xcbf29ce484222325ull;
    h = fnv(h, norm, strlen(norm) + 1);
    h = fnv(h, database, strlen(database) + 1);
    h = fnv(h, user, strlen(user) + 1);
    return h & 0x7fffffffffffffffull; /* an id JSON and PostgreSQL's bigint carry exactly */
}

/* ---- what is plannable ---- */

/* Skip blanks, comments and opening parentheses. */
static const char *skip_noise(const char *s)
{
    for (;;) {
        while (isspace((unsigned char)*s) || *s == '(')
            s++;
        if (s[0] == '-' && s[1] == '-') {
            while (*s && *s != '\n')
                s++;
        } else if (s[0] == '/' && s[1] == '*') {
            const char *e = strstr(s + 2, "*/");
            s = e ? e + 2 : s + strlen(s);
        } else {
            return s;
        }
    }
}

/* Does the text hold more than one statement (a ';' followed by anything but blanks and
 * comments, outside quotes, dollar quotes and comments)? Also says whether it uses $n. */
static bool several_statements(const char *s, bool *has_params)
{
    *has_params = false;
    while (*s) {
        if (*s == '\'' || *s == '"') {
            char q = *s++;
            while (*s && !(*s == q && s[1] != q))
                s += *s == q ? 2 : 1;
            if (*s)
                s++;
        } else if (s[0] == '-' && s[1] == '-') {
            while (*s && *s != '\n')
                s++;
        } else if (s[0] == '/' && s[1] == '*') {
            const char *e = strstr(s + 2, "*/");
            s = e ? e + 2 : s + strlen(s);
        } else if (*s == '$' && isdigit((unsigned char)s[1])) {
            *has_params = true;
            s++;
        } else if (*s == '$') {
            /* $tag$ ... $tag$ */
            const char *t = s + 1;
            while (isalnum((unsigned char)*t) || *t == '_')
                t++;
            if (*t == '$') {
                size_t tag = (size_t)(t + 1 - s);
                const char *e;
                for (e = t + 1; *e && strncmp(e, s, tag) != 0; e++)
                    ;
                s = *e ? e + tag : e;
            } else {
                s = t;
            }
        } else if (*s == ';') {
            if (*skip_noise(s + 1) != '\0')
                return true;
            s++;
        } else {
            s++;
        }
    }
    return false;
}

/* NULL when the text is one statement EXPLAIN takes, else why not. */
static const char *not_plannable(const char *text, bool *has_params)
{
    static const char *const words[] = {"select", "insert", "update", "delete", "merge",
                                        "values", "with",   "table",  NULL};
    const char *s = skip_noise(text);
    size_t n = 0;
    while (isalpha((unsigned char)s[n]))
        n++;
    bool ok = false;
    for (int i = 0; words[i] && !ok; i++)
        ok = strlen(words[i]) == n && strncasecmp(s, words[i], n) == 0;
    if (!ok)
        return "not a SELECT, INSERT, UPDATE, DELETE, MERGE, VALUES, WITH or TABLE statement";
    if (several_statements(text, has_params))
        return "several statements in one query";
    return NULL;
}

/* ---- connections ---- */

static const config_node *planner_node(planner *p, const char *name)
{
    for (int i = 0; i < p->cfg.n_nodes; i++)
        if (strcmp(p->cfg.nodes[i].name, name) == 0)
            return &p->cfg.nodes[i];
    return NULL;
}

static void conn_drop(planner_conn *c)
{
    if (c->conn)
        PQfinish(c->conn);
    c->conn = NULL;
}

/* A connection to database of node (cached), or NULL with why. */
static PGconn *planner_connect(planner *p, const char *node_name, const char *database, char *why,
                               size_t len)
{
    int64_t now = shm_mono_us();
    planner_conn *free_slot = NULL, *oldest = NULL;
    for (int i = 0; i < PLANNER_CONNS; i++) {
        planner_conn *c = &p->conns[i];
        if (c->conn && now - c->used_us > PLANNER_CONN_IDLE_US)
            conn_drop(c);
        if (c->conn && strcmp(c->node, node_name) == 0 && strcmp(c->database, database) == 0) {
            if (PQstatus(c->conn) == CONNECTION_OK) {
                c->used_us = now;
                return c->conn;
            }
            conn_drop(c);
        }
        if (!c->conn && !free_slot)
            free_slot = c;
        if (c->conn && (!oldest || c->used_us < oldest->used_us))
            oldest = c;
    }
    const config_node *node = planner_node(p, node_name);
    if (!node) {
        snprintf(why, len, "node %s is not in the configuration", node_name);
        return NULL;
    }
    if (!free_slot) {
        conn_drop(oldest);
        free_slot = oldest;
    }
    char port[16], timeout[16];
    snprintf(port, sizeof(port), "%d", node->port);
    snprintf(timeout, sizeof(timeout), "%d", (p->cfg.plan_timeout_ms + 999) / 1000 + 1);
    const char *keys[] = {
        "host", "port", "user", "password", "dbname", "connect_timeout", "application_name", NULL};
    const char *vals[] = {node->host,
                          port,
                          node->monitor_user[0] ? node->monitor_user : p->cfg.monitor_user,
                          node->monitor_password[0] ? node->monitor_password
                                                    : p->cfg.monitor_password,
                          database,
                          timeout,
                          "pgrelay-agent planner",
                          NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 0);
    if (PQstatus(conn) != CONNECTION_OK) {
        const char *msg = PQerrorMessage(conn);
        snprintf(why, len, "cannot connect to node %s, database %s: %.*s", node_name, database,
                 (int)strcspn(msg, "\n"), msg);
        PQfinish(conn);
        return NULL;
    }
    free_slot->conn = conn;
    snprintf(free_slot->node, sizeof(free_slot->node), "%s", node_name);
    snprintf(free_slot->database, sizeof(free_slot->database), "%s", database);
    free_slot->used_us = now;
    return conn;
}

/* ---- a plan's JSON ---- */

/* Node types, relations and indexes, depth first: what makes two plans the same shape. */
static uint64_t plan_shape(json_t *node, uint64_t h, int depth)
{
    static const char *const keys[] = {"Node Type", "Relation Name",       "Index Name",
                                       "Join Type", "Parent Relationship", NULL};
    char mark[16];
    int n = snprintf(mark, sizeof(mark), "<%d>", depth);
    h = fnv(h, mark, (size_t)n);
    for (int i = 0; keys[i]; i++) {
        json_t *v = json_object_get(node, keys[i]);
        if (json_is_string(v))
            h = fnv(h, json_string_value(v), json_string_length(v) + 1);
        else
            h = fnv(h, "", 1);
    }
    size_t i;
    json_t *child;
    json_array_foreach(json_object_get(node, "Plans"), i, child) h =
        plan_shape(child, h, depth + 1);
    return h;
}

/* "Index Scan using t_pkey on public.t" for the console's top-node column. */
static void node_label(json_t *node, char *buf, size_t len)
{
    const char *type = json_string_value(json_object_get(node, "Node Type"));
    const char *operation = json_string_value(json_object_get(node, "Operation"));
    if (type && operation && strcmp(type, "ModifyTable") == 0)
        type = operation; /* "Insert on t", as EXPLAIN's text form says */
    const char *index = json_string_value(json_object_get(node, "Index Name"));
    const char *rel = json_string_value(json_object_get(node, "Relation Name"));
    if (!rel) /* "CTE Scan on d" */
        rel = json_string_value(json_object_get(node, "CTE Name"));
    const char *schema = json_string_value(json_object_get(node, "Schema"));
    snprintf(buf, len, "%s%s%s%s%s%s%s", type ? type : "?", index ? " using " : "",
             index ? index : "", rel ? " on " : "", schema && rel ? schema : "",
             schema && rel ? "." : "", rel ? rel : "");
}

/* ---- outcomes ---- */

/* The request being planned, as the entry will show it. */
typedef struct planner_job {
    uint64_t id;
    uint32_t reason;
    int64_t duration_us;
    const char *node;
    const char *database;
    const char *user;
    const char *norm; /* normalised text */
} planner_job;

static void record_change(const planner_job *j, const char *old_json, const char *new_json)
{
    pthread_mutex_lock(&changes.lock);
    uint64_t seq = ++changes.count;
    planner_change *c = &changes.ring[(seq - 1) % PLANNER_CHANGES_MAX];
    free(c->text);
    free(c->old_json);
    free(c->new_json);
    c->seq = seq;
    c->id = j->id;
    c->at_us = shm_now_us();
    snprintf(c->node, sizeof(c->node), "%s", j->node);
    snprintf(c->database, sizeof(c->database), "%s", j->database);
    snprintf(c->user, sizeof(c->user), "%s", j->user);
    c->text = strdup(j->norm);
    c->old_json = strdup(old_json);
    c->new_json = strdup(new_json);
    pthread_mutex_unlock(&changes.lock);
}

json_t *planner_changes_since(uint64_t after, uint64_t *last)
{
    json_t *list = json_array();
    pthread_mutex_lock(&changes.lock);
    uint64_t first = changes.count > PLANNER_CHANGES_MAX ? changes.count - PLANNER_CHANGES_MAX : 0;
    if (after > first)
        first = after;
    for (uint64_t n = first + 1; n <= changes.count; n++) {
        planner_change *c = &changes.ring[(n - 1) % PLANNER_CHANGES_MAX];
        char id[24];
        snprintf(id, sizeof(id), "%016llx", (unsigned long long)c->id);
        json_t *old_plan = json_loads(c->old_json ? c->old_json : "null", JSON_DECODE_ANY, NULL);
        json_t *new_plan = json_loads(c->new_json ? c->new_json : "null", JSON_DECODE_ANY, NULL);
        json_t *text = json_string(c->text ? c->text : "");
        json_array_append_new(list, json_pack("{s:s, s:I, s:o, s:s, s:s, s:s, s:o, s:o}", "id", id,
                                              "at_ms", (json_int_t)(c->at_us / 1000), "text",
                                              text ? text : json_string("(not UTF-8)"), "node",
                                              c->node, "database", c->database, "user", c->user,
                                              "old_plan", old_plan ? old_plan : json_null(),
                                              "new_plan", new_plan ? new_plan : json_null()));
        *last = n;
    }
    pthread_mutex_unlock(&changes.lock);
    return list;
}

/* The slot of plan id: its own, else a free one, else the least recently planned. */
static int entry_slot(planner *p, uint64_t id, bool *found)
{
    int free_slot = -1, oldest = -1;
    *found = false;
    for (int i = 0; i < SHM_PLANS_MAX; i++) {
        planner_entry *e = &p->entries[i];
        if (e->used && e->id == id) {
            *found = true;
            return i;
        }
        if (!e->used && free_slot < 0)
            free_slot = i;
        if (e->used && (oldest < 0 || e->planned_at_us < p->entries[oldest].planned_at_us))
            oldest = i;
    }
    return free_slot >= 0 ? free_slot : oldest;
}

/* Store an outcome: a plan (json, parsed as plan) or an error. */
static void publish(planner *p, const planner_job *j, const char *json, json_t *plan,
                    const char *error)
{
    bool found;
    int i = entry_slot(p, j->id, &found);
    planner_entry *e = &p->entries[i];
    shm_plan *out = &p->out->plans[i];
    json_t *top = plan ? json_object_get(json_array_get(plan, 0), "Plan") : NULL;
    uint64_t shape = top ? plan_shape(top, 0xcbf29ce484222325ull, 0) : 0;
    bool changed = found && e->shape && shape && e->shape != shape;

    if (changed) {
        record_change(j, e->json, json);
        atomic_fetch_add(&p->out->plan_changes, 1);
        log_info("plan change for \"%.80s\" (%s, database %s, user %s)", j->norm, j->node,
                 j->database, j->user);
    }
    uint32_t n_changes = found && out->used ? out->changes : 0;
    if (!found) {
        free(e->json);
        e->json = NULL;
        e->shape = 0;
    }
    e->used = true;
    e->id = j->id;
    e->planned_at_us = shm_now_us();
    if (shape) { /* an error keeps the last good plan for comparison */
        free(e->json);
        e->json = strdup(json);
        e->shape = shape;
    }

    atomic_fetch_add_explicit(&out->seq, 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    out->used = 1;
    out->id = j->id;
    out->reason = j->reason;
    out->changes = n_changes + (changed ? 1 : 0);
    out->planned_at_us = e->planned_at_us;
    out->duration_us = j->duration_us;
    snprintf(out->node_name, sizeof(out->node_name), "%s", j->node);
    snprintf(out->user, sizeof(out->user), "%s", j->user);
    snprintf(out->database, sizeof(out->database), "%s", j->database);
    snprintf(out->text, sizeof(out->text), "%s", j->norm);
    out->total_cost = -1;
    out->top_node[0] = '\0';
    out->json_len = 0;
    snprintf(out->error, sizeof(out->error), "%s", error ? error : "");
    if (top) {
        json_t *cost = json_object_get(top, "Total Cost");
        out->total_cost = json_is_number(cost) ? json_number_value(cost) : -1;
        node_label(top, out->top_node, sizeof(out->top_node));
        size_t len = strlen(json);
        if (len <= sizeof(out->json)) {
            memcpy(out->json, json, len);
            out->json_len = (uint32_t)len;
        } else {
            snprintf(out->error, sizeof(out->error),
                     "plan of %zu bytes is too large for shared memory (%zu): top node only", len,
                     sizeof(out->json));
        }
    }
    atomic_fetch_add_explicit(&out->seq, 1, memory_order_release);
    atomic_fetch_add_explicit(&p->out->version, 1, memory_order_release);
}

/* "SQLSTATE: first line" of a failed result. */
static void result_error(PGconn *conn, PGresult *res, const char *what, char *buf, size_t len)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = res ? PQresultErrorMessage(res) : PQerrorMessage(conn);
    if (!msg || !*msg)
        msg = PQerrorMessage(conn);
    if (strncmp(msg, "ERROR:  ", 8) == 0)
        msg += 8;
    snprintf(buf, len, "%s%s%s%.*s", what, state ? state : "", state ? ": " : "",
             (int)strcspn(msg, "\n"), msg);
}

static bool run_ok(PGconn *conn, const char *sql, const char *what, char *why, size_t len)
{
    PGresult *res = PQexec(conn, sql);
    bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    if (!ok)
        result_error(conn, res, what, why, len);
    PQclear(res);
    return ok;
}

/* Type OIDs (pg_type.dat) whose binary form the planner turns into text. */
#define OID_BOOL    16
#define OID_NAME    19
#define OID_INT8    20
#define OID_INT2    21
#define OID_INT4    23
#define OID_TEXT    25
#define OID_OID     26
#define OID_FLOAT4  700
#define OID_FLOAT8  701
#define OID_UNKNOWN 705
#define OID_BPCHAR  1042
#define OID_VARCHAR 1043

/* A binary-format value of a common type as text into out (cap bytes). 0, or -1 when the type
 * is not one of them or the value is malformed. */
static int binary_to_text(Oid type, const uint8_t *v, uint32_t len, char *out, size_t cap)
{
    uint64_t u = 0;
    for (uint32_t i = 0; i < len && i < 8; i++)
        u = (u << 8) | v[i];
    switch (type) {
    case OID_BOOL:
        return len == 1 ? (snprintf(out, cap, "%s", v[0] ? "t" : "f"), 0) : -1;
    case OID_INT2:
        return len == 2 ? (snprintf(out, cap, "%d", (int)(int16_t)u), 0) : -1;
    case OID_INT4:
        return len == 4 ? (snprintf(out, cap, "%d", (int)(int32_t)u), 0) : -1;
    case OID_OID:
        return len == 4 ? (snprintf(out, cap, "%u", (unsigned)u), 0) : -1;
    case OID_INT8:
        return len == 8 ? (snprintf(out, cap, "%lld", (long long)(int64_t)u), 0) : -1;
    case OID_FLOAT4: {
        uint32_t bits = (uint32_t)u;
        float f;
        memcpy(&f, &bits, sizeof(f));
        return len == 4 ? (snprintf(out, cap, "%.9g", (double)f), 0) : -1;
    }
    case OID_FLOAT8: {
        double d;
        memcpy(&d, &u, sizeof(d));
        return len == 8 ? (snprintf(out, cap, "%.17g", d), 0) : -1;
    }
    case OID_TEXT:
    case OID_VARCHAR:
    case OID_BPCHAR:
    case OID_NAME:
    case OID_UNKNOWN:
        if (len >= cap)
            return -1;
        memcpy(out, v, len);
        out[len] = '\0';
        return 0;
    default:
        return -1;
    }
}

/* Decode a request's parameter values (int32 length, bytes) into NUL-terminated text; binary
 * values of common types are turned into text. 0, or -1 with why. */
static int decode_params(const shm_plan_request *r, char **values, Oid *types, char *store,
                         char *why, size_t why_len)
{
    uint32_t off = 0;
    char *w = store;
    char *end = store + SHM_PLAN_PARAMS_MAX * 4;
    for (uint16_t i = 0; i < r->n_params; i++) {
        if (off + 4 > r->params_len)
            return -1;
        uint32_t vlen = pg_get_u32((const uint8_t *)r->params + off);
        off += 4;
        types[i] = i < r->n_types ? r->types[i] : 0;
        if (vlen == 0xffffffffu) {
            values[i] = NULL;
            continue;
        }
        if (vlen > r->params_len - off)
            return -1;
        values[i] = w;
        if (r->binary[i / 8] & (1u << (i % 8))) {
            if (binary_to_text(types[i], (const uint8_t *)r->params + off, vlen, w,
                               (size_t)(end - w)) != 0) {
                snprintf(why, why_len,
                         "parameter $%u is in binary format with type OID %u, which the "
                         "planner cannot read",
                         i + 1u, (unsigned)types[i]);
                return -1;
            }
            w += strlen(w) + 1;
        } else {
            if (vlen >= (size_t)(end - w))
                return -1;
            memcpy(w, r->params + off, vlen);
            w[vlen] = '\0';
            w += vlen + 1;
        }
        off += vlen;
    }
    return 0;
}

/* EXPLAIN one request on its node; publishes the outcome. */
static void planner_explain(planner *p, const shm_plan_request *r, const planner_job *j,
                            bool values_known)
{
    shm_plans *out = p->out;
    char why[512] = "";
    char sql[sizeof(PLANNER_EXPLAIN_GENERIC) + SHM_PLAN_TEXT_MAX + 16];
    char *values[PLANNER_PARAMS_MAX];
    Oid types[PLANNER_PARAMS_MAX];
    char store[SHM_PLAN_PARAMS_MAX * 4]; /* binary numbers grow up to ~2x as text */
    PGresult *res = NULL;
    json_t *plan = NULL;
    const char *json = NULL;
    bool in_tx = false;

    PGconn *conn = planner_connect(p, j->node, j->database, why, sizeof(why));
    if (!conn)
        goto failed;
    int nparams = 0;
    const char *explain = PLANNER_EXPLAIN;
    if (values_known && r->n_params > 0) {
        if (r->n_params > PLANNER_PARAMS_MAX ||
            decode_params(r, values, types, store, why, sizeof(why)) != 0) {
            if (!why[0])
                snprintf(why, sizeof(why), "parameter values could not be read from the Bind");
            atomic_fetch_add(&out->skipped, 1);
            publish(p, j, NULL, NULL, why);
            return;
        }
        nparams = r->n_params;
    } else if (!values_known) {
        if (PQserverVersion(conn) < 160000 && r->reason == PLAN_REASON_RUNNING) {
            /* Its values are not in the running-queries table; when it ends slow, its
             * request brings them. */
            atomic_fetch_add(&out->skipped, 1);
            return;
        }
        if (PQserverVersion(conn) < 160000) {
            snprintf(why, sizeof(why),
                     "parameter values unknown%s and PostgreSQL %d has no EXPLAIN (GENERIC_PLAN) "
                     "(16 and later)",
                     (r->flags & PLAN_REQ_PARAMS_LONG)    ? " (longer than the limit)"
                     : (r->flags & PLAN_REQ_UNKNOWN_STMT) ? " (prepared statement not seen)"
                                                          : "",
                     PQserverVersion(conn) / 10000);
            atomic_fetch_add(&out->skipped, 1);
            publish(p, j, NULL, NULL, why);
            return;
        }
        explain = PLANNER_EXPLAIN_GENERIC;
    }
    char set[160];
    if (!run_ok(conn, "BEGIN READ ONLY", "BEGIN: ", why, sizeof(why)))
        goto failed;
    in_tx = true;
    snprintf(set, sizeof(set), "SET LOCAL statement_timeout = %d", p->cfg.plan_timeout_ms);
    if (!run_ok(conn, set, "statement_timeout: ", why, sizeof(why)))
        goto failed;
    snprintf(set, sizeof(set), "SET LOCAL lock_timeout = %d", p->cfg.plan_timeout_ms);
    if (!run_ok(conn, set, "lock_timeout: ", why, sizeof(why)))
        goto failed;
    char *role = PQescapeIdentifier(conn, j->user, strlen(j->user));
    if (!role) {
        snprintf(why, sizeof(why), "cannot quote the user name");
        goto failed;
    }
    snprintf(set, sizeof(set), "SET LOCAL ROLE %s", role);
    PQfreemem(role);
    if (!run_ok(conn, set, "SET ROLE (the monitor user must be a member of the statement's user): ",
                why, sizeof(why)))
        goto failed;
    snprintf(sql, sizeof(sql), "%s%s", explain, r->text);
    res = PQexecParams(conn, sql, nparams, nparams ? types : NULL,
                       nparams ? (const char *const *)values : NULL, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) < 1) {
        result_error(conn, res, "", why, sizeof(why));
        goto failed;
    }
    json = PQgetvalue(res, 0, 0);
    plan = json_loads(json, 0, NULL);
    if (!json_is_array(plan)) {
        snprintf(why, sizeof(why), "EXPLAIN gave no JSON plan");
        goto failed;
    }
    run_ok(conn, "ROLLBACK", "", why, sizeof(why));
    in_tx = false;
    atomic_fetch_add(&out->planned, 1);
    publish(p, j, json, plan, NULL);
    json_decref(plan);
    PQclear(res);
    return;
failed:
    if (in_tx && PQstatus(conn) == CONNECTION_OK) {
        char ignored[64];
        run_ok(conn, "ROLLBACK", "", ignored, sizeof(ignored));
    }
    json_decref(plan);
    PQclear(res);
    atomic_fetch_add(&out->failed, 1);
    log_debug("plan of \"%.80s\" on %s: %s", j->norm, j->node, why);
    publish(p, j, NULL, NULL, why);
}

/* plan_rate_limit as a token bucket of one second's worth. */
static bool rate_allows(planner *p)
{
    int64_t now = shm_mono_us();
    double rate = p->cfg.plan_rate_limit;
    if (p->tokens_at_us)
        p->tokens += (double)(now - p->tokens_at_us) / 1e6 * rate;
    p->tokens_at_us = now;
    if (p->tokens > rate)
        p->tokens = rate;
    if (p->tokens < 1.0)
        return false;
    p->tokens -= 1.0;
    return true;
}

static void planner_handle(planner *p, const shm_plan_request *r)
{
    shm_plans *out = p->out;
    static char norm[SHM_PLAN_TEXT_MAX + 256]; /* $n may be longer than the literal */
    atomic_fetch_add(&out->requests, 1);
    if (r->flags & PLAN_REQ_TRUNCATED) {
        atomic_fetch_add(&out->skipped, 1);
        return;
    }
    bool has_params = false;
    if (not_plannable(r->text, &has_params)) {
        atomic_fetch_add(&out->skipped, 1);
        return;
    }
    normalize_sql(r->text, norm, sizeof(norm));
    planner_job j = {.id = planner_plan_id(norm, r->database, r->user),
                     .reason = r->reason,
                     .duration_us = r->duration_us,
                     .node = r->node_name,
                     .database = r->database,
                     .user = r->user,
                     .norm = norm};
    for (int i = 0; i < SHM_PLANS_MAX; i++) {
        planner_entry *e = &p->entries[i];
        if (e->used && e->id == j.id &&
            shm_now_us() - e->planned_at_us < (int64_t)p->cfg.plan_max_age_ms * 1000) {
            atomic_fetch_add(&out->deduplicated, 1);
            shm_plan *o = &out->plans[i];
            if (o->reason == PLAN_REASON_RUNNING && r->reason == PLAN_REASON_SLOW) {
                /* The running statement it was made for has ended, slow: say so. */
                atomic_fetch_add_explicit(&o->seq, 1, memory_order_relaxed);
                atomic_thread_fence(memory_order_release);
                o->reason = PLAN_REASON_SLOW;
                o->duration_us = r->duration_us;
                atomic_fetch_add_explicit(&o->seq, 1, memory_order_release);
                atomic_fetch_add_explicit(&out->version, 1, memory_order_release);
            }
            return;
        }
    }
    if (!rate_allows(p)) {
        atomic_fetch_add(&out->rate_limited, 1);
        return;
    }
    bool values_known = true;
    if (r->flags & (PLAN_REQ_PARAMS_LONG | PLAN_REQ_UNKNOWN_STMT))
        values_known = false;
    else if (has_params && !(r->flags & PLAN_REQ_EXTENDED))
        values_known = false; /* a running statement: its values are not in the table */
    planner_explain(p, r, &j, values_known);
}

/* Statements running past plan_slow_threshold, each requested once. */
static void planner_scan_running(planner *p)
{
    shm_segment *shm = p->shm;
    int64_t now = shm_mono_us(); /* stmt_start_us is on this clock */
    int64_t threshold = (int64_t)p->cfg.plan_slow_threshold_ms * 1000;
    shm_session snap;
    static shm_plan_request r;
    for (uint32_t i = 0; i < shm->max_sessions; i++) {
        shm_session *s = &shm->sessions[i];
        if (atomic_load_explicit(&s->state, memory_order_relaxed) != SESSION_ACTIVE)
            continue;
        if (!shm_session_snapshot(s, &snap) || atomic_load(&snap.state) != SESSION_ACTIVE ||
            !snap.stmt_start_us || now - snap.stmt_start_us < threshold)
            continue;
        bool seen = false;
        for (int k = 0; k < PLANNER_RUNNING_SEEN && !seen; k++)
            seen = p->seen[k].session == snap.id && p->seen[k].stmt_start_us == snap.stmt_start_us;
        if (seen)
            continue;
        p->seen[p->next_seen] = (planner_seen){snap.id, snap.stmt_start_us};
        p->next_seen = (p->next_seen + 1) % PLANNER_RUNNING_SEEN;
        memset(&r, 0, offsetof(shm_plan_request, params));
        r.at_us = shm_now_us();
        r.duration_us = now - snap.stmt_start_us;
        r.reason = PLAN_REASON_RUNNING;
        memcpy(r.node_name, snap.node_name, sizeof(r.node_name));
        memcpy(r.user, snap.user, sizeof(r.user));
        memcpy(r.database, snap.database, sizeof(r.database));
        size_t len = strnlen(snap.stmt, sizeof(snap.stmt) - 1);
        memcpy(r.text, snap.stmt, len);
        r.text[len] = '\0';
        if (len == sizeof(snap.stmt) - 1)
            r.flags |= PLAN_REQ_TRUNCATED;
        planner_handle(p, &r);
    }
}

/* Take every request the workers queued. */
static void planner_drain(planner *p)
{
    static shm_plan_request r; /* one copy at a time: the ring slot is freed at once */
    for (uint32_t w = 0; w < p->shm->n_workers; w++) {
        shm_plan_ring *ring = shm_plan_ring_of(p->shm, w);
        uint64_t tail = atomic_load_explicit(&ring->tail, memory_order_relaxed);
        uint64_t head = atomic_load_explicit(&ring->head, memory_order_acquire);
        while (tail < head) {
            memcpy(&r, &ring->req[tail % SHM_PLAN_RING], sizeof(r));
            r.text[sizeof(r.text) - 1] = '\0';
            r.node_name[sizeof(r.node_name) - 1] = '\0';
            r.user[sizeof(r.user) - 1] = '\0';
            r.database[sizeof(r.database) - 1] = '\0';
            if (r.params_len > sizeof(r.params))
                r.params_len = 0;
            if (r.n_types > SHM_PLAN_TYPES_MAX)
                r.n_types = SHM_PLAN_TYPES_MAX;
            tail++;
            atomic_store_explicit(&ring->tail, tail, memory_order_release);
            planner_handle(p, &r);
        }
    }
}

/* Close cached connections unused for PLANNER_CONN_IDLE_US, or all of them (a reload may have
 * moved a node or changed the monitor user). */
static void planner_close_idle(planner *p, bool all)
{
    int64_t now = shm_mono_us();
    for (int i = 0; i < PLANNER_CONNS; i++)
        if (p->conns[i].conn && (all || now - p->conns[i].used_us > PLANNER_CONN_IDLE_US))
            conn_drop(&p->conns[i]);
}

static void *planner_main(void *arg)
{
    planner *p = arg;
    for (;;) {
        if (shm_settings_version(p->shm) != p->settings_version) {
            p->settings_version = shm_settings_read(p->shm, &p->cfg);
            planner_close_idle(p, true);
        }
        planner_close_idle(p, false);
        planner_drain(p);
        if (p->cfg.plan_slow_threshold_ms > 0)
            planner_scan_running(p);
        sleep_ms(PLANNER_POLL_MS);
    }
    return NULL;
}

/* A restarted agent takes over what the previous one published: its plans stay shown, are
 * deduplicated against and compared with (plan changes). A slot the previous agent died
 * writing (odd seq) is emptied, its seq made even again, so that readers can trust it. */
static void planner_adopt(planner *p)
{
    static shm_plan snap;
    for (uint32_t i = 0; i < SHM_PLANS_MAX; i++) {
        shm_plan *out = &p->out->plans[i];
        if (atomic_load(&out->seq) & 1u) {
            out->used = 0;
            atomic_fetch_add_explicit(&out->seq, 1, memory_order_release);
            continue;
        }
        if (!shm_plan_snapshot(p->shm, i, &snap))
            continue;
        planner_entry *e = &p->entries[i];
        e->used = true;
        e->id = snap.id;
        e->planned_at_us = snap.planned_at_us;
        if (snap.json_len) {
            json_t *plan = json_loadb(snap.json, snap.json_len, 0, NULL);
            json_t *top = json_object_get(json_array_get(plan, 0), "Plan");
            if (top) {
                e->shape = plan_shape(top, 0xcbf29ce484222325ull, 0);
                e->json = strndup(snap.json, snap.json_len);
            }
            json_decref(plan);
        }
    }
}

int planner_start(agent *a)
{
    pthread_t tid;
    if (!a->shm)
        return 0;
    planner *p = calloc(1, sizeof(*p));
    if (!p) {
        log_error("planner: out of memory");
        return -1;
    }
    p->shm = a->shm;
    p->out = shm_plans_of(a->shm);
    p->settings_version = shm_settings_read(a->shm, &p->cfg);
    p->tokens = p->cfg.plan_rate_limit;
    planner_adopt(p);
    int rc = pthread_create(&tid, NULL, planner_main, p);
    if (rc != 0) {
        log_error("planner: cannot start its thread: %s", strerror(rc));
        free(p);
        return -1;
    }
    pthread_detach(tid);
    return 0;
}
