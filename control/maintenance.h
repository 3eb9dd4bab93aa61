/* maintenance.h - the operator's maintenance: a fleet-wide pause that always has an end,
 * renewed while maintenance is on (maintenance.c). */
#ifndef PGRELAY_MAINTENANCE_H
#define PGRELAY_MAINTENANCE_H

#include "state.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

/* The operator's maintenance of dep, once the store holds it (store_queue_maintenance): on
 * until until_ms (wall clock; 0: until turned off), or off. 0 or -1 (out of memory). */
int maintenance_wanted(state_deployment *dep, bool on, int64_t until_ms);

/* The operator's maintenance of dep is on (and its end, if any, has not passed). */
bool maintenance_is_on(const state_deployment *dep);

/* Args of the maintenance command that puts a proxy in the state the operator wants now: a
 * pause that ends pause_lease from now (or at the operator's end, if sooner), or off. */
json_t *maintenance_args(const state_deployment *dep);

/* dep's proxies (the live ones, or with all_known every one the state knows), split into
 * those the operator's maintenance holds (held: on and not maintenance_exempt) and the others
 * (rest), two malloc'd lists the caller frees (NULL on failure). Returns how many are held, or
 * -1 when out of memory; *n_rest receives how many others. */
int maintenance_split(state_deployment *dep, bool all_known, state_proxy ***held,
                      state_proxy ***rest, int *n_rest);

/* The end of an orchestration's pause, queued with nobody waiting: the operator's
 * maintenance to the proxies it holds, maintenance off to the others. */
void maintenance_fire_resume(state_deployment *dep, bool all_known);

/* A new lease holder's first act: what the store says (rows from store_maintenance_rows, or NULL
 * when it failed: error, and loaded again at the next renewal), and the renewals started. */
void maintenance_loaded(json_t *rows, const char *error);

/* The state is dropped (lease lost, shutdown): what this replica knew of the maintenance is
 * forgotten; the next activation loads the store again. */
void maintenance_forget(void);

/* Renew the pause of every deployment whose maintenance is on (a new holder's first act,
 * after maintenance_loaded and the operations' recovery; then every third of pause_lease). */
void maintenance_renew_all(void);

#endif
