/* http.c - the HTTP server: route table, authentication, JSON request and reply helpers.
 *
 * Every request goes through http_dispatch: match a route of the table (404/405), check that
 * this replica serves (503), authenticate (401/403), parse a POST body as a JSON object (400),
 * then call the route's handler. A handler answers at once or keeps the request and answers
 * later (long polls, orchestrations); libevent keeps such a request alive until it is
 * answered, even when the client has gone.
 */
#include "http.h"
#include "agents.h"
#include "http_conns.h"
#include "control.h"
#include "lease.h"
#include "log.h"
#include "members.h"
#include "metrics.h"
#include "operator.h"
#include "plans.h"
#include "views.h"
#include "store.h"
#include "tls.h"
#include "ui_assets.h"

#include <ctype.h>
#include <event2/bufferevent_ssl.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>

#define HTTP_BEARER    "Bearer "
#define HTTP_ERROR_MAX 512
#define HTTP_WHERE_MAX 160
#define HTTP_JSON_TYPE "application/json"
#define HTTP_TEXT_TYPE "text/plain; charset=utf-8"

/* One row of the route table. */
typedef struct http_route {
    enum evhttp_cmd_type method;
    const char *pattern; /* path; '*' matches one segment, captured into call->args */
    http_auth auth;
    bool path_deployment; /* args[0] names a deployment (operator routes) */
    http_handler handler;
} http_route;

static void http_healthz(http_call *call);
static void http_readyz(http_call *call);

#define DEP_PATH "/api/v1/deployments/*"
static const http_route http_routes[] = {
    {EVHTTP_REQ_GET, "/healthz", HTTP_AUTH_NONE, false, http_healthz},
    {EVHTTP_REQ_GET, "/readyz", HTTP_AUTH_NONE, false, http_readyz},
    {EVHTTP_REQ_GET, "/metrics", HTTP_AUTH_NONE, false, metrics_handle},
    {EVHTTP_REQ_GET, "/", HTTP_AUTH_NONE, false, ui_redirect},
    {EVHTTP_REQ_GET, "/ui", HTTP_AUTH_NONE, false, ui_redirect},
    {EVHTTP_REQ_GET, "/ui/", HTTP_AUTH_NONE, false, ui_serve},
    {EVHTTP_REQ_GET, "/ui/*", HTTP_AUTH_NONE, false, ui_serve},
    {EVHTTP_REQ_POST, "/api/v1/agent/register", HTTP_AUTH_AGENT, false, agents_register},
    {EVHTTP_REQ_POST, "/api/v1/agent/metrics", HTTP_AUTH_AGENT, false, agents_metrics},
    {EVHTTP_REQ_POST, "/api/v1/agent/queries", HTTP_AUTH_AGENT, false, agents_queries},
    {EVHTTP_REQ_POST, "/api/v1/agent/plans", HTTP_AUTH_AGENT, false, plans_upload},
    {EVHTTP_REQ_POST, "/api/v1/agent/config", HTTP_AUTH_AGENT, false, agents_config},
    {EVHTTP_REQ_GET, "/api/v1/agent/config", HTTP_AUTH_AGENT, false, operator_config_desired},
    {EVHTTP_REQ_POST, "/api/v1/agent/schema", HTTP_AUTH_AGENT, false, agents_schema},
    {EVHTTP_REQ_GET, "/api/v1/agent/commands", HTTP_AUTH_AGENT, false, agents_commands},
    {EVHTTP_REQ_POST, "/api/v1/agent/commands/*/ack", HTTP_AUTH_AGENT, false, agents_ack},
    {EVHTTP_REQ_GET, "/api/v1/agent/operations/*", HTTP_AUTH_AGENT, false,
     operator_operation_status},
    {EVHTTP_REQ_GET, "/api/v1/deployments", HTTP_AUTH_ADMIN, false, views_deployments},
    {EVHTTP_REQ_GET, DEP_PATH "/proxies", HTTP_AUTH_ADMIN, true, views_proxies},
    {EVHTTP_REQ_POST, DEP_PATH "/proxies", HTTP_AUTH_ADMIN, true, members_create},
    {EVHTTP_REQ_DELETE, DEP_PATH "/proxies/*", HTTP_AUTH_ADMIN, true, members_delete},
    {EVHTTP_REQ_POST, DEP_PATH "/proxies/*/options", HTTP_AUTH_ADMIN, true, members_set_options},
    {EVHTTP_REQ_GET, DEP_PATH "/nodes", HTTP_AUTH_ADMIN, true, views_nodes},
    {EVHTTP_REQ_GET, DEP_PATH "/leaders", HTTP_AUTH_ADMIN, true, views_leaders_get},
    {EVHTTP_REQ_GET, DEP_PATH "/queries", HTTP_AUTH_ADMIN, true, views_queries},
    {EVHTTP_REQ_GET, DEP_PATH "/plans", HTTP_AUTH_ADMIN, true, plans_view},
    {EVHTTP_REQ_GET, DEP_PATH "/metrics", HTTP_AUTH_ADMIN, true, views_metrics},
    {EVHTTP_REQ_GET, DEP_PATH "/metrics/history", HTTP_AUTH_ADMIN, true, views_metrics_history},
    {EVHTTP_REQ_GET, DEP_PATH "/schema", HTTP_AUTH_ADMIN, true, views_schema},
    {EVHTTP_REQ_POST, DEP_PATH "/maintenance", HTTP_AUTH_ADMIN, true, operator_maintenance},
    {EVHTTP_REQ_POST, DEP_PATH "/reload", HTTP_AUTH_ADMIN, true, operator_reload},
    {EVHTTP_REQ_POST, DEP_PATH "/switchover", HTTP_AUTH_ADMIN, true, operator_switchover},
    {EVHTTP_REQ_POST, DEP_PATH "/unfence", HTTP_AUTH_ADMIN, true, operator_unfence},
    {EVHTTP_REQ_GET, DEP_PATH "/operations", HTTP_AUTH_ADMIN, true, operator_operations},
    {EVHTTP_REQ_POST, DEP_PATH "/config", HTTP_AUTH_ADMIN, true, operator_config_apply},
    {EVHTTP_REQ_GET, DEP_PATH "/config", HTTP_AUTH_ADMIN, true, views_config_get},
};
#define HTTP_N_ROUTES (sizeof(http_routes) / sizeof(http_routes[0]))

