/* httpd.c - the master's HTTP endpoint: health checks for load balancers, Prometheus metrics.
 *
 * Off unless http_listen_port is set. It runs in the master's event loop, never in a worker's
 * data path, and answers from shared memory only. Each connection carries one request (HTTP/1.0
 * or 1.1, answered with "Connection: close"): a request line and headers of at most
 * HTTPD_HEAD_MAX bytes within HTTPD_TIMEOUT_S, no body. At most HTTPD_CONN_MAX connections are
 * open at once; past that a new one is closed at accept. (libevent 2.1's evhttp cannot cap its
 * connections, so the little HTTP this needs is parsed here.)
 */
#include "httpd.h"
#include "log.h"
#include "health.h"
#include "prom.h"
#include "net.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define HTTPD_HEAD_MAX  8192 /* request line and headers */
#define HTTPD_TIMEOUT_S 5    /* a request must arrive within this */
#define HTTPD_CONN_MAX  64   /* connections open at once */
#define HTTPD_PATH_MAX  256

typedef struct httpd_conn {
    struct bufferevent *bev;
    struct httpd_conn *prev, *next;
    bool answered; /* the answer is queued */
    bool draining; /* answered and flushed: reading what the client still sends until EOF */
} httpd_conn;

static struct {
    master *m;
    int fd;
    struct event ev_accept;
    httpd_conn *conns;
    int n_conns;
    uint64_t refused; /* connections closed at accept because HTTPD_CONN_MAX were open */
} httpd = {.fd = -1};

/* ---- answers ---- */

static const char *httpd_status_text(int code)
{
    switch (code) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 431: return "Request Header Fields Too Large";
    case 503: return "Service Unavailable";
    default: return "Error";
    }
}

static void httpd_conn_free(httpd_conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        httpd.conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    bufferevent_free(c->bev);
    httpd.n_conns--;
    free(c);
}

/* Queue the whole answer; the connection closes once it is written. */
static void httpd_answer(httpd_conn *c, int code, const char *content_type, const char *body,
                         size_t len, bool head_only)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    evbuffer_add_printf(out,
                        "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                        "Cache-Control: no-store\r\nConnection: close\r\n%s\r\n",
                        code, httpd_status_text(code), content_type, len,
                        code == 401 ? "WWW-Authenticate: Bearer realm=\"pgrelay\"\r\n"
                        : code == 405 ? "Allow: GET, HEAD\r\n"
                                      : "");
    if (!head_only)
        evbuffer_add(out, body, len);
    c->answered = true;
    bufferevent_enable(c->bev, EV_WRITE);
}

static void httpd_answer_json(httpd_conn *c, int code, const char *body, bool head_only)
{
    char line[HTTPD_HEAD_MAX];
    int n = snprintf(line, sizeof(line), "%s\n", body);
    httpd_answer(c, code, "application/json", line, (size_t)n < sizeof(line) ? (size_t)n : 0,
                 head_only);
}

static void httpd_answer_error(httpd_conn *c, int code, const char *why)
{
    char body[256];
    snprintf(body, sizeof(body), "{\"error\": \"%s\"}", why);
    httpd_answer_json(c, code, body, false);
}

/* ---- routing ---- */

/* Value of NAME in a query string "a=1&b=2" as a non-negative integer: 1 when found and valid,
 * 0 when absent, -1 when present but not a number. */
static int query_int(const char *query, const char *name, int64_t *out)
{
    size_t nlen = strlen(name);
    for (const char *p = query; p && *p; p = strchr(p, '&') ? strchr(p, '&') + 1 : NULL) {
        if (strncmp(p, name, nlen) != 0 || p[nlen] != '=')
            continue;
        const char *v = p + nlen + 1;
        char *end;
        errno = 0;
        long long n = strtoll(v, &end, 10);
        if (end == v || (*end && *end != '&') || errno || n < 0)
            return -1;
        *out = n;
        return 1;
    }
    return 0;
}

static bool httpd_authorized(const char *authorization)
{
    const char *token = httpd.m->cfg->http_token;
    if (!token[0])
        return true;
    if (!authorization || strncasecmp(authorization, "Bearer ", 7) != 0)
        return false;
    const char *given = authorization + 7;
    size_t a = strlen(given), b = strlen(token);
    unsigned diff = (unsigned)(a ^ b);
    for (size_t i = 0; i < a && i < b; i++) /* the same time for every wrong token of a length */
        diff |= (unsigned)(given[i] ^ token[i]);
    return diff == 0;
}

