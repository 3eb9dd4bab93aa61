/* store_fleet.c - deployments, their leadership and proxies: saved, and loaded by a holder.
 * Every write is conditional on this replica still holding the lease it acts under
 * (STORE_LEASE_GUARD, parameters $1..$3). */
#include "store.h"
#include "log.h"
#include "store_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STORE_FLEET_GUARD STORE_LEASE_GUARD("1", "2", "3")

/* A guarded write of want rows (or more): 0, or -1 when the store failed or the guard let
 * nothing through (this replica no longer holds the lease). */
static int store_fleet_write(const char *what, const char *sql, int n, const char **params,
                             int want)
{
    PGresult *res = store_exec(PGRES_COMMAND_OK, sql, n, params);
    if (!res)
        return -1;
    int rows = atoi(PQcmdTuples(res));
    PQclear(res);
    if (rows < want) {
        store_fail("%s: not written (this replica no longer holds the lease)", what);
        return -1;
    }
    return 0;
}

int store_deployment_save(const char *name, const char *token_sha256, bool is_auto)
{
    char term[STORE_INT_MAX];
    const char *params[6];
    int n = store_guard_params(params, term);
    params[n++] = name;
    params[n++] = token_sha256;
    params[n++] = is_auto ? "true" : "false";
    return store_fleet_write(
        "deployment row",
        "INSERT INTO pgrelay.deployments (name, token_sha256, auto)"
        " SELECT $4, $5, $6::boolean WHERE" STORE_FLEET_GUARD
        " ON CONFLICT (name) DO UPDATE SET token_sha256 = EXCLUDED.token_sha256",
        n, params, 1);
}

int store_load(state_deployment **head)
{
    PGresult *res = store_exec(PGRES_TUPLES_OK,
                               "SELECT d.name, d.token_sha256, d.auto, l.leader,"
                               "  coalesce(l.epoch, 0) FROM pgrelay.deployments d"
                               " LEFT JOIN pgrelay.leadership l ON l.deployment = d.name"
                               " ORDER BY d.name DESC",
                               0, NULL);
    if (!res)
        return -1;
    for (int i = 0; i < PQntuples(res); i++) {
        state_deployment *d = calloc(1, sizeof(*d));
        if (!d)
            goto oom;
        get_text(res, i, 0, d->name, sizeof(d->name));
        get_text(res, i, 1, d->token_sha256, sizeof(d->token_sha256));
        d->is_auto = get_bool(res, i, 2);
        get_text(res, i, 3, d->leader, sizeof(d->leader));
        d->epoch = get_int(res, i, 4);
        d->next = *head;
        *head = d;
    }
    PQclear(res);

    /* Declared proxies (members) that never reported have no proxies row; proxies rows without
     * a member are pending (recorded before membership existed, or since deleted). */
    res = store_exec(PGRES_TUPLES_OK,
                     "SELECT deployment, node_id, coalesce(p.hostname, ''),"
                     "  coalesce(p.version, ''), coalesce(p.listen, '[]')::text,"
                     "  coalesce(p.epoch, 0), p.leader, coalesce(p.maintenance, false),"
                     "  coalesce(p.config_version, 0), coalesce(p.registered_ms, 0),"
                     "  coalesce(p.last_seen_ms, 0), m.node_id IS NOT NULL, m.options::text"
                     " FROM pgrelay.proxies p FULL JOIN pgrelay.members m"
                     "  USING (deployment, node_id)"
                     " ORDER BY deployment, node_id DESC",
                     0, NULL);
    if (!res)
        return -1;
    for (int i = 0; i < PQntuples(res); i++) {
        state_deployment *d = *head;
        while (d && strcmp(d->name, PQgetvalue(res, i, 0)) != 0)
            d = d->next;
        if (!d)
            continue;
        state_proxy *p = calloc(1, sizeof(*p));
        if (!p)
            goto oom;
        p->dep = d;
        get_text(res, i, 1, p->node_id, sizeof(p->node_id));
        get_text(res, i, 2, p->hostname, sizeof(p->hostname));
        get_text(res, i, 3, p->version, sizeof(p->version));
        p->listen = json_loads(PQgetvalue(res, i, 4), 0, NULL);
        if (!json_is_array(p->listen)) {
            json_decref(p->listen);
            p->listen = json_array();
        }
        p->epoch = get_int(res, i, 5);
        get_text(res, i, 6, p->leader, sizeof(p->leader));
        p->maintenance = get_bool(res, i, 7);
        p->config_version = get_int(res, i, 8);
        p->registered_ms = get_int(res, i, 9);
        p->last_seen_ms = get_int(res, i, 10);
        p->declared = get_bool(res, i, 11);
        if (p->declared) {
            p->options = json_loads(PQgetvalue(res, i, 12), 0, NULL);
            if (!json_is_object(p->options)) {
                json_decref(p->options);
                p->options = json_object();
            }
            d->n_declared++;
        } else {
            d->n_pending++;
        }
        p->next = d->proxies;
        d->proxies = p;
    }
    PQclear(res);
    return 0;
oom:
    PQclear(res);
    store_fail("out of memory loading the store");
    return -1;
}

