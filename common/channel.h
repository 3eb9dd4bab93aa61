/* channel.h - fixed-size messages from the master (and later the agent) to a worker over a
 * Unix-domain socketpair: "look again at shared memory" pokes and per-session commands. */
#ifndef PGRELAY_CHANNEL_H
#define PGRELAY_CHANNEL_H

#include <errno.h>
#include <stdint.h>
#include <sys/socket.h>

typedef enum channel_cmd {
    CHANNEL_LOOK_AGAIN = 1, /* settings, maintenance or routes changed: re-read shared memory */
    CHANNEL_KILL_SESSION,   /* close the session whose id is arg */
    CHANNEL_PROBE_NOW,      /* worker -> master -> agent: the leader could not be reached */
    CHANNEL_SET_LEADER,     /* master -> agent: arg = node index | (force << 32) */
    CHANNEL_MAINTENANCE,    /* agent -> master: arg = on (bit 0) | timeout in ms << 1 */
    CHANNEL_RELOAD,         /* agent -> master: re-read the configuration file */
    CHANNEL_READ_ONLY,      /* agent -> master: arg = 1 when the control plane made this proxy
                             * read-only (set-proxy-options read_only), 0 when not */
} channel_cmd;

typedef struct channel_msg {
    uint32_t cmd;  /* channel_cmd */
    uint32_t pad;
    uint64_t arg;  /* command argument (session id) */
} channel_msg;

/* Send without blocking. A full channel already holds a poke, so LOOK_AGAIN may be dropped;
 * returns 0 on success, -1 otherwise. */
static inline int channel_send(int fd, uint32_t cmd, uint64_t arg)
{
    channel_msg m = {.cmd = cmd, .arg = arg};
    ssize_t n = send(fd, &m, sizeof(m), MSG_DONTWAIT | MSG_NOSIGNAL);
    return n == (ssize_t)sizeof(m) ? 0 : -1;
}

#endif