static struct {
    struct evhttp *http;
    struct evhttp_bound_socket *bound;
    SSL_CTX *tls; /* HTTPS: each connection's OpenSSL bufferevent is made from it; NULL = HTTP */
} server;

/* ---- replies ---- */

static const char *http_reason(int code)
{
    switch (code) {
    case 200:
        return "OK";
    case 204:
        return "No Content";
    case 302:
        return "Found";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 409:
        return "Conflict";
    case 413:
        return "Payload Too Large";
    case 500:
        return "Internal Server Error";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return "Status";
    }
}

void http_reply_text(struct evhttp_request *req, int code, const char *content_type,
                     const char *text, size_t len)
{
    struct evbuffer *buf = evbuffer_new();
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", content_type);
    if (buf && len)
        evbuffer_add(buf, text, len);
    http_conns_answered(req);
    evhttp_send_reply(req, code, http_reason(code), buf);
    if (buf)
        evbuffer_free(buf);
}

void http_reply_json(struct evhttp_request *req, int code, json_t *body)
{
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (!text) {
        static const char oom[] = "{\"error\":\"out of memory\"}\n";
        http_reply_text(req, 500, HTTP_JSON_TYPE, oom, sizeof(oom) - 1);
        return;
    }
    size_t len = strlen(text);
    struct evbuffer *buf = evbuffer_new();
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", HTTP_JSON_TYPE);
    if (buf) {
        evbuffer_add(buf, text, len);
        evbuffer_add(buf, "\n", 1);
    }
    http_conns_answered(req);
    evhttp_send_reply(req, code, http_reason(code), buf);
    if (buf)
        evbuffer_free(buf);
    free(text);
}