int store_proxy_save(const state_proxy *p)
{
    char epoch[STORE_INT_MAX], cv[STORE_INT_MAX], reg[STORE_INT_MAX], seen[STORE_INT_MAX];
    char *listen = json_dumps(p->listen ? p->listen : json_array(), JSON_COMPACT);
    char term[STORE_INT_MAX];
    const char *params[14] = {NULL, NULL, NULL,
                            p->dep->name,
                            p->node_id,
                            p->hostname,
                            p->version,
                            listen ? listen : "[]",
                            fmt_int(epoch, p->epoch),
                            p->leader[0] ? p->leader : NULL,
                            p->maintenance ? "true" : "false",
                            fmt_int(cv, p->config_version),
                            fmt_int(reg, p->registered_ms),
                            fmt_int(seen, p->last_seen_ms)};
    store_guard_params(params, term);
    int rc = store_fleet_write(
        "proxy row",
        "INSERT INTO pgrelay.proxies (deployment, node_id, hostname, version, listen, epoch,"
        "  leader, maintenance, config_version, registered_ms, last_seen_ms)"
        " SELECT $4, $5, $6, $7, $8::jsonb, $9::bigint, $10, $11::boolean, $12::bigint,"
        "  $13::bigint, $14::bigint WHERE" STORE_FLEET_GUARD
        " ON CONFLICT (deployment, node_id) DO UPDATE SET hostname = EXCLUDED.hostname,"
        "  version = EXCLUDED.version, listen = EXCLUDED.listen, epoch = EXCLUDED.epoch,"
        "  leader = EXCLUDED.leader, maintenance = EXCLUDED.maintenance,"
        "  config_version = EXCLUDED.config_version, registered_ms = EXCLUDED.registered_ms,"
        "  last_seen_ms = EXCLUDED.last_seen_ms",
        14, params, 1);
    free(listen);
    return rc;
}

