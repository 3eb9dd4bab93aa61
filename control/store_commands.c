/* store_commands.c - commands to proxies: created, delivered by the long poll, acknowledged.
 * Every write (creating, delivery marks, acknowledgements, cancelling, expiry) is conditional
 * on still holding the lease (STORE_LEASE_GUARD). Deliveries and acknowledgements come in
 * batches (agents.c): one statement for many proxies, with the values as arrays. */
#include "store.h"
#include "log.h"
#include "store_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int64_t store_command_create(const char *deployment, const char *type, json_t *args,
                             state_proxy *const *targets, int n_targets)
{
    const char **ids = malloc((size_t)(n_targets > 0 ? n_targets : 1) * sizeof(*ids));
    if (!ids) {
        store_fail("out of memory creating a command");
        return -1;
    }
    for (int i = 0; i < n_targets; i++)
        ids[i] = targets[i]->node_id;
    int64_t id = store_command_create_ids(deployment, type, args, ids, n_targets);
    free(ids);
    return id;
}

int64_t store_command_create_ids(const char *deployment, const char *type, json_t *args,
                                 const char *const *node_ids, int n_targets)
{
    int64_t id = -1;
    json_t *nodes = json_array();
    char *nodes_text = NULL, *args_text = NULL;
    PGresult *res = NULL;

    if (!nodes)
        goto done;
    for (int i = 0; i < n_targets; i++)
        json_array_append_new(nodes, json_string(node_ids[i]));
    nodes_text = json_dumps(nodes, JSON_COMPACT);
    args_text = json_dumps(args, JSON_COMPACT);
    if (!nodes_text || !args_text) {
        store_fail("out of memory creating a command");
        goto done;
    }
    char term[STORE_INT_MAX];
    const char *params[7] = {deployment, type, args_text, nodes_text};
    store_lease_guard(&params[4], &params[5], term);
    params[6] = params[4] ? term : NULL;
    /* only while this replica still holds the lease it acts under */
    res = store_exec(PGRES_TUPLES_OK,
                     "WITH c AS (INSERT INTO pgrelay.commands (deployment, type, args)"
                     "  SELECT $1, $2, $3::jsonb WHERE" STORE_LEASE_GUARD("5", "6", "7")
                     "  RETURNING id),"
                     " t AS (INSERT INTO pgrelay.command_acks (command_id, node_id)"
                     "  SELECT c.id, n FROM c, jsonb_array_elements_text($4::jsonb) AS n)"
                     " SELECT id FROM c",
                     7, params);
    if (res && PQntuples(res) == 1)
        id = get_int(res, 0, 0);
    else if (res)
        store_fail("command %s not queued: this replica no longer holds the lease", type);
done:
    PQclear(res);
    free(nodes_text);
    free(args_text);
    json_decref(nodes);
    return id;
}

