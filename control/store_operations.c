/* store_operations.c - durable operations (a switchover, a configuration apply): created, each step recorded before
 * it is acted on, ended; the unfinished ones found again by the next lease holder.
 *
 * Every write is conditional on this replica still holding the lease it acts under (holder
 * and term in the WHERE, store_lease_guard): a replica that lost the lease while a call was
 * on its way changes nothing.
 */
#include "store.h"
#include "log.h"
#include "store_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Appended to the WHERE of every write: $1..$3 are the lease's name, holder and term. */
#define STORE_OP_GUARD " AND" STORE_LEASE_GUARD("1", "2", "3")

/* The three guard parameters, then up to STORE_OP_PARAMS - 3 of the caller's. */
#define STORE_OP_PARAMS 10

static int store_op_params(const char **params, char *term)
{
    store_lease_guard(&params[0], &params[1], term);
    params[2] = params[0] ? term : NULL;
    return 3;
}

/* A write that must touch exactly one row: 0, or -1 (store error, or the lease is gone). */
static int store_op_write(const char *what, const char *sql, int n, const char **params)
{
    PGresult *res = store_exec(PGRES_COMMAND_OK, sql, n, params);
    if (!res)
        return -1;
    int rows = atoi(PQcmdTuples(res));
    PQclear(res);
    if (rows != 1) {
        store_fail("%s: not written (this replica no longer holds the lease)", what);
        return -1;
    }
    return 0;
}

int64_t store_operation_create(const char *deployment, const char *kind, const char *node,
                               const char *old_leader, bool promote, bool force, int64_t timeout_s)
{
    const char *params[STORE_OP_PARAMS];
    char term[STORE_INT_MAX], tmo[STORE_INT_MAX];
    int n = store_op_params(params, term);
    params[n++] = deployment;
    params[n++] = kind;
    params[n++] = node;
    params[n++] = old_leader;
    params[n++] = promote ? "true" : "false";
    params[n++] = force ? "true" : "false";
    params[n++] = fmt_int(tmo, timeout_s);
    PGresult *res = store_exec(
        PGRES_TUPLES_OK,
        "INSERT INTO pgrelay.operations (deployment, kind, node, old_leader, promote, force,"
        "  timeout_s, step, steps)"
        " SELECT $4, $5, $6, $7, $8::boolean, $9::boolean, $10::int, 'begin',"
        "  jsonb_build_array(jsonb_build_object('step', 'begin', 'at', now()))"
        " WHERE true" STORE_OP_GUARD " RETURNING id",
        n, params);
    if (!res)
        return -1;
    int64_t id = PQntuples(res) == 1 ? get_int(res, 0, 0) : -1;
    PQclear(res);
    if (id < 0)
        store_fail("operation: not created (this replica no longer holds the lease)");
    return id;
}

int store_operation_step(int64_t id, const char *step, const char *runner, bool fenced,
                         bool promote_sent)
{
    const char *params[STORE_OP_PARAMS];
    char term[STORE_INT_MAX], idtext[STORE_INT_MAX];
    int n = store_op_params(params, term);
    params[n++] = fmt_int(idtext, id);
    params[n++] = step;
    params[n++] = runner;
    params[n++] = fenced ? "true" : "false";
    params[n++] = promote_sent ? "true" : "false";
    return store_op_write("operation step",
                          "UPDATE pgrelay.operations SET step = $5, runner = $6,"
                          "  fenced = $7::boolean, promote_sent = $8::boolean,"
                          "  steps = steps || jsonb_build_object('step', $5::text, 'at', now())"
                          " WHERE id = $4::bigint AND state = 'running'" STORE_OP_GUARD,
                          n, params);
}

int store_operation_note(int64_t id, const char *detail)
{
    const char *params[STORE_OP_PARAMS];
    char term[STORE_INT_MAX], idtext[STORE_INT_MAX];
    int n = store_op_params(params, term);
    params[n++] = fmt_int(idtext, id);
    params[n++] = detail;
    /* the detail of the last step recorded */
    return store_op_write("operation note",
                          "UPDATE pgrelay.operations SET steps = jsonb_set(steps,"
                          "  ARRAY[(jsonb_array_length(steps) - 1)::text, 'detail'],"
                          "  to_jsonb($5::text))"
                          " WHERE id = $4::bigint" STORE_OP_GUARD,
                          n, params);
}

