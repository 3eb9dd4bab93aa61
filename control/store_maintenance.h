/* store_maintenance.h - the store's side of the operator's maintenance (store_maintenance.c). */
#ifndef PGRELAY_STORE_MAINTENANCE_H
#define PGRELAY_STORE_MAINTENANCE_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

/* Record that the operator wants deployment's maintenance on (until_ms: wall-clock end the
 * operator gave, 0 for none) or off. Conditional on the lease guard. 0 or -1. */
int store_maintenance_save(const char *deployment, bool on, int64_t until_ms);

/* Call fn for each deployment whose maintenance is on, with its until_ms. 0 or -1. */
int store_maintenance_load(void (*fn)(const char *deployment, int64_t until_ms, void *arg),
                           void *arg);

/* The same as [{"deployment", "until_ms"}] (any thread), or NULL (store_error says why). */
json_t *store_maintenance_rows(void);

#endif