int store_commands_pending_many(const char *deployment, const char *const *node_ids, int n,
                                store_pending *out)
{
    char term[STORE_INT_MAX];
    const char *params[5];
    store_array ids = {0};
    json_t *by_node = json_object(), *since = json_object();
    PGresult *res = NULL;
    int rc = -1;

    for (int i = 0; i < n; i++) {
        out[i] = (store_pending){.commands = NULL, .since_ms = -1};
        store_array_add(&ids, node_ids[i]);
    }
    store_guard_params(params, term);
    params[3] = deployment;
    if (!by_node || !since || !(params[4] = store_array_end(&ids))) {
        store_fail("out of memory reading %d proxies' commands", n);
        goto done;
    }
    /* a replica that no longer holds the lease delivers (and marks) nothing */
    res = store_exec(PGRES_TUPLES_OK,
                     "WITH p AS (SELECT a.command_id, a.node_id, c.type, c.args,"
                     "    (extract(epoch FROM now() - a.delivered_at) * 1000)::bigint AS since_ms"
                     "  FROM pgrelay.command_acks a JOIN pgrelay.commands c ON c.id = a.command_id"
                     "  WHERE c.deployment = $4 AND a.acked_at IS NULL"
                     "   AND a.node_id = ANY($5::text[])"
                     "   AND" STORE_LEASE_GUARD_NOLOCK("1", "2", "3") " FOR UPDATE OF a),"
                     " u AS (UPDATE pgrelay.command_acks a SET deliveries = a.deliveries + 1,"
                     "    delivered_at = now() FROM p"
                     "  WHERE a.command_id = p.command_id AND a.node_id = p.node_id)"
                     " SELECT node_id, command_id, type, args::text, since_ms FROM p"
                     " ORDER BY node_id, command_id",
                     5, params);
    if (!res)
        goto done;
    for (int i = 0; i < PQntuples(res); i++) {
        const char *node = PQgetvalue(res, i, 0);
        json_t *list = json_object_get(by_node, node);
        if (!list) {
            list = json_array();
            if (!list || json_object_set_new(by_node, node, list) != 0) {
                store_fail("out of memory reading %d proxies' commands", n);
                goto done;
            }
        }
        json_t *args = json_loads(PQgetvalue(res, i, 3), 0, NULL);
        json_array_append_new(
            list, json_pack("{s:I, s:s, s:o}", "id", (json_int_t)get_int(res, i, 1), "type",
                            PQgetvalue(res, i, 2), "args", args ? args : json_object()));
        int64_t s = PQgetisnull(res, i, 4) ? -1 : get_int(res, i, 4);
        json_t *was = json_object_get(since, node);
        if (!was || s < json_integer_value(was))
            json_object_set_new(since, node, json_integer(s));
    }
    for (int i = 0; i < n; i++) {
        json_t *list = json_object_get(by_node, node_ids[i]);
        json_t *s = json_object_get(since, node_ids[i]);
        out[i].commands = list ? json_incref(list) : json_array();
        out[i].since_ms = s ? json_integer_value(s) : -1;
    }
    rc = 0;
done:
    PQclear(res);
    store_array_free(&ids);
    json_decref(by_node);
    json_decref(since);
    return rc;
}

int store_command_ack_many(store_ack_item *items, int n)
{
    char term[STORE_INT_MAX], num[STORE_INT_MAX];
    const char *params[8];
    store_array ids = {0}, deps = {0}, nodes = {0}, oks = {0}, details = {0};
    PGresult *res = NULL;
    int rc = -1;

    for (int i = 0; i < n; i++) {
        items[i].result = STORE_ACK_ERROR;
        items[i].type[0] = '\0';
        items[i].args = NULL;
        store_array_add(&ids, fmt_int(num, items[i].id));
        store_array_add(&deps, items[i].deployment);
        store_array_add(&nodes, items[i].node_id);
        store_array_add(&oks, items[i].ok ? "t" : "f");
        store_array_add(&details, items[i].detail ? items[i].detail : "");
    }
    store_guard_params(params, term);
    if (!(params[3] = store_array_end(&ids)) || !(params[4] = store_array_end(&deps)) ||
        !(params[5] = store_array_end(&nodes)) || !(params[6] = store_array_end(&oks)) ||
        !(params[7] = store_array_end(&details))) {
        store_fail("out of memory recording %d acknowledgements", n);
        goto done;
    }
    /* One row per acknowledgement, in order: the command's type and args when recorded now
     * (the first of equal ones), else whether it exists for the proxy (x_exists) and was
     * acknowledged before (x_acked: a duplicate; not: the guard let nothing through). The
     * outer query reads the rows as they were before the UPDATE. Arrays, not JSON: the
     * planner knows how many rows come (a JSON set is 100 to it, and the plan a loop). */
    res = store_exec(
        PGRES_TUPLES_OK,
        "WITH i AS (SELECT * FROM unnest($4::bigint[], $5::text[], $6::text[], $7::boolean[],"
        "   $8::text[]) WITH ORDINALITY AS r(id, dep, node, ok, detail, n)),"
        " u AS (UPDATE pgrelay.command_acks a SET acked_at = now(), ok = i.ok, detail = i.detail"
        "   FROM i JOIN pgrelay.commands c ON c.id = i.id AND c.deployment = i.dep"
        "   WHERE a.command_id = i.id AND a.node_id = i.node AND a.acked_at IS NULL"
        "    AND" STORE_LEASE_GUARD_NOLOCK("1", "2", "3")
        "   RETURNING a.command_id, a.node_id, c.type, c.args::text AS args)"
        " SELECT i.n - 1, u.type, u.args, x.acked_at IS NOT NULL AS x_acked,"
        "   x.command_id IS NOT NULL AS x_exists,"
        "   row_number() OVER (PARTITION BY i.id, i.node, i.dep ORDER BY i.n) AS nth"
        " FROM i LEFT JOIN u ON u.command_id = i.id AND u.node_id = i.node"
        "  LEFT JOIN (SELECT xa.command_id, xa.node_id, xa.acked_at, xc.deployment"
        "   FROM pgrelay.command_acks xa JOIN pgrelay.commands xc ON xc.id = xa.command_id) x"
        "   ON x.command_id = i.id AND x.node_id = i.node AND x.deployment = i.dep"
        " ORDER BY i.n",
        8, params);
    if (!res)
        goto done;
    for (int r = 0; r < PQntuples(res); r++) {
        int64_t i = get_int(res, r, 0);
        if (i < 0 || i >= n)
            continue;
        store_ack_item *it = &items[i];
        if (!PQgetisnull(res, r, 1) && get_int(res, r, 5) == 1) {
            it->result = STORE_ACK_RECORDED;
            get_text(res, r, 1, it->type, sizeof(it->type));
            it->args = json_loads(PQgetvalue(res, r, 2), 0, NULL);
            if (!it->args)
                it->args = json_object();
        } else if (!PQgetisnull(res, r, 1) || get_bool(res, r, 3)) {
            it->result = STORE_ACK_DUPLICATE;
        } else if (get_bool(res, r, 4)) { /* the guard let nothing through */
            it->result = STORE_ACK_ERROR;
        } else {
            it->result = STORE_ACK_UNKNOWN;
        }
    }
    rc = 0;
done:
    PQclear(res);
    store_array_free(&ids);
    store_array_free(&deps);
    store_array_free(&nodes);
    store_array_free(&oks);
    store_array_free(&details);
    return rc;
}