void http_reply_error(struct evhttp_request *req, int code, const char *fmt, ...)
{
    char msg[HTTP_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    http_reply_json(req, code, json_pack("{s:s}", "error", msg));
}

void http_reply_empty(struct evhttp_request *req, int code)
{
    http_conns_answered(req);
    evhttp_send_reply(req, code, http_reason(code), NULL);
}

void http_reply_buffer(struct evhttp_request *req, int code, struct evbuffer *body)
{
    http_conns_answered(req);
    evhttp_send_reply(req, code, http_reason(code), body);
}

/* ---- body fields ---- */

static void http_where(char *buf, size_t len, const char *where, const char *key)
{
    if (where)
        snprintf(buf, len, "%s.%s", where, key);
    else
        snprintf(buf, len, "%s", key);
}

/* Common part: the field, or NULL (answered 400 when required; *bad tells). */
static json_t *http_field(http_call *c, json_t *obj, const char *where, const char *key,
                          bool required, bool *bad)
{
    char name[HTTP_WHERE_MAX];
    json_t *v = json_object_get(obj, key);
    *bad = false;
    if (v && !json_is_null(v))
        return v;
    if (required) {
        http_where(name, sizeof(name), where, key);
        http_reply_error(c->req, 400, "missing field %s", name);
        *bad = true;
    }
    return NULL;
}

static bool http_mistyped(http_call *c, const char *where, const char *key, const char *what)
{
    char name[HTTP_WHERE_MAX];
    http_where(name, sizeof(name), where, key);
    http_reply_error(c->req, 400, "field %s must be %s", name, what);
    return false;
}

bool http_field_string(http_call *c, json_t *obj, const char *where, const char *key, bool required,
                       size_t max_len, const char **out)
{
    bool bad;
    json_t *v = http_field(c, obj, where, key, required, &bad);
    if (!v)
        return !bad;
    if (!json_is_string(v))
        return http_mistyped(c, where, key, "a string");
    if (json_string_length(v) > max_len) {
        char name[HTTP_WHERE_MAX];
        http_where(name, sizeof(name), where, key);
        http_reply_error(c->req, 400, "field %s is longer than %zu characters", name, max_len);
        return false;
    }
    *out = json_string_value(v);
    return true;
}

bool http_field_int(http_call *c, json_t *obj, const char *where, const char *key, bool required,
                    int64_t min, int64_t max, int64_t *out)
{
    bool bad;
    char what[HTTP_WHERE_MAX];
    json_t *v = http_field(c, obj, where, key, required, &bad);
    if (!v)
        return !bad;
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max) {
        snprintf(what, sizeof(what), "an integer from %lld to %lld", (long long)min,
                 (long long)max);
        return http_mistyped(c, where, key, what);
    }
    *out = json_integer_value(v);
    return true;
}

bool http_field_bool(http_call *c, json_t *obj, const char *where, const char *key, bool required,
                     bool *out)
{
    bool bad;
    json_t *v = http_field(c, obj, where, key, required, &bad);
    if (!v)
        return !bad;
    if (!json_is_boolean(v))
        return http_mistyped(c, where, key, "true or false");
    *out = json_is_true(v);
    return true;
}

bool http_field_container(http_call *c, json_t *obj, const char *where, const char *key,
                          bool required, bool want_object, json_t **out)
{
    bool bad;
    json_t *v = http_field(c, obj, where, key, required, &bad);
    if (!v)
        return !bad;
    if (want_object ? !json_is_object(v) : !json_is_array(v))
        return http_mistyped(c, where, key, want_object ? "an object" : "an array");
    *out = v;
    return true;
}

bool http_node_id_valid(const char *id)
{
    size_t len = strlen(id);
    if (len == 0 || len >= STATE_NODE_ID_MAX)
        return false;
    for (const char *ch = id; *ch; ch++)
        if (!isgraph((unsigned char)*ch))
            return false;
    return true;
}

/* ---- health ---- */

const char *http_not_serving_reason(void)
{
    lease_check();
    if (lease_enabled() && !lease_held())
        return "not the lease holder";
    if (!control.active)
        return "store unreachable";
    return NULL;
}

static void http_healthz(http_call *call)
{
    static const char ok[] = "ok\n";
    http_reply_text(call->req, 200, HTTP_TEXT_TYPE, ok, sizeof(ok) - 1);
}