static void httpd_route(httpd_conn *c, const char *method, char *target, const char *authorization)
{
    bool head = strcmp(method, "HEAD") == 0;
    if (!head && strcmp(method, "GET") != 0) {
        httpd_answer_error(c, 405, "only GET and HEAD are served");
        return;
    }
    char *query = strchr(target, '?');
    if (query)
        *query++ = '\0';
    char reason[HEALTH_JSON_MAX];

    if (strcmp(target, "/health/is-live") == 0 || strcmp(target, "/health/is-ready") == 0 ||
        strcmp(target, "/health/is-read-ready") == 0) {
        int ok;
        if (strcmp(target, "/health/is-live") == 0) {
            ok = health_is_live(httpd.m, reason, sizeof(reason));
        } else if (strcmp(target, "/health/is-ready") == 0) {
            ok = health_is_ready(httpd.m, reason, sizeof(reason));
        } else {
            int64_t lag_bytes = -1, lag_ms = -1;
            if (query_int(query, "lag", &lag_bytes) < 0 || query_int(query, "lag_ms", &lag_ms) < 0) {
                httpd_answer_error(c, 400, "lag and lag_ms take a non-negative integer");
                return;
            }
            ok = health_is_read_ready(httpd.m, lag_bytes, lag_ms, reason, sizeof(reason));
        }
        httpd_answer_json(c, ok ? 200 : 503, reason, head);
        return;
    }
    if (strcmp(target, "/metrics") == 0) {
        if (!httpd_authorized(authorization)) {
            httpd_answer_error(c, 401, "a bearer token is required");
            return;
        }
        struct evbuffer *text = evbuffer_new();
        if (!text) {
            httpd_answer_error(c, 503, "out of memory");
            return;
        }
        prom_write(httpd.m, text);
        size_t len = evbuffer_get_length(text);
        const char *body = (const char *)evbuffer_pullup(text, -1);
        httpd_answer(c, 200, "text/plain; version=0.0.4; charset=utf-8", body ? body : "",
                     body ? len : 0, head);
        evbuffer_free(text);
        return;
    }
    httpd_answer_error(c, 404, "no such path; try /health/is-ready or /metrics");
}

/* A request head is complete in the input: parse its request line and the one header we use. */
static void httpd_request(httpd_conn *c, char *head)
{
    char *save = NULL;
    char *line = strtok_r(head, "\r\n", &save);
    char method[16], target[HTTPD_PATH_MAX], version[16];
    if (!line || sscanf(line, "%15s %255s %15s", method, target, version) != 3 ||
        strncmp(version, "HTTP/1.", 7) != 0 || target[0] != '/') {
        httpd_answer_error(c, 400, "malformed request line");
        return;
    }
    const char *authorization = NULL;
    while ((line = strtok_r(NULL, "\r\n", &save)) != NULL) {
        if (strncasecmp(line, "Authorization:", 14) == 0) {
            authorization = line + 14;
            while (*authorization == ' ' || *authorization == '\t')
                authorization++;
        } else if (strncasecmp(line, "Content-Length:", 15) == 0 && atol(line + 15) != 0) {
            httpd_answer_error(c, 400, "requests carry no body");
            return;
        }
    }
    httpd_route(c, method, target, authorization);
}

/* ---- connections ---- */

static void httpd_on_read(struct bufferevent *bev, void *arg)
{
    httpd_conn *c = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    if (c->answered) {
        evbuffer_drain(in, evbuffer_get_length(in));
        return;
    }
    struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
    size_t want = end.pos >= 0 ? (size_t)end.pos + 4 : 0;
    if (end.pos < 0) {
        struct evbuffer_ptr lf = evbuffer_search(in, "\n\n", 2, NULL); /* bare LF clients */
        want = lf.pos >= 0 ? (size_t)lf.pos + 2 : 0;
    }
    if (want == 0 || want > HTTPD_HEAD_MAX) {
        if (evbuffer_get_length(in) > HTTPD_HEAD_MAX || want > HTTPD_HEAD_MAX)
            httpd_answer_error(c, 431, "request head longer than 8192 bytes");
        return;
    }
    char head[HTTPD_HEAD_MAX + 1];
    evbuffer_remove(in, head, want);
    head[want] = '\0';
    if (memchr(head, '\0', want)) {
        httpd_answer_error(c, 400, "NUL byte in the request");
        return;
    }
    httpd_request(c, head);
}

