/* http.h - the HTTP server: the route table, authentication, JSON request and reply helpers. */
#ifndef PGRELAY_HTTP_H
#define PGRELAY_HTTP_H

#include "state.h"

#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#define HTTP_MAX_ARGS      4                 /* '*' segments in one route pattern */
#define HTTP_ARG_MAX       128               /* longest path segment captured */
#define HTTP_MAX_BODY      (4 * 1024 * 1024) /* larger request bodies are 413 */
#define HTTP_MAX_HEADERS   (64 * 1024)       /* larger request headers are refused */
#define HTTP_IDLE_MARGIN_S 15                /* connection timeout beyond poll_wait_max */

/* Who may call a route. */
typedef enum http_auth {
    HTTP_AUTH_NONE = 0, /* anyone: /healthz, /readyz, /metrics */
    HTTP_AUTH_AGENT,    /* a deployment token; the call's deployment is the token's */
    HTTP_AUTH_ADMIN,    /* an admin token; a deployment named in the path must exist */
} http_auth;

/* One request on its way through the router to a handler. */
typedef struct http_call {
    struct evhttp_request *req;
    const char *path;
    char args[HTTP_MAX_ARGS][HTTP_ARG_MAX]; /* the '*' segments of the route, in order */
    int nargs;
    struct evkeyvalq query; /* the query string's parameters */
    json_t *body;           /* POST: the body, a JSON object; else NULL */
    state_deployment *dep;  /* the token's (agent) or the path's (operator) */
} http_call;

typedef void (*http_handler)(http_call *call);

/* Start listening on listen_addr:listen_port. Returns 0, or -1 with err filled in. */
int http_start(struct event_base *base, char *err, size_t err_len);

/* Apply reloadable settings (the connection timeout follows poll_wait_max). */
void http_apply_config(void);

/* Stop listening and free the server (every deferred request must be answered first). */
void http_stop(void);

/* Replies. Each one finishes the request; the JSON body reference is stolen. */
void http_reply_json(struct evhttp_request *req, int code, json_t *body);
void http_reply_error(struct evhttp_request *req, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void http_reply_empty(struct evhttp_request *req, int code);
void http_reply_text(struct evhttp_request *req, int code, const char *content_type,
                     const char *text, size_t len);
/* The body as it is (headers set by the caller; the buffer stays the caller's). */
void http_reply_buffer(struct evhttp_request *req, int code, struct evbuffer *body);

/* Field checks for request bodies. Each returns true when the field is fine (or absent and
 * optional, leaving *out alone); otherwise it answers 400 naming where and the field, and
 * returns false: the handler must return at once. where is a prefix such as "nodes[2]" or
 * NULL. */
bool http_field_string(http_call *c, json_t *obj, const char *where, const char *key, bool required,
                       size_t max_len, const char **out);
bool http_field_int(http_call *c, json_t *obj, const char *where, const char *key, bool required,
                    int64_t min, int64_t max, int64_t *out);
bool http_field_bool(http_call *c, json_t *obj, const char *where, const char *key, bool required,
                     bool *out);
/* An array (or an object with want_object), returned borrowed. */
bool http_field_container(http_call *c, json_t *obj, const char *where, const char *key,
                          bool required, bool want_object, json_t **out);

/* A node_id: 1 to STATE_NODE_ID_MAX-1 printable ASCII characters without blanks. */
bool http_node_id_valid(const char *id);

/* Why /api/v1 is refused on this replica now, or NULL when it serves. */
const char *http_not_serving_reason(void);

#endif