static void http_readyz(http_call *call)
{
    char text[HTTP_ERROR_MAX];
    /* From state: the last store call's outcome (housekeeping and the lease timer call it
     * every second at most), never a call of its own that would hold the event loop. */
    const char *why = http_not_serving_reason();
    if (!why && !store_up())
        why = "store unreachable";
    if (!why && operation_recovering())
        why = "recovering the operations another replica left running";
    if (!why) {
        static const char ready[] = "ready\n";
        http_reply_text(call->req, 200, HTTP_TEXT_TYPE, ready, sizeof(ready) - 1);
        return;
    }
    int len = snprintf(text, sizeof(text), "not ready: %s\n", why);
    http_reply_text(call->req, 503, HTTP_TEXT_TYPE, text, (size_t)len);
}

/* ---- routing ---- */

/* Does path match pattern? Fills call->args with the '*' segments. */
static bool http_match(const char *pattern, const char *path, http_call *call)
{
    int nargs = 0;
    while (*pattern && *path) {
        if (*pattern == '*') {
            size_t n = strcspn(path, "/");
            if (n == 0 || n >= HTTP_ARG_MAX || nargs >= HTTP_MAX_ARGS)
                return false;
            memcpy(call->args[nargs], path, n);
            call->args[nargs][n] = '\0';
            nargs++;
            path += n;
            pattern++;
            continue;
        }
        if (*pattern != *path)
            return false;
        pattern++;
        path++;
    }
    if (*pattern || *path)
        return false;
    call->nargs = nargs;
    return true;
}

/* The bearer token of the request (trimmed, in buf), or NULL. */
static const char *http_bearer(struct evhttp_request *req, char *buf, size_t len)
{
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (!h || strncasecmp(h, HTTP_BEARER, strlen(HTTP_BEARER)) != 0)
        return NULL;
    h += strlen(HTTP_BEARER);
    while (*h == ' ' || *h == '\t')
        h++;
    size_t n = strlen(h);
    while (n > 0 && (h[n - 1] == ' ' || h[n - 1] == '\t'))
        n--;
    if (n == 0 || n >= len)
        return NULL;
    memcpy(buf, h, n);
    buf[n] = '\0';
    return buf;
}

static bool http_is_admin_digest(const char *sha)
{
    char admin[CONTROL_SHA256_HEX_LEN];
    bool found = false;
    const cconfig *cfg = control.cfg;
    for (int i = 0; i < cfg->n_admin_tokens; i++) {
        control_sha256_hex(cfg->admin_token_list[i], admin);
        if (control_digest_equal(admin, sha))
            found = true;
    }
    return found;
}

static bool http_token_acceptable(const char *token)
{
    if (strlen(token) < CCONFIG_TOKEN_MIN_LEN)
        return false;
    for (const char *c = token; *c; c++)
        if (!isgraph((unsigned char)*c))
            return false;
    return true;
}

/* Authenticate for the route; answers 401/403/503 itself and returns false on refusal. */
static bool http_authenticate(http_call *call, const http_route *route)
{
    char token[CCONFIG_TOKEN_MAX];
    char sha[CONTROL_SHA256_HEX_LEN];

    if (!http_bearer(call->req, token, sizeof(token))) {
        http_reply_error(call->req, 401, "missing or malformed Authorization: Bearer token");
        return false;
    }
    control_sha256_hex(token, sha);
    bool admin = http_is_admin_digest(sha);
    state_deployment *dep = state_deployment_by_digest(sha);

    if (route->auth == HTTP_AUTH_ADMIN) {
        if (admin)
            return true;
        if (dep) {
            http_reply_error(call->req, 403,
                             "a deployment token may call only the /api/v1/agent/ endpoints");
            return false;
        }
        http_reply_error(call->req, 401, "unknown token");
        return false;
    }
    if (dep) {
        call->dep = dep;
        return true;
    }
    if (admin) {
        http_reply_error(call->req, 403, "an admin token cannot call the agent endpoints");
        return false;
    }
    if (control.cfg->auto_register && http_token_acceptable(token)) {
        call->dep = state_auto_deployment(sha);
        if (call->dep)
            return true;
        if (!store_up()) {
            http_reply_error(call->req, 503, "store unreachable: %s", store_error());
            return false;
        }
    }
    http_reply_error(call->req, 401, "unknown token");
    return false;
}

