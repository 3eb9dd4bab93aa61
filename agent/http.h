/* http.h - the agent's HTTP client for the control plane (libcurl, one handle per thread). */
#ifndef PGRELAY_AGENT_HTTP_H
#define PGRELAY_AGENT_HTTP_H

#include "config.h"

#include <jansson.h>
#include <stdbool.h>

#define HTTP_ENDPOINTS_MAX 8

typedef struct http_client {
    void *curl;                         /* CURL easy handle */
    char endpoints[HTTP_ENDPOINTS_MAX][256];
    int n_endpoints;
    int current;                        /* endpoint tried first (the last that answered) */
    char token[256];
    long timeout_ms;
    const char *ca_file;                /* [control] ca_file, cert_file, key_file ("" = none) */
    const char *cert_file;
    const char *key_file;
    char error[256];                    /* why the last request failed */
} http_client;

/* Set up from cfg's [control] keys: the comma-separated endpoint list, the token, the request
 * timeout and the TLS files (cfg must outlive the client). Returns -1 when curl cannot start. */
int http_client_init(http_client *c, const config *cfg);
void http_client_free(http_client *c);

/* Send a request (body may be NULL for GET) to path on the first endpoint that answers; on a
 * connection failure or a 503 the next endpoint is tried. Returns the HTTP status (0 when no
 * endpoint answered; c->error says why) and, when the answer has a JSON body, *reply (to be
 * json_decref'd; NULL otherwise). extra_ms lengthens the timeout (long polls). */
long http_request(http_client *c, const char *method, const char *path, json_t *body,
                  json_t **reply, long extra_ms);

/* An answer collected by curl (CURLOPT_WRITEFUNCTION http_collect, CURLOPT_WRITEDATA the
 * buffer): NUL-terminated; past max bytes (0: 4 MiB) the transfer fails and too_long is set. */
typedef struct http_buffer {
    char *data;
    size_t len;
    size_t max;
    bool too_long;
} http_buffer;

size_t http_collect(char *ptr, size_t size, size_t nmemb, void *arg);

#endif
