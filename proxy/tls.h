/* tls.h - TLS on the proxy's connections to clients and to nodes: the contexts, handshakes,
 * and the conn_read/conn_write calls the relay makes on either side of a session.
 *
 * A side of a session in clear has no SSL and costs one NULL test per call; a side on TLS goes
 * through OpenSSL, and remembers which socket event its last call waited for (a read may need
 * the socket writable, a write readable), so that session_arm waits for the right one.
 */
#ifndef PGRELAY_TLS_H
#define PGRELAY_TLS_H

#include <event2/event.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "config.h"
#include "shm.h"

/* The TLS state of one side of a session. */
typedef struct tls_conn {
    SSL *ssl;          /* NULL: the side is in clear */
    short read_wants;  /* socket event the last SSL_read/handshake waits for; 0 = none */
    short write_wants; /* socket event the last SSL_write waits for; 0 = none */
    bool handshaken;   /* the handshake finished */
} tls_conn;

/* Build the contexts for cfg (client_tls_* keys: toward clients; server_tls_*: toward nodes)
 * from the files' bytes into the process's current ones, replacing them; sessions that run
 * keep the contexts they started with (SSL_CTX is counted). A side with TLS off has none.
 * Returns 0, or -1 with err naming the key, the file and OpenSSL's reason; the current
 * contexts then stay. */
int tls_setup(const config *cfg, const shm_tls_files *files, char *err, size_t err_len);

/* Read the certificate, key and CA files cfg uses (at most SHM_TLS_BYTES together), then
 * tls_setup from their bytes. Returns those bytes (malloc'd: the master hands them to the
 * workers), or NULL with err naming the key, the file and the reason. */
shm_tls_files *tls_load(const config *cfg, char *err, size_t err_len);

/* The current client-side context, or NULL when TLS toward clients is off. */
SSL_CTX *tls_client_ctx(void);

/* The current node-side context, or NULL when no node is spoken to over TLS. */
SSL_CTX *tls_server_ctx(void);

/* Start TLS as the server on fd with the current context. Returns 0, or -1 (out of memory). */
int tls_accept_begin(tls_conn *t, int fd);

/* Start TLS toward a node on fd (mode: SERVER_TLS_*): SNI with host when it is a name, the
 * certificate checked from verify-ca on, its name against host with verify-full. Returns 0,
 * or -1 (out of memory). */
int tls_connect_begin(tls_conn *t, int fd, const char *host, int mode);

/* Drive the handshake: 1 done, 0 wait (t->read_wants says for what), -1 failed (reason in
 * why: OpenSSL's words, or the peer went away). */
int tls_handshake(tls_conn *t, char *why, size_t why_len);

/* Send close_notify once without waiting, free the SSL. */
void tls_close(tls_conn *t);

/* Free the SSL without close_notify: the peer learns of the end from the TCP close alone. */
void tls_close_quietly(tls_conn *t);

/* Look at up to len decrypted bytes without taking them (a later read still gets them): like
 * recv(MSG_PEEK | MSG_DONTWAIT), 0 at the peer's close, -1 with EAGAIN when none is whole. */
ssize_t tls_peek(tls_conn *t, void *buf, size_t len);

/* Send close_notify (the TLS end of input) without waiting; reads go on. */
void tls_shutdown_write(tls_conn *t);

/* TLS half of conn_read/conn_write: like recv/send (-1 with errno EAGAIN when it must wait,
 * t->*_wants naming for what; 0 at the peer's close). */
ssize_t tls_read(tls_conn *t, void *buf, size_t len);
ssize_t tls_write(tls_conn *t, const void *buf, size_t len);

static inline ssize_t conn_read(int fd, tls_conn *t, void *buf, size_t len)
{
    if (!t->ssl)
        return recv(fd, buf, len, 0);
    return tls_read(t, buf, len);
}

static inline ssize_t conn_write(int fd, tls_conn *t, const void *buf, size_t len)
{
    if (!t->ssl)
        return send(fd, buf, len, MSG_NOSIGNAL);
    return tls_write(t, buf, len);
}

/* Socket events to wait for, given the relay's wish (EV_READ to read, EV_WRITE to flush):
 * what OpenSSL's last call on this side asked for instead. */
static inline short tls_events(const tls_conn *t, short wish)
{
    if (!t->ssl)
        return wish;
    short ev = wish & ~(EV_READ | EV_WRITE);
    if (wish & EV_READ)
        ev |= t->read_wants ? t->read_wants : EV_READ;
    if (wish & EV_WRITE)
        ev |= t->write_wants ? t->write_wants : EV_WRITE;
    return ev;
}

/* The reverse: which of the relay's wishes the socket events that fired serve. */
static inline short tls_ready(const tls_conn *t, short what)
{
    if (!t->ssl)
        return what;
    short ev = what & ~(EV_READ | EV_WRITE);
    if (what & (t->read_wants ? t->read_wants : EV_READ))
        ev |= EV_READ;
    if (what & (t->write_wants ? t->write_wants : EV_WRITE))
        ev |= EV_WRITE;
    return ev;
}

/* Decrypted bytes OpenSSL holds that no socket event will announce. */
static inline bool tls_has_pending(const tls_conn *t)
{
    return t->ssl && SSL_pending(t->ssl) > 0;
}

/* "TLSv1.3 TLS_AES_256_GCM_SHA384" of a finished handshake, into buf. */
void tls_describe(const tls_conn *t, char *buf, size_t len);

/* The ALPN protocol PostgreSQL 17 names for direct TLS: true when the handshake agreed on it. */
bool tls_alpn_is_postgresql(const tls_conn *t);

/* The common name of the client's verified certificate into buf; false when there is none. */
bool tls_peer_common_name(const tls_conn *t, char *buf, size_t len);

/* The client's channel (clear, or TLS ending at pgrelay's certificate) is never the node's:
 * SCRAM channel binding (SCRAM-SHA-256-PLUS), which a node on TLS offers, cannot succeed
 * across pgrelay, and a client in clear refuses a server that offers it. In the node's bytes
 * data[0..n), which
 * start at a message boundary, drop every "-PLUS" mechanism from a whole AuthenticationSASL
 * message (shortening it); returns the new length. A message split over two reads is left
 * as it is (the node sends it alone, a few dozen bytes). */
size_t tls_strip_sasl_plus(uint8_t *data, size_t n);

/* Whether kernel TLS took over sending and receiving on this connection. */
void tls_ktls_state(const tls_conn *t, bool *send, bool *recv);

#endif
