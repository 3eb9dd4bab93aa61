/* store_members.c - declared membership in the store: which proxies an operator created, with
 * their options. Loaded with the proxies by store_load (store_fleet.c). */
#include "store_members.h"
#include "log.h"
#include "store.h"
#include "store_internal.h"

#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

int store_member_save(const char *deployment, const char *node_id, json_t *options)
{
    char *text = options ? json_dumps(options, JSON_COMPACT) : strdup("{}");
    if (!text) {
        store_fail("out of memory saving proxy %s", node_id);
        return -1;
    }
    const char *params[] = {deployment, node_id, text};
    int rc = store_command("INSERT INTO pgrelay.members (deployment, node_id, options)"
                           " VALUES ($1, $2, $3::jsonb)"
                           " ON CONFLICT (deployment, node_id) DO UPDATE"
                           "  SET options = EXCLUDED.options",
                           3, params);
    free(text);
    return rc;
}

int store_member_delete(const char *deployment, const char *node_id)
{
    const char *params[] = {deployment, node_id};
    return store_command("WITH m AS (DELETE FROM pgrelay.members"
                         "  WHERE deployment = $1 AND node_id = $2)"
                         " DELETE FROM pgrelay.proxies WHERE deployment = $1 AND node_id = $2",
                         2, params);
}
