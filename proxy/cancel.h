/* cancel.h - cancel keys: the ones pgrelay hands out, and forwarding CancelRequests to nodes. */
#ifndef PGRELAY_CANCEL_H
#define PGRELAY_CANCEL_H

#include <stdint.h>

#include "shm.h"

struct worker;

/* Choose the cancel key for a new session in slot index idx (secret and pid tag from
 * getrandom(2)) and record it in the slot. Returns 0, or -1 (logged) when the kernel gave no
 * random bytes. */
int cancel_key_issue(shm_session *slot, uint32_t idx, uint8_t key_out[8]);

/* A CancelRequest arrived from client_addr on client_fd: find the session with that key (in
 * any worker) and send the node's own CancelRequest to the node. Unknown keys are logged and
 * dropped. A forwarded request keeps the client's connection open (a dup of client_fd) until
 * the node has closed its own, as the client would see it talking to the server directly. */
void cancel_handle_request(struct worker *w, uint32_t pid, uint32_t secret,
                           const char *client_addr, int client_fd);

/* Send the node at addr a CancelRequest for its backend (pid, secret), without waiting;
 * reply_fd (or -1) is duplicated and closed once the node has closed the cancel connection. */
void cancel_send(struct worker *w, const struct sockaddr_storage *addr, socklen_t addrlen,
                 const char *node_name, uint32_t backend_pid, uint32_t backend_secret,
                 int reply_fd);

#endif