/* Parse the body as a JSON object; answers 400 itself and returns false when it is not. */
static bool http_parse_body(http_call *call)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(call->req);
    size_t len = evbuffer_get_length(in);
    json_error_t err;

    if (len > HTTP_MAX_BODY) {
        http_reply_error(call->req, 413, "request body over %d bytes", HTTP_MAX_BODY);
        return false;
    }
    if (len == 0) {
        http_reply_error(call->req, 400, "the body must be a JSON object");
        return false;
    }
    const unsigned char *data = evbuffer_pullup(in, -1);
    if (!data) {
        http_reply_error(call->req, 500, "out of memory");
        return false;
    }
    call->body = json_loadb((const char *)data, len, 0, &err);
    if (!call->body) {
        http_reply_error(call->req, 400, "malformed JSON at line %d column %d: %s", err.line,
                         err.column, err.text);
        return false;
    }
    if (!json_is_object(call->body)) {
        http_reply_error(call->req, 400, "the body must be a JSON object");
        return false;
    }
    return true;
}

/* On every answer, the web UI's and the API's alike: no script, style or frame from anywhere
 * but this origin and no inline script or style (the UI has none), never framed, types as
 * sent, no Referer; API answers (tokens, fleet state) are never cached. */
static void http_security_headers(struct evhttp_request *req, const char *path)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Security-Policy",
                      "default-src 'self'; script-src 'self'; object-src 'none'; "
                      "frame-ancestors 'none'");
    evhttp_add_header(h, "X-Frame-Options", "DENY");
    evhttp_add_header(h, "X-Content-Type-Options", "nosniff");
    evhttp_add_header(h, "Referrer-Policy", "no-referrer");
    if (strncmp(path, "/ui", 3) != 0)
        evhttp_add_header(h, "Cache-Control", "no-store");
}

static void http_dispatch(struct evhttp_request *req, void *arg)
{
    http_call call;
    const http_route *route = NULL;
    bool wrong_method = false;
    (void)arg;

    memset(&call, 0, sizeof(call));
    call.req = req;
    http_conns_request(req); /* busy until answered: not closed as idle */
    TAILQ_INIT(&call.query);
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
    if (!path || !*path)
        path = "/";
    call.path = path;
    http_security_headers(req, path);
    enum evhttp_cmd_type method = evhttp_request_get_command(req);

    for (size_t i = 0; i < HTTP_N_ROUTES; i++) {
        if (!http_match(http_routes[i].pattern, path, &call))
            continue;
        if (http_routes[i].method == method ||
            (method == EVHTTP_REQ_HEAD && http_routes[i].method == EVHTTP_REQ_GET &&
             http_routes[i].auth == HTTP_AUTH_NONE)) {
            route = &http_routes[i];
            break;
        }
        wrong_method = true;
    }
    if (!route) {
        if (wrong_method)
            http_reply_error(req, 405, "method not allowed on %s", path);
        else
            http_reply_error(req, 404, "no such endpoint");
        return;
    }
    log_debug("%s %s",
              method == EVHTTP_REQ_POST     ? "POST"
              : method == EVHTTP_REQ_DELETE ? "DELETE"
                                            : "GET",
              path);

    if (route->auth != HTTP_AUTH_NONE) {
        const char *why = http_not_serving_reason();
        if (why) {
            http_reply_error(req, 503, "%s", why);
            return;
        }
        if (!http_authenticate(&call, route))
            return;
        if (route->path_deployment) {
            call.dep = state_find_deployment(call.args[0]);
            if (!call.dep) {
                http_reply_error(req, 404, "unknown deployment %s", call.args[0]);
                return;
            }
        }
    }
    if (method == EVHTTP_REQ_POST && !http_parse_body(&call))
        goto done;
    const char *query = uri ? evhttp_uri_get_query(uri) : NULL;
    if (query && evhttp_parse_query_str(query, &call.query) != 0) {
        http_reply_error(req, 400, "malformed query string");
        goto done;
    }
    route->handler(&call);
done:
    json_decref(call.body);
    evhttp_clear_headers(&call.query);
}

