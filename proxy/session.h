/* session.h - one client session inside a worker: its phases, sockets, buffers and protocol state. */
#ifndef PGRELAY_SESSION_H
#define PGRELAY_SESSION_H

#include <event2/event.h>
#include <event2/event_struct.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>

#include "pgproto.h"
#include "plan_ring.h"
#include "shm.h"
#include "tls.h"

/* A long transfer (COPY, a large result) adds its bytes to the node's counters at least every
 * this many bytes, not only when its statement ends. */
#define RELAY_NODE_FLUSH_BYTES (256 * 1024)

typedef enum session_phase {
    PHASE_STARTUP = 0, /* reading the client's startup packet (SSL/GSS negotiation included) */
    PHASE_CONNECTING,  /* non-blocking connect to the node in progress */
    PHASE_HELD,        /* startup done, held by maintenance mode until resume */
    PHASE_RELAY,       /* relaying both ways; authentication passes through here */
} session_phase;

/* Bytes read from one side that the other side has not taken yet. While a direction has
 * pending bytes, pgrelay does not read from its source: that is the backpressure. */
typedef struct relay_pending {
    uint8_t *buf;     /* malloc'd when needed, freed when drained */
    size_t off;       /* first unsent byte */
    size_t len;       /* end of data */
} relay_pending;

/* Where the connection to the node stands while PHASE_CONNECTING. */
typedef enum session_server_step {
    SERVER_STEP_CONNECT = 0, /* TCP connect under way */
    SERVER_STEP_ASKED,       /* SSLRequest sent; the node's S or N not read yet */
    SERVER_STEP_HANDSHAKE,   /* TLS handshake with the node under way */
} session_server_step;