int store_operation_end(int64_t id, const char *state, const char *outcome)
{
    const char *params[STORE_OP_PARAMS];
    char term[STORE_INT_MAX], idtext[STORE_INT_MAX];
    int n = store_op_params(params, term);
    params[n++] = fmt_int(idtext, id);
    params[n++] = state;
    params[n++] = outcome;
    return store_op_write("operation end",
                          "UPDATE pgrelay.operations SET state = $5, outcome = $6,"
                          "  ended_at = now(),"
                          "  steps = steps || jsonb_build_object('step', $5::text, 'at', now(),"
                          "    'detail', $6::text)"
                          " WHERE id = $4::bigint AND state = 'running'" STORE_OP_GUARD,
                          n, params);
}

/* One row of pgrelay.operations as JSON (columns as selected by STORE_OP_COLUMNS). */
#define STORE_OP_COLUMNS                                                                           \
    "id, deployment, kind, node, old_leader, promote, force, runner, step, steps::text,"           \
    " fenced, promote_sent, state, outcome, timeout_s,"                                            \
    " (extract(epoch FROM created_at) * 1000)::bigint,"                                            \
    " (extract(epoch FROM ended_at) * 1000)::bigint, version, targets::text, command_id"

static json_t *store_op_row(const PGresult *res, int i)
{
    json_t *steps = json_loads(PQgetvalue(res, i, 9), 0, NULL);
    json_t *targets = json_loads(PQgetvalue(res, i, 18), 0, NULL);
    json_t *row = json_pack(
        "{s:I, s:s, s:s, s:s, s:s, s:b, s:b, s:s, s:s, s:o, s:b, s:b, s:s, s:s, s:I, s:I, s:o}",
        "id", (json_int_t)get_int(res, i, 0), "deployment", PQgetvalue(res, i, 1), "kind",
        PQgetvalue(res, i, 2), "node", PQgetvalue(res, i, 3), "old_leader", PQgetvalue(res, i, 4),
        "promote", get_bool(res, i, 5), "force", get_bool(res, i, 6), "runner",
        PQgetvalue(res, i, 7), "step", PQgetvalue(res, i, 8), "steps", steps ? steps : json_array(),
        "fenced", get_bool(res, i, 10), "promote_sent", get_bool(res, i, 11), "state",
        PQgetvalue(res, i, 12), "outcome", PQgetvalue(res, i, 13), "timeout_s",
        (json_int_t)get_int(res, i, 14), "created", (json_int_t)get_int(res, i, 15), "ended",
        PQgetisnull(res, i, 16) ? json_null() : json_integer(get_int(res, i, 16)));
    if (row && strcmp(PQgetvalue(res, i, 2), "config") == 0) /* a configuration apply */
        json_object_update_new(
            row, json_pack("{s:I, s:o, s:I}", "version", (json_int_t)get_int(res, i, 17),
                           "targets", json_is_array(targets) ? json_incref(targets) : json_array(),
                           "command_id", (json_int_t)get_int(res, i, 19)));
    json_decref(targets);
    return row;
}

json_t *store_operations_list(const char *deployment, int limit, bool running_only)
{
    char lim[STORE_INT_MAX];
    const char *params[] = {deployment, fmt_int(lim, limit), running_only ? "true" : "false"};
    PGresult *res = store_exec(PGRES_TUPLES_OK,
                               "SELECT " STORE_OP_COLUMNS " FROM pgrelay.operations"
                               " WHERE ($1::text IS NULL OR deployment = $1)"
                               "   AND (NOT $3::boolean OR state = 'running')"
                               " ORDER BY id DESC LIMIT $2::int",
                               3, params);
    if (!res)
        return NULL;
    json_t *list = json_array();
    for (int i = 0; list && i < PQntuples(res); i++)
        json_array_append_new(list, store_op_row(res, i));
    PQclear(res);
    return list;
}

int store_operation_cancel_commands(int64_t id, const char *detail)
{
    const char *params[STORE_OP_PARAMS];
    char term[STORE_INT_MAX], idtext[STORE_INT_MAX];
    int n = store_op_params(params, term);
    params[n++] = fmt_int(idtext, id);
    params[n++] = detail;
    return store_command("UPDATE pgrelay.command_acks a SET acked_at = now(), ok = false,"
                         "  detail = $5 FROM pgrelay.commands c"
                         " WHERE c.id = a.command_id AND a.acked_at IS NULL"
                         "   AND c.args->>'operation' = $4" STORE_OP_GUARD,
                         n, params);
}
