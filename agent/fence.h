/* fence.h - fencing an old primary and lifting the fence; catching up and promoting a target. */
#ifndef PGRELAY_AGENT_FENCE_H
#define PGRELAY_AGENT_FENCE_H

#include "config.h"

#include <jansson.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>

/* The database a fenced node still accepts connections to (for the agent to lift the fence
 * and read its WAL position); every other database refuses them. */
#define FENCE_DBNAME "template1"

/* Commands (fence.c): "fence" {node, force} and "unfence" {node}. 0 (ok) or -1; detail set. */
int fence_command(json_t *args, char *detail, size_t len);
int fence_unfence_command(json_t *args, char *detail, size_t len);

/* Commands (promote.c): "catch_up" {node, old, timeout_ms, force} and "promote"
 * {node, operation}. 0 (ok) or -1; detail set. */
int promote_catch_up_command(json_t *args, char *detail, size_t len);
int promote_command(json_t *args, char *detail, size_t len);

/* Connect to node name of cfg, database dbname, with the monitoring credentials; NULL with
 * detail set when it cannot. */
PGconn *fence_connect(const config *cfg, const char *name, const char *dbname, char *detail,
                      size_t len);

/* One value of a query (malloc'd text, "" for NULL), or NULL with detail set. */
char *fence_value(PGconn *conn, const char *sql, char *detail, size_t len);

/* A statement whose result does not matter beyond success; false with detail set. */
bool fence_exec(PGconn *conn, const char *sql, char *detail, size_t len);

/* Lift the fence of the node conn is connected to (FENCE_DBNAME, a primary): the databases
 * it closed accept connections again. 1 when it was fenced, 0 when it was not, -1 on
 * failure; detail set. */
int fence_lift(PGconn *conn, const char *name, char *detail, size_t len);

#endif