/* ---- server ---- */

static void http_set_timeout(void)
{
    int64_t secs = control.cfg->poll_wait_max_ms / 1000 + HTTP_IDLE_MARGIN_S;
    evhttp_set_timeout(server.http, (int)secs);
}

/* evhttp asks for each accepted connection's bufferevent: with TLS, an OpenSSL one that
 * does the server side of the handshake before evhttp reads the request. Either way the
 * connection is followed from now on (http_conns.c). */
static struct bufferevent *http_new_bufferevent(struct event_base *base, void *arg)
{
    (void)arg;
    if (!server.tls)
        return http_conns_track(bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE));
    SSL *ssl = SSL_new(server.tls);
    if (!ssl)
        return NULL;
    struct bufferevent *bev = bufferevent_openssl_socket_new(
        base, -1, ssl, BUFFEREVENT_SSL_ACCEPTING, BEV_OPT_CLOSE_ON_FREE);
    if (!bev)
        SSL_free(ssl);
    return http_conns_track(bev);
}

int http_start(struct event_base *base, char *err, size_t err_len)
{
    const cconfig *cfg = control.cfg;
    if (cfg->tls_cert_file[0]) {
        server.tls = tls_server_ctx(cfg->tls_cert_file, cfg->tls_key_file, cfg->tls_client_ca_file,
                                    err, err_len);
        if (!server.tls)
            return -1;
    } else if (!tls_addr_is_loopback(cfg->listen_addr)) {
        log_warning("listening on %s without TLS: bearer tokens travel in clear (set "
                    "tls_cert_file and tls_key_file)",
                    cfg->listen_addr);
    }
    server.http = evhttp_new(base);
    if (!server.http) {
        snprintf(err, err_len, "cannot create the HTTP server: out of memory");
        return -1;
    }
    evhttp_set_max_body_size(server.http, HTTP_MAX_BODY);
    evhttp_set_max_headers_size(server.http, HTTP_MAX_HEADERS);
    evhttp_set_allowed_methods(server.http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                                EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                                EVHTTP_REQ_PATCH | EVHTTP_REQ_OPTIONS);
    evhttp_set_default_content_type(server.http, HTTP_JSON_TYPE);
    evhttp_set_gencb(server.http, http_dispatch, NULL);
    evhttp_set_bevcb(server.http, http_new_bufferevent, NULL);
    http_set_timeout();
    server.bound = http_conns_listen(server.http, cfg->listen_addr, cfg->listen_port, err, err_len);
    if (!server.bound) {
        evhttp_free(server.http);
        server.http = NULL;
        return -1;
    }
    return 0;
}

/* A reload renews the certificate, key and client CA for new connections; a file that does
 * not load keeps the running ones (the reload already refused such a file). Turning HTTPS on
 * or off takes a restart: the listening socket speaks one or the other. */
static void http_renew_tls(void)
{
    const cconfig *cfg = control.cfg;
    if (!cfg->tls_cert_file[0] != !server.tls) {
        log_warning("reload: HTTPS %s only after a restart", server.tls ? "stops" : "starts");
        return;
    }
    if (!server.tls)
        return;
    char err[512];
    SSL_CTX *ctx = tls_server_ctx(cfg->tls_cert_file, cfg->tls_key_file, cfg->tls_client_ca_file,
                                  err, sizeof(err));
    if (!ctx) {
        log_error("reload: %s; new connections keep the previous certificate", err);
        return;
    }
    SSL_CTX_free(server.tls); /* connections still using it hold their own reference */
    server.tls = ctx;
    log_info("reload: HTTPS certificate %s loaded for new connections", cfg->tls_cert_file);
}

void http_apply_config(void)
{
    if (server.http) {
        http_set_timeout();
        http_renew_tls();
        http_conns_apply_config();
    }
}

void http_stop(void)
{
    http_conns_stop();
    if (server.http)
        evhttp_free(server.http);
    http_conns_release();
    server.http = NULL;
    server.bound = NULL;
    SSL_CTX_free(server.tls);
    server.tls = NULL;
}
