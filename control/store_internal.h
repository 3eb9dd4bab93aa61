/* store_internal.h - what the store's files share: bounded calls and result helpers (store.c). */
#ifndef PGRELAY_STORE_INTERNAL_H
#define PGRELAY_STORE_INTERNAL_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>

#define STORE_TIMEOUT_MS 5000 /* connect and each statement */
#define STORE_INT_MAX    24   /* digits of an int64 and a sign */

/* Record why the last call failed (logged as an error the first time). */
void store_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Run a statement (or, with nparams < 0, several statements as one simple query) within
 * timeout_ms. Returns the last result when every result has the status want or
 * PGRES_COMMAND_OK; else NULL, with the error recorded and (on a connection problem) the
 * connection dropped. */
PGresult *store_exec_timeout(int timeout_ms, ExecStatusType want, const char *sql, int nparams,
                             const char *const *params);

/* store_exec_timeout with STORE_TIMEOUT_MS. */
PGresult *store_exec(ExecStatusType want, const char *sql, int nparams, const char *const *params);

/* Run a statement that returns no rows. 0 or -1. */
int store_command(const char *sql, int nparams, const char *const *params);

/* End a failed transaction (nothing to do when the connection is gone). */
void store_rollback(void);

/* 0 when connected, else connect within timeout_ms (none when it is 0 or less). 0 or -1. */
int store_connect_within(int timeout_ms);

/* SQL that is true while this replica holds the lease it acts under (store_lease_set_guard),
 * given the placeholders of the guard's name, identity and term as string literals ("5",
 * "6", "7"); the name is NULL when leases are disabled, which makes it true. The lease row must
 * name this holder and term and not have run out by the store's clock; it is locked FOR SHARE,
 * so that a take-over waits for a write under way to end, and a write that waited for a
 * take-over sees the new holder and changes nothing. */
#define STORE_LEASE_GUARD(name, holder, term) STORE_LEASE_CHECK(name, holder, term, " FOR SHARE")

/* STORE_LEASE_GUARD without the row lock, for the marks of the agents' hot path (a command's
 * delivery, its acknowledgement), which say what a proxy did and are harmless when one lands
 * during a take-over: the lease row is not written for each of them. */
#define STORE_LEASE_GUARD_NOLOCK(name, holder, term) STORE_LEASE_CHECK(name, holder, term, "")

#define STORE_LEASE_CHECK(name, holder, term, lock)                                            \
    " ($" name "::text IS NULL OR EXISTS (SELECT 1 FROM pgrelay.lease l WHERE l.name = $" name \
    "   AND l.holder = $" holder " AND l.lease_transitions = $" term "::int"                   \
    "   AND l.renew_time + make_interval(secs => l.lease_duration_secs) > now()" lock "))"

/* Fill params[0..2] with the guard's name, identity and term (term: the caller's buffer).
 * Returns 3, the number of parameters used. */
int store_guard_params(const char **params, char *term);

/* A PostgreSQL array literal built value by value ({"a","b"}), for a batch statement's
 * parameter (with the values known, the planner sizes the unnest or = ANY right). */
typedef struct store_array {
    char *buf;   /* the literal so far (malloc'd) */
    size_t len;  /* its length */
    size_t cap;  /* the room of buf */
    bool failed; /* out of memory: store_array_end returns NULL */
} store_array;

/* Add one value (quoted and escaped). */
void store_array_add(store_array *a, const char *value);

/* The literal (owned by a: store_array_free), or NULL when out of memory. */
const char *store_array_end(store_array *a);
void store_array_free(store_array *a);

const char *fmt_int(char buf[STORE_INT_MAX], int64_t v);
int64_t get_int(const PGresult *res, int row, int col);
bool get_bool(const PGresult *res, int row, int col);
void get_text(const PGresult *res, int row, int col, char *out, size_t len);

#endif
