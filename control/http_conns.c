/* http_conns.c - the HTTP server's connections: the listening socket and its backlog, the cap on
 * open connections, the idle timeout, and accept errors at the descriptor limit.
 *
 * evhttp (libevent 2.1) neither counts its connections nor hands them out, so each one is
 * followed from the bufferevent evhttp asks for (http_conns_track) to evhttp's close callback:
 * the bufferevent's callback argument, right after the accept, is its evhttp_connection. The
 * connections form a list, least recently active first. A connection is idle while none of its
 * requests waits for an answer: idle ones are closed after idle_timeout, and when a new
 * connection goes over max_connections the least recently active idle one makes room, so that a
 * flood of idle sockets costs the oldest of them, never /healthz or the API.
 *
 * At the descriptor limit accept() fails with EMFILE while the connection stays queued: the
 * listener would be woken again at once, for ever. It is paused instead (HTTP_CONNS_PAUSE_MS),
 * idle connections make room, and the condition is logged once per HTTP_CONNS_LOG_MS.
 */
#include "http_conns.h"
#include "control.h"
#include "log.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <event2/util.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>

#define HTTP_CONNS_BACKLOG  4096  /* listen backlog (the kernel caps it to net.core.somaxconn) */
#define HTTP_CONNS_RESERVE  64    /* descriptors kept for the store, logs and the listener */
#define HTTP_CONNS_MIN      16    /* the automatic cap is never below this */
#define HTTP_CONNS_PAUSE_MS 100   /* the listener rests this long after an accept error */
#define HTTP_CONNS_LOG_MS   10000 /* accept errors and evictions are logged this often at most */
#define HTTP_CONNS_SWEEP_MS 1000  /* idle connections are looked for this often */
#define MS_PER_S            1000
#define US_PER_MS           1000

/* One accepted connection. */
typedef struct http_conn {
    struct http_conn *prev, *next;   /* the list: least recently active first */
    struct http_conn *adopt_next;    /* on the list of connections not adopted yet */
    struct bufferevent *bev;         /* its bufferevent (a reference is held until adopted) */
    struct evhttp_connection *evcon; /* evhttp's connection; NULL until adopted */
    evutil_socket_t fd;              /* its socket, once adopted; -1 before */
    int pending;                     /* requests read and not answered yet */
    int64_t active_ms;               /* monotonic time of the last request or answer */
} http_conn;

static struct {
    http_conn *head, *tail; /* every open connection */
    http_conn *adopt;       /* accepted in this loop iteration, adopted by adopt_ev */
    http_conn **by_fd;      /* adopted connections by socket (requests find theirs) */
    int by_fd_len;
    int n;                      /* open connections */
    int limit;                  /* the cap in force */
    struct event *adopt_ev;     /* adopts the new connections, then applies the cap */
    struct event *sweep_ev;     /* closes idle connections */
    struct event *resume_ev;    /* re-enables the listener after an accept error */
    struct evconnlistener *lev; /* the listening socket (owned by evhttp's bound socket) */
    int64_t accept_logged_ms;   /* the last accept-error line */
    int64_t accept_errors;      /* accept errors since that line */
    int64_t evict_logged_ms;    /* the last eviction line */
    int64_t evictions;          /* evictions since that line */
} conns;

static void http_conns_unlink(http_conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        conns.head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        conns.tail = c->prev;
    c->prev = c->next = NULL;
}

static void http_conns_append(http_conn *c)
{
    c->prev = conns.tail;
    c->next = NULL;
    if (conns.tail)
        conns.tail->next = c;
    else
        conns.head = c;
    conns.tail = c;
}

/* Forget a connection (it is closed, or closing). */
static void http_conns_forget(http_conn *c)
{
    http_conns_unlink(c);
    if (c->fd >= 0 && c->fd < conns.by_fd_len && conns.by_fd[c->fd] == c)
        conns.by_fd[c->fd] = NULL;
    conns.n--;
    free(c);
}

/* evhttp closes a connection. */
static void http_conns_closed(struct evhttp_connection *evcon, void *arg)
{
    (void)evcon;
    http_conns_forget(arg);
}

/* The connection a request came on, or NULL. */
static http_conn *http_conns_of(struct evhttp_request *req)
{
    struct evhttp_connection *evcon = evhttp_request_get_connection(req);
    struct bufferevent *bev = evcon ? evhttp_connection_get_bufferevent(evcon) : NULL;
    evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
    if (fd < 0 || fd >= conns.by_fd_len)
        return NULL;
    http_conn *c = conns.by_fd[fd];
    return c && c->evcon == evcon ? c : NULL;
}

