/* members.h - declared membership: the operator's create-proxy, delete-proxy, set-proxy-options. */
#ifndef PGRELAY_MEMBERS_H
#define PGRELAY_MEMBERS_H

#include "http.h"
#include "state.h"

#include <stdbool.h>
#include <stddef.h>

/* POST /deployments/NAME/proxies {"node_id", "options"?}: declare a proxy. */
void members_create(http_call *call);

/* DELETE /deployments/NAME/proxies/NODE_ID: it no longer votes nor takes commands. */
void members_delete(http_call *call);

/* POST /deployments/NAME/proxies/NODE_ID/options {"options": {KEY: VALUE}}: set options. */
void members_set_options(http_call *call);

/* The live declared proxies an operator's maintenance on/off addresses: all but the ones with
 * maintenance_exempt, in a malloc'd *out as state_live_proxies. Returns how many, or -1. */
int members_maintenance_targets(state_deployment *dep, state_proxy ***out);

/* A proxy with the option address takes calls only from that address: true when req comes
 * from it or the proxy is not pinned; else false with the peer's address in peer. */
bool members_peer_allowed(const state_proxy *p, struct evhttp_request *req, char *peer,
                          size_t peer_len);

#endif