int store_command_cancel(int64_t id, const char *detail)
{
    char idtext[STORE_INT_MAX], term[STORE_INT_MAX];
    const char *params[5] = {fmt_int(idtext, id), detail};
    store_lease_guard(&params[2], &params[3], term);
    params[4] = params[2] ? term : NULL;
    return store_command("UPDATE pgrelay.command_acks SET acked_at = now(), ok = false,"
                         "  detail = $2 WHERE command_id = $1::bigint AND acked_at IS NULL"
                         "  AND" STORE_LEASE_GUARD("3", "4", "5"),
                         5, params);
}

int store_commands_expire(int64_t retention_ms)
{
    char ms[STORE_INT_MAX], term[STORE_INT_MAX];
    const char *params[4];
    store_guard_params(params, term);
    params[3] = fmt_int(ms, retention_ms);
    PGresult *res =
        store_exec(PGRES_COMMAND_OK,
                   "DELETE FROM pgrelay.commands"
                   " WHERE created_at < now() - make_interval(secs => $4::bigint / 1000.0)"
                   "  AND" STORE_LEASE_GUARD("1", "2", "3"),
                   4, params);
    if (!res)
        return -1;
    int n = atoi(PQcmdTuples(res));
    PQclear(res);
    return n;
}

int store_commands_prune_renewals(const char *deployment, int64_t before_id)
{
    char idtext[STORE_INT_MAX], term[STORE_INT_MAX];
    const char *params[5] = {deployment, fmt_int(idtext, before_id)};
    store_lease_guard(&params[2], &params[3], term);
    params[4] = params[2] ? term : NULL;
    PGresult *res = store_exec(PGRES_COMMAND_OK,
                               "DELETE FROM pgrelay.commands WHERE deployment = $1"
                               " AND id < $2::bigint AND type = 'maintenance'"
                               " AND args @> '{\"renewal\": true}' AND" STORE_LEASE_GUARD("3", "4", "5"),
                               5, params);
    if (!res)
        return -1;
    int n = atoi(PQcmdTuples(res));
    PQclear(res);
    return n;
}