/* Idle: adopted, no request waiting for an answer, no answer still being written. */
static bool http_conns_idle(const http_conn *c)
{
    return c->evcon && c->pending == 0 && evbuffer_get_length(bufferevent_get_output(c->bev)) == 0;
}

/* Close the least recently active idle connection. false when every one is busy. */
static bool http_conns_evict_one(void)
{
    for (http_conn *c = conns.head; c; c = c->next) {
        if (!http_conns_idle(c))
            continue;
        int64_t now = control_mono_ms();
        conns.evictions++;
        if (now - conns.evict_logged_ms >= HTTP_CONNS_LOG_MS) {
            log_warning("HTTP: %d connections open (max_connections %d): closing the least "
                        "recently active idle ones (%lld since the last such line)",
                        conns.n, conns.limit, (long long)conns.evictions);
            conns.evict_logged_ms = now;
            conns.evictions = 0;
        }
        evhttp_connection_free(c->evcon); /* calls http_conns_closed */
        return true;
    }
    return false;
}

/* The new connections get their evhttp_connection; then the cap is applied. */
static void http_conns_adopt(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    while (conns.adopt) {
        http_conn *c = conns.adopt;
        conns.adopt = c->adopt_next;
        bufferevent_event_cb errorcb = NULL;
        void *cbarg = NULL;
        bufferevent_getcb(c->bev, NULL, NULL, &errorcb, &cbarg);
        struct bufferevent *bev = c->bev;
        if (!errorcb || !cbarg) {
            /* evhttp gave it up already (its callbacks are gone): our reference frees it */
            http_conns_forget(c);
            bufferevent_decref(bev);
            continue;
        }
        c->evcon = cbarg;
        c->fd = bufferevent_getfd(bev);
        if (c->fd >= 0 && c->fd < conns.by_fd_len)
            conns.by_fd[c->fd] = c;
        evhttp_connection_set_closecb(c->evcon, http_conns_closed, c);
        bufferevent_decref(bev);
    }
    while (conns.n > conns.limit && http_conns_evict_one())
        ;
}

struct bufferevent *http_conns_track(struct bufferevent *bev)
{
    http_conn *c = bev ? calloc(1, sizeof(*c)) : NULL;
    if (!c)
        return bev; /* untracked: counted by nobody, closed by evhttp's timeout */
    c->bev = bev;
    c->fd = -1;
    c->active_ms = control_mono_ms();
    bufferevent_incref(bev);
    http_conns_append(c);
    conns.n++;
    c->adopt_next = conns.adopt;
    conns.adopt = c;
    event_active(conns.adopt_ev, EV_TIMEOUT, 0);
    return bev;
}

void http_conns_request(struct evhttp_request *req)
{
    http_conn *c = http_conns_of(req);
    if (!c)
        return;
    c->pending++;
    c->active_ms = control_mono_ms();
    http_conns_unlink(c);
    http_conns_append(c);
}

void http_conns_answered(struct evhttp_request *req)
{
    http_conn *c = http_conns_of(req);
    if (!c)
        return;
    if (c->pending > 0)
        c->pending--;
    c->active_ms = control_mono_ms();
    http_conns_unlink(c);
    http_conns_append(c);
}

/* Close the connections idle for longer than idle_timeout. */
static void http_conns_sweep(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    int64_t cutoff = control_mono_ms() - control.cfg->idle_timeout_ms;
    http_conn *next;
    for (http_conn *c = conns.head; c && c->active_ms < cutoff; c = next) {
        next = c->next; /* c may be freed */
        if (http_conns_idle(c)) {
            log_debug("HTTP: closing a connection idle for more than %lld ms",
                      (long long)control.cfg->idle_timeout_ms);
            evhttp_connection_free(c->evcon);
        }
    }
}

static void http_conns_resume(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (conns.lev)
        evconnlistener_enable(conns.lev);
}

/* accept() failed with something else than "try again": out of descriptors or memory. */
static void http_conns_accept_error(struct evconnlistener *lev, void *arg)
{
    (void)arg;
    int err = EVUTIL_SOCKET_ERROR();
    int64_t now = control_mono_ms();
    struct timeval tv = {.tv_sec = 0, .tv_usec = HTTP_CONNS_PAUSE_MS * US_PER_MS};
    conns.accept_errors++;
    if (now - conns.accept_logged_ms >= HTTP_CONNS_LOG_MS) {
        log_error("HTTP: cannot accept connections: %s (%d connections open, max_connections "
                  "%d; %lld accept errors since the last such line); pausing the listener %d ms",
                  evutil_socket_error_to_string(err), conns.n, conns.limit,
                  (long long)conns.accept_errors, HTTP_CONNS_PAUSE_MS);
        conns.accept_logged_ms = now;
        conns.accept_errors = 0;
    }
    /* no spin: the queued connection would wake the listener again at once */
    evconnlistener_disable(lev);
    http_conns_evict_one();
    if (event_add(conns.resume_ev, &tv) != 0)
        evconnlistener_enable(lev);
}