int store_leadership_save(const char *deployment, const char *leader, int64_t epoch,
                          int64_t *stored_epoch, char *stored_leader)
{
    char e[STORE_INT_MAX];
    char term[STORE_INT_MAX];
    const char *params[6];
    int n = store_guard_params(params, term);
    params[n++] = deployment;
    params[n++] = leader && leader[0] ? leader : NULL;
    params[n++] = fmt_int(e, epoch);
    /* Epochs strictly increase: an equal epoch is taken only when it names the same leader (a
     * repeated save), never another one. */
    PGresult *res = store_exec(
        PGRES_TUPLES_OK,
        "WITH g AS (SELECT" STORE_FLEET_GUARD " AS held),"
        " w AS (INSERT INTO pgrelay.leadership AS l (deployment, leader, epoch)"
        "  SELECT $4, $5, $6::bigint FROM g WHERE g.held"
        "  ON CONFLICT (deployment) DO UPDATE SET leader = EXCLUDED.leader,"
        "   epoch = EXCLUDED.epoch, updated_at = now()"
        "  WHERE l.epoch < EXCLUDED.epoch"
        "   OR (l.epoch = EXCLUDED.epoch AND l.leader IS NOT DISTINCT FROM EXCLUDED.leader)"
        "  RETURNING 1)"
        " SELECT (SELECT count(*) FROM w), l.epoch, l.leader, (SELECT held FROM g)"
        " FROM (SELECT 1) AS one LEFT JOIN pgrelay.leadership l ON l.deployment = $4",
        n, params);
    if (!res)
        return -1;
    int rc = 0;
    if (PQntuples(res) == 1 && !get_bool(res, 0, 3)) {
        PQclear(res);
        store_fail("leadership of %s: not written (this replica no longer holds the lease)",
                   deployment);
        return -1;
    }
    if (PQntuples(res) == 1 && get_int(res, 0, 0) == 0) {
        rc = 1;
        *stored_epoch = get_int(res, 0, 1);
        get_text(res, 0, 2, stored_leader, STATE_NODE_NAME_MAX);
    }
    PQclear(res);
    return rc;
}

char *store_proxies_json(state_proxy *const *list, int n)
{
    json_t *rows = json_array();
    for (int i = 0; rows && i < n; i++) {
        const state_proxy *p = list[i];
        json_array_append_new(
            rows, json_pack("{s:s, s:s, s:s, s:s, s:O, s:I, s:o, s:b, s:I, s:I, s:I}", "deployment",
                            p->dep->name, "node_id", p->node_id, "hostname", p->hostname, "version",
                            p->version, "listen", p->listen ? p->listen : json_null(), "epoch",
                            (json_int_t)p->epoch, "leader",
                            p->leader[0] ? json_string(p->leader) : json_null(), "maintenance",
                            p->maintenance, "config_version", (json_int_t)p->config_version,
                            "registered_ms", (json_int_t)p->registered_ms, "last_seen_ms",
                            (json_int_t)p->last_seen_ms));
    }
    char *text = rows ? json_dumps(rows, JSON_COMPACT) : NULL;
    json_decref(rows);
    return text;
}

int store_proxies_save_text(const char *text)
{
    int rc;
    char term[STORE_INT_MAX];
    const char *params[4];
    store_guard_params(params, term);
    params[3] = text;
    /* One statement (one round trip, one commit) for the whole list. */
    rc = store_fleet_write(
        "proxy rows",
        "INSERT INTO pgrelay.proxies (deployment, node_id, hostname, version, listen, epoch,"
        "  leader, maintenance, config_version, registered_ms, last_seen_ms)"
        " SELECT r.deployment, r.node_id, r.hostname, r.version, coalesce(r.listen, '[]'),"
        "  r.epoch, r.leader, r.maintenance, r.config_version, r.registered_ms, r.last_seen_ms"
        " FROM jsonb_to_recordset($4::jsonb) AS r(deployment text, node_id text, hostname text,"
        "  version text, listen jsonb, epoch bigint, leader text, maintenance boolean,"
        "  config_version bigint, registered_ms bigint, last_seen_ms bigint)"
        " WHERE" STORE_FLEET_GUARD
        " ON CONFLICT (deployment, node_id) DO UPDATE SET hostname = EXCLUDED.hostname,"
        "  version = EXCLUDED.version, listen = EXCLUDED.listen, epoch = EXCLUDED.epoch,"
        "  leader = EXCLUDED.leader, maintenance = EXCLUDED.maintenance,"
        "  config_version = EXCLUDED.config_version, registered_ms = EXCLUDED.registered_ms,"
        "  last_seen_ms = EXCLUDED.last_seen_ms",
        4, params, strcmp(text, "[]") != 0 ? 1 : 0);
    return rc;
}

int store_proxies_save(state_proxy *const *list, int n)
{
    char *text = store_proxies_json(list, n);
    if (!text) {
        store_fail("out of memory saving %d proxies", n);
        return -1;
    }
    int rc = store_proxies_save_text(text);
    free(text);
    return rc;
}
