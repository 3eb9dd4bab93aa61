/* ctl_http.h - pgrelayctl's HTTP client: JSON requests to the first control-plane endpoint that
 * answers, with the answer classified into an exit status. */
#ifndef PGRELAY_CTL_HTTP_H
#define PGRELAY_CTL_HTTP_H

#include "ctl.h"

#include <curl/curl.h>
#include <jansson.h>
#include <stddef.h>

#define CTL_MESSAGE_MAX 1024 /* longest one-line error message */

typedef struct ctl_http {
    CURL *curl;
    char **endpoints; /* base URLs without a trailing slash, in the order given */
    size_t n_endpoints;
    size_t current;          /* the endpoint that answered last; later requests start there */
    struct curl_slist *auth; /* Authorization, Accept and User-Agent headers */
    const char *cacert;      /* TLS files (NULL = none): CA, client certificate and key */
    const char *cert;
    const char *key;
    int verbose;
} ctl_http;

/* One request's outcome. */
typedef struct ctl_answer {
    ctl_exit rc;          /* CTL_EXIT_OK for a 2xx answer whose body is JSON or empty */
    long status;          /* HTTP status; 0 when no endpoint answered */
    const char *endpoint; /* the endpoint that answered, or the last one tried */
    json_t *body;         /* the parsed body (also of error answers), NULL if empty or not JSON */
    bool has_error_text;  /* the body carried {"error": "..."} */
    char message[CTL_MESSAGE_MAX]; /* when rc != OK: "ENDPOINT: what went wrong (HTTP n)" */
} ctl_answer;

/* Parse the comma-separated endpoint list and prepare the headers. Returns 0, or -1 with a
 * message in err (a usage error: a malformed list or token). */
int ctl_http_init(ctl_http *h, const char *endpoints, const char *token, int verbose, char *err,
                  size_t errlen);
void ctl_http_free(ctl_http *h);

/* TLS files for https:// endpoints (each may be NULL). With any of them, every endpoint must be
 * https:// so that the token never travels in clear: -1 with a message in err otherwise. */
int ctl_http_tls(ctl_http *h, const char *cacert, const char *cert, const char *key, char *err,
                 size_t errlen);

/* METHOD path (starting with "/") with body (NULL: none) as JSON. Tries the endpoints in turn,
 * beginning with the last one that answered, while they cannot be reached or answer 503. A
 * request that may have reached a server is never sent twice unless it is a GET. Returns
 * ans->rc; the caller frees ans with ctl_answer_free. */
ctl_exit ctl_http_request(ctl_http *h, const char *method, const char *path, const json_t *body,
                          double timeout_s, ctl_answer *ans);
void ctl_answer_free(ctl_answer *ans);

/* Replace ans->message by "ENDPOINT: text (HTTP n)" and ans->rc by rc. */
void ctl_answer_fail(ctl_answer *ans, ctl_exit rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A path segment with URL escapes (malloc'd; NULL when out of memory). */
char *ctl_http_escape(ctl_http *h, const char *segment);

/* text as one printable line of at most max bytes, into out (size max + 4 for "..."). */
void ctl_one_line(char *out, size_t outlen, const char *text, size_t max);

#endif