typedef struct session {
    struct session *prev, *next; /* the worker's list of sessions */
    shm_session *slot;           /* this session's row in shared memory */
    session_phase phase;
    int cfd;                     /* client socket */
    int sfd;                     /* server socket, -1 before connecting */
    tls_conn client_tls;         /* TLS with the client (ssl NULL: in clear) */
    bool direct_tls;             /* the client began with a TLS ClientHello (no SSLRequest) */
    tls_conn server_tls;         /* TLS with the node (ssl NULL: in clear) */
    int server_tls_mode;         /* SERVER_TLS_* toward the node of this connection */
    session_server_step server_step; /* while PHASE_CONNECTING */
    struct event ev_client;      /* read/write interest on cfd, recomputed by session_arm() */
    struct event ev_server;      /* read/write interest on sfd */
    struct event ev_timer;       /* startup, login, connect, leader-wait, leader-change and
                                  * shutdown deadlines, all on worker_clock_us() */
    short client_mask;           /* events currently registered on cfd */
    short server_mask;           /* events currently registered on sfd */
    bool timer_armed;

    /* Startup phase: the startup packet being assembled, then bytes that followed it. */
    uint8_t *startup;            /* PG_STARTUP_MAX_LEN bytes while PHASE_STARTUP/CONNECTING */
    uint32_t startup_have;
    uint32_t startup_len;        /* length of the completed StartupMessage */
    const char *reject_sqlstate; /* set when the session is admitted only to be refused */
    const char *reject_message;

    relay_pending to_server;     /* client -> server bytes not yet written */
    relay_pending to_client;     /* server -> client bytes not yet written */
    pg_scan client_scan;         /* framing of client -> server messages */
    pg_scan server_scan;         /* framing of server -> client messages */
    bool client_at_boundary;     /* the node's bytes relayed to the client (sent or queued) end
                                  * where a message ends: pgrelay's own error may follow */
    uint8_t server_capture[16];  /* captured body of ReadyForQuery / BackendKeyData */
    uint8_t client_key[8];       /* the cancel key (pid, secret) pgrelay gave the client */

    /* Deadlines below are on worker_clock_us() (CLOCK_MONOTONIC); 0 = none. */
    int64_t login_deadline_us;   /* 0 once ReadyForQuery arrived the first time */
    int64_t startup_deadline_us; /* the StartupMessage must be complete by then; 0 after */
    int64_t connect_deadline_us; /* while PHASE_CONNECTING */
    uint32_t pending_syncs;      /* Query/Sync/FunctionCall sent, ReadyForQuery not yet back */
    bool ext_open;               /* extended-protocol messages sent since the last Sync */
    /* COPY FROM STDIN started by Execute: the server ignores the Syncs that reach it in
     * copy-in mode (libpq sends one after Execute, another after CopyDone), so they get no
     * ReadyForQuery and must not be counted in pending_syncs. */
    uint32_t syncs_since_execute; /* client Syncs since its last Execute or Query */
    bool copy_in;                /* the server sent CopyInResponse; the client's CopyDone or
                                  * CopyFail has not passed yet */
    bool copy_end_early;         /* the client ended a copy before CopyInResponse passed
                                  * (it pipelined blindly): settled when one arrives */
    uint32_t copy_end_syncs;     /* syncs_since_execute at that early CopyDone/CopyFail */
    bool logged_in;              /* the first ReadyForQuery has passed */
    bool server_gone;            /* the node closed or broke the connection */
    bool client_eof;             /* the client closed its sending side with work in flight:
                                  * the node gets EOF after what the client sent, and its
                                  * answers still go to the client, as with a direct
                                  * connection; the session ends when the node closes */
    bool server_shut;            /* shutdown(SHUT_WR) done toward the node */
    bool client_reset;           /* the client reset the connection: it reads no more */
    uint32_t server_key_len;     /* body length of a BackendKeyData pgrelay cannot swap (not
                                  * protocol 3.0's 8 bytes); 0 when none came */
    bool client_hup_seen;        /* held, the client closed its side after sending more:
                                  * no longer watched, what it sent runs after the hold */
    char tx_status;              /* last ReadyForQuery status: I, T or E */
    bool close_at_safe_point;    /* close as soon as the session is idle outside a transaction */
    const char *close_sqlstate;  /* what to tell the client then */
    char *close_message;         /* malloc'd copy */
    int64_t close_deadline_us;   /* close even inside a transaction at this time; 0 = never */
    bool read_port;              /* came in on the read-only port */
    bool waiting_leader;         /* PHASE_HELD because there is no write leader yet */
    int64_t leader_wait_until_us;    /* no_leader_wait runs out (worker_clock_us); 0 = not
                                        held yet */
    int64_t leader_poke_us;          /* held for a leader: ask the agent to probe again */
    shm_node_count *counter;     /* per-node session counter this session incremented */
    /* Traffic not yet added to the worker's row of that node (relay_node_flush): one flush
     * per statement. */
    uint64_t node_statements;
    uint64_t node_bytes_in;
    uint64_t node_bytes_out;

    plan_capture plan;           /* what a plan request needs of the current statement */
    char client_addr[SHM_ADDR_MAX];
} session;

/* Accept handling: a new client socket, from the write or the read-only port. */
void session_new(int fd, const struct sockaddr_storage *addr, socklen_t addrlen, bool read_port);

/* End a session now. If sqlstate is set, a FATAL ErrorResponse is sent to the client first. */
void session_close(session *s, const char *sqlstate, const char *message);

/* Close now if idle outside a transaction, else once it gets there (graceful shutdown). */
void session_close_when_safe(session *s, const char *sqlstate, const char *message);

/* The same, but close anyway after grace_ms (leader change: leader_change_grace). */
void session_close_when_safe_for(session *s, const char *sqlstate, const char *message,
                                 int grace_ms);

/* A session still connecting to a node that is no longer right: connect again, afresh. */
void session_reroute(session *s);

/* True when the session is between statements outside a transaction: nothing in flight. */
bool session_at_safe_point(const session *s);

/* Recompute which events the session waits for and register them (cheap when unchanged).
 * In maintenance mode a session at its safe point is not read from: its next statement waits. */
void session_arm(session *s);

/* Maintenance ended: a held new session goes on to connect. */
void session_release_held(session *s);

/* Relay callbacks (relay.c). */
void relay_on_client(evutil_socket_t fd, short what, void *arg);
void relay_on_server(evutil_socket_t fd, short what, void *arg);
void relay_init_scanners(session *s);
/* Write what is pending toward fd; returns 0, or -1 on a hard error (session must close). */
int relay_flush(session *s, relay_pending *p, int fd);
/* Add the traffic the session gathered to its node's shared counters (then zero it). */
void relay_node_flush(session *s);

#endif
