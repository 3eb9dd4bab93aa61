/* cancel.c - cancel keys: the ones pgrelay hands out, and forwarding CancelRequests to nodes.
 *
 * A client never sees a node's own BackendKeyData: the relay swaps it for a key whose pid
 * encodes the session's slot in shared memory and whose secret is random. A CancelRequest can
 * then reach any worker, which finds the slot, checks the secret, and sends the node its own
 * key. Keys are unique across nodes, so two nodes' pids never collide.
 */
#include "cancel.h"
#include "log.h"
#include "net.h"
#include "worker.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#define CANCEL_SLOT_BITS 20                        /* low bits of the pid: slot index + 1 */
#define CANCEL_SLOT_MASK ((1u << CANCEL_SLOT_BITS) - 1)
#define CANCEL_TAG_MASK  0x3ffu                    /* 10 random bits above, pid stays > 0 */

/* A CancelRequest on its way to a node. */
typedef struct cancel_req {
    struct event ev;
    uint8_t packet[PG_CANCEL_REQUEST_LEN];
    int fd;
    int reply_fd;       /* the asking client's socket (a dup), closed when the node is done */
    struct timeval tv;  /* server_connect_timeout: for the connect, then for the node's close */
} cancel_req;

int cancel_key_issue(shm_session *slot, uint32_t idx, uint8_t key_out[8])
{
    /* Every key straight from the kernel's random source: no state in pgrelay from which a
     * user who collects keys could work out another session's secret. */
    uint8_t rnd[8];
    ssize_t n;
    do
        n = getrandom(rnd, sizeof(rnd), 0);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof(rnd)) {
        log_error("cannot make a cancel key: getrandom: %s",
                  n < 0 ? strerror(errno) : "short read");
        return -1;
    }
    uint32_t pid = ((pg_get_u32(rnd) & CANCEL_TAG_MASK) << CANCEL_SLOT_BITS) | (idx + 1);
    uint32_t secret = pg_get_u32(rnd + 4);
    shm_session_write_begin(slot);
    slot->cancel_pid = pid;
    slot->cancel_secret = secret;
    shm_session_write_end(slot);
    pg_put_u32(key_out, pid);
    pg_put_u32(key_out + 4, secret);
    return 0;
}

static void cancel_req_free(cancel_req *r)
{
    event_del(&r->ev);
    close(r->fd);
    if (r->reply_fd >= 0)
        close(r->reply_fd);
    free(r);
}

/* The node closed the cancel connection (PostgreSQL does once it has signalled the backend),
 * or did not within the timeout: now the asking client may see its connection close, as it
 * would have from the server itself, so its next statement cannot overtake the cancel. */
static void cancel_on_done(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    cancel_req_free(arg);
}

/* Writable (connected) or timed out: send the packet once, then wait for the node's close. */
static void cancel_on_ready(evutil_socket_t fd, short what, void *arg)
{
    cancel_req *r = arg;
    if (what & EV_TIMEOUT) {
        log_warning("cancel request: connecting to the node timed out");
        cancel_req_free(r);
        return;
    }
    ssize_t n = send(fd, r->packet, sizeof(r->packet), MSG_NOSIGNAL);
    if (n != (ssize_t)sizeof(r->packet)) {
        log_warning("cancel request: sending to the node failed: %s",
                    n < 0 ? strerror(errno) : "short write");
        cancel_req_free(r);
        return;
    }
    struct event_base *base = event_get_base(&r->ev);
    event_assign(&r->ev, base, fd, EV_READ, cancel_on_done, r);
    event_add(&r->ev, &r->tv);
}

void cancel_send(worker *w, const struct sockaddr_storage *addr, socklen_t addrlen,
                 const char *node_name, uint32_t backend_pid, uint32_t backend_secret,
                 int reply_fd)
{
    cancel_req *r = calloc(1, sizeof(*r));
    if (!r)
        return;
    r->reply_fd = reply_fd >= 0 ? fcntl(reply_fd, F_DUPFD_CLOEXEC, 0) : -1;
    pg_put_u32(r->packet, PG_CANCEL_REQUEST_LEN);
    pg_put_u32(r->packet + 4, PG_CANCEL_REQUEST_CODE);
    pg_put_u32(r->packet + 8, backend_pid);
    pg_put_u32(r->packet + 12, backend_secret);
    int err = 0;
    r->fd = net_connect_nonblock(addr, addrlen, false, &err);
    if (r->fd < 0) {
        log_warning("cancel request: cannot connect to node %s: %s", node_name, strerror(err));
        if (r->reply_fd >= 0)
            close(r->reply_fd);
        free(r);
        return;
    }
    r->tv.tv_sec = w->cfg->server_connect_timeout_ms / 1000;
    r->tv.tv_usec = (w->cfg->server_connect_timeout_ms % 1000) * 1000;
    event_assign(&r->ev, w->base, r->fd, EV_WRITE, cancel_on_ready, r);
    event_add(&r->ev, &r->tv);
    shm_stat_add(&w->row->stats.cancels, 1);
}

void cancel_handle_request(worker *w, uint32_t pid, uint32_t secret, const char *client_addr,
                           int client_fd)
{
    uint32_t idx = (pid & CANCEL_SLOT_MASK);
    shm_session snap;

    if (idx == 0 || idx > w->shm->max_sessions) {
        log_warning("client %s: cancel request with an unknown key; ignored", client_addr);
        return;
    }
    shm_session *slot = &w->shm->sessions[idx - 1];
    if (!shm_session_snapshot(slot, &snap) || snap.cancel_pid != pid) {
        log_warning("client %s: cancel request for a session that does not exist; ignored",
                    client_addr);
        return;
    }
    if (snap.cancel_secret != secret) {
        log_warning("client %s: cancel request with a wrong secret for session %llu; ignored",
                    client_addr, (unsigned long long)snap.id);
        return;
    }
    if (!atomic_load(&snap.backend_valid) || snap.node_addrlen == 0) {
        log_info("client %s: cancel request for session %llu before it reached a node; ignored",
                 client_addr, (unsigned long long)snap.id);
        return;
    }
    log_debug("client %s: forwarding cancel of session %llu to node %s", client_addr,
              (unsigned long long)snap.id, snap.node_name);
    cancel_send(w, &snap.node_addr, snap.node_addrlen, snap.node_name, snap.backend_pid,
                snap.backend_secret, client_fd);
}