/* The cap in force: max_connections, or the open-files limit less a reserve. */
static int http_conns_limit(void)
{
    struct rlimit rl;
    int fds = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < INT32_MAX ? (int)rl.rlim_cur
                                                                            : INT32_MAX;
    int automatic =
        fds > HTTP_CONNS_RESERVE + HTTP_CONNS_MIN ? fds - HTTP_CONNS_RESERVE : HTTP_CONNS_MIN;
    int cap = control.cfg->max_connections > 0 ? control.cfg->max_connections : automatic;
    return cap < automatic ? cap : automatic;
}

void http_conns_apply_config(void)
{
    conns.limit = http_conns_limit();
}

struct evhttp_bound_socket *http_conns_listen(struct evhttp *http, const char *addr, int port,
                                              char *err, size_t err_len)
{
    struct evutil_addrinfo hints, *ai = NULL;
    struct rlimit rl;
    struct timeval tv = {.tv_sec = HTTP_CONNS_SWEEP_MS / MS_PER_S,
                         .tv_usec = (HTTP_CONNS_SWEEP_MS % MS_PER_S) * US_PER_MS};
    char service[16];

    conns.limit = http_conns_limit();
    conns.by_fd_len =
        getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (1u << 24) ? (int)rl.rlim_cur : 1 << 24;
    conns.by_fd = calloc((size_t)conns.by_fd_len, sizeof(*conns.by_fd));
    conns.adopt_ev = event_new(control.base, -1, 0, http_conns_adopt, NULL);
    conns.sweep_ev = event_new(control.base, -1, EV_PERSIST, http_conns_sweep, NULL);
    conns.resume_ev = evtimer_new(control.base, http_conns_resume, NULL);
    if (!conns.by_fd || !conns.adopt_ev || !conns.sweep_ev || !conns.resume_ev ||
        event_add(conns.sweep_ev, &tv) != 0) {
        snprintf(err, err_len, "cannot listen on %s:%d: out of memory", addr, port);
        goto failed;
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = EVUTIL_AI_PASSIVE | EVUTIL_AI_ADDRCONFIG;
    snprintf(service, sizeof(service), "%d", port);
    int gai = evutil_getaddrinfo(addr, service, &hints, &ai);
    if (gai != 0 || !ai) {
        snprintf(err, err_len, "cannot listen on %s:%d: %s", addr, port,
                 gai ? evutil_gai_strerror(gai) : "address not usable");
        goto failed;
    }
    errno = 0;
    conns.lev = evconnlistener_new_bind(control.base, NULL, NULL,
                                        LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_EXEC |
                                            LEV_OPT_CLOSE_ON_FREE | LEV_OPT_DISABLED,
                                        HTTP_CONNS_BACKLOG, ai->ai_addr, (int)ai->ai_addrlen);
    evutil_freeaddrinfo(ai);
    if (!conns.lev) {
        snprintf(err, err_len, "cannot listen on %s:%d: %s", addr, port,
                 errno ? strerror(errno) : "address not usable");
        goto failed;
    }
    struct evhttp_bound_socket *bound = evhttp_bind_listener(http, conns.lev);
    if (!bound) {
        evconnlistener_free(conns.lev);
        conns.lev = NULL;
        snprintf(err, err_len, "cannot listen on %s:%d: out of memory", addr, port);
        goto failed;
    }
    evconnlistener_set_error_cb(conns.lev, http_conns_accept_error);
    evconnlistener_enable(conns.lev);
    return bound;

failed:
    http_conns_stop();
    return NULL;
}

void http_conns_stop(void)
{
    /* evhttp_free closes the connections (http_conns_closed forgets each) and the listener */
    if (conns.adopt_ev)
        event_free(conns.adopt_ev);
    if (conns.sweep_ev)
        event_free(conns.sweep_ev);
    if (conns.resume_ev)
        event_free(conns.resume_ev);
    conns.adopt_ev = conns.sweep_ev = conns.resume_ev = NULL;
    while (conns.adopt) { /* accepted just now, never adopted */
        http_conn *c = conns.adopt;
        conns.adopt = c->adopt_next;
        struct bufferevent *bev = c->bev;
        http_conns_forget(c);
        bufferevent_decref(bev);
    }
    conns.lev = NULL;
}

void http_conns_release(void)
{
    while (conns.head) /* whatever evhttp did not report closed */
        http_conns_forget(conns.head);
    free(conns.by_fd);
    conns.by_fd = NULL;
    conns.by_fd_len = 0;
}

int http_conns_open(void)
{
    return conns.n;
}