/* The answer is out: half-close, and read until the client closes (or the timeout), so that
 * a request left partly unread does not turn the close into a reset that loses the answer. */
static void httpd_on_write(struct bufferevent *bev, void *arg)
{
    httpd_conn *c = arg;
    if (!c->answered || c->draining)
        return;
    c->draining = true;
    shutdown(bufferevent_getfd(bev), SHUT_WR);
    bufferevent_enable(bev, EV_READ);
}

static void httpd_on_event(struct bufferevent *bev, short what, void *arg)
{
    (void)bev;
    httpd_conn *c = arg;
    if ((what & BEV_EVENT_TIMEOUT) && (what & BEV_EVENT_READING) && !c->answered) {
        httpd_answer_error(c, 408, "no complete request within 5 s");
        struct timeval tv = {HTTPD_TIMEOUT_S, 0}; /* the drain that follows is bounded too */
        bufferevent_set_timeouts(c->bev, &tv, &tv);
        return;
    }
    httpd_conn_free(c);
}

static void httpd_on_accept(evutil_socket_t lfd, short what, void *arg)
{
    (void)what;
    (void)arg;
    for (int i = 0; i < HTTPD_CONN_MAX; i++) { /* drain the queue, but not forever */
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                errno != ECONNABORTED)
                log_warning("http: accept: %s", strerror(errno));
            return;
        }
        if (httpd.n_conns >= HTTPD_CONN_MAX) {
            if (httpd.refused++ % 1000 == 0)
                log_warning("http: %d connections open; closing new ones (%" PRIu64 " so far)",
                            HTTPD_CONN_MAX, httpd.refused);
            close(fd);
            continue;
        }
        httpd_conn *c = calloc(1, sizeof(*c));
        struct bufferevent *bev = c ? bufferevent_socket_new(httpd.m->base, fd,
                                                             BEV_OPT_CLOSE_ON_FREE)
                                    : NULL;
        if (!bev) {
            log_warning("http: out of memory for a connection");
            free(c);
            close(fd);
            return;
        }
        c->bev = bev;
        c->next = httpd.conns;
        if (httpd.conns)
            httpd.conns->prev = c;
        httpd.conns = c;
        httpd.n_conns++;
        struct timeval tv = {HTTPD_TIMEOUT_S, 0};
        bufferevent_set_timeouts(bev, &tv, &tv);
        bufferevent_setwatermark(bev, EV_READ, 0, HTTPD_HEAD_MAX + 1);
        bufferevent_setcb(bev, httpd_on_read, httpd_on_write, httpd_on_event, c);
        bufferevent_enable(bev, EV_READ);
    }
}

/* ---- life cycle ---- */

int httpd_start(master *m)
{
    const config *cfg = m->cfg;
    httpd.m = m;
    if (cfg->http_listen_port == 0)
        return 0;
    char err[512];
    httpd.fd = net_listen(cfg->http_listen_addr, cfg->http_listen_port, err, sizeof(err));
    if (httpd.fd < 0) {
        log_error("http endpoint: %s", err);
        return -1;
    }
    event_assign(&httpd.ev_accept, m->base, httpd.fd, EV_READ | EV_PERSIST, httpd_on_accept,
                 NULL);
    event_add(&httpd.ev_accept, NULL);
    log_info("http endpoint on %s:%d (/health/is-live, /health/is-ready, "
             "/health/is-read-ready, /metrics)",
             cfg->http_listen_addr, cfg->http_listen_port);
    return 0;
}

void httpd_stop(void)
{
    if (httpd.fd >= 0) {
        event_del(&httpd.ev_accept);
        close(httpd.fd);
        httpd.fd = -1;
    }
    while (httpd.conns)
        httpd_conn_free(httpd.conns);
}

void httpd_close_in_child(void)
{
    if (httpd.fd >= 0)
        close(httpd.fd);
    for (httpd_conn *c = httpd.conns; c; c = c->next)
        close(bufferevent_getfd(c->bev));
}
