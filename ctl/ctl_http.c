/* ctl_http.c - pgrelayctl's HTTP client: libcurl requests with endpoint failover. */
#include "ctl_http.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define CTL_CONNECT_TIMEOUT_S 5.0         /* longest wait for one endpoint's handshake */
#define CTL_ANSWER_MAX        (64u << 20) /* larger answers are refused, not buffered */
#define CTL_ERROR_TEXT_MAX    300         /* bytes of a server's error text that are shown */
#define CTL_SNIPPET_MAX       60          /* bytes of a non-JSON body quoted in an error */
#define CTL_MS_PER_S          1000.0
#define CTL_VERBOSE_BODY_MAX  200 /* bytes of a request body that -v shows */
#define CTL_AUTH_HEADER       "Authorization:"

#define HTTP_OK_FIRST           200
#define HTTP_OK_LAST            299
#define HTTP_UNAUTHORIZED       401
#define HTTP_FORBIDDEN          403
#define HTTP_NOT_FOUND          404
#define HTTP_CLIENT_ERROR_FIRST 400
#define HTTP_SERVER_ERROR_FIRST 500
#define HTTP_UNAVAILABLE        503
#define HTTP_GATEWAY_TIMEOUT    504

/* The body being received. */
typedef struct ctl_buf {
    char *data;
    size_t len, cap;
    bool too_large; /* the answer passed CTL_ANSWER_MAX and was cut off */
} ctl_buf;

/* What one attempt at one endpoint came to. */
typedef enum ctl_attempt {
    CTL_ATTEMPT_DONE, /* an answer (or a failure that must not be retried): ans is final */
    CTL_ATTEMPT_NEXT, /* unreachable or 503: try the next endpoint */
} ctl_attempt;

void ctl_one_line(char *out, size_t outlen, const char *text, size_t max)
{
    size_t n = 0;
    const unsigned char *p = (const unsigned char *)text;

    if (outlen == 0)
        return;
    for (; *p && n < max && n + 1 < outlen; p++)
        out[n++] = (*p < ' ' || *p == 0x7f) ? ' ' : (char)*p;
    /* Do not leave a UTF-8 sequence cut in half. */
    if (*p && n > 0) {
        while (n > 0 && ((unsigned char)out[n - 1] & 0xc0) == 0x80)
            n--;
        if (n > 0 && ((unsigned char)out[n - 1] & 0xc0) == 0xc0)
            n--;
    }
    out[n] = '\0';
    if (*p && n + 3 < outlen)
        strcat(out, "...");
}

static char *ctl_trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        s[--n] = '\0';
    return s;
}

int ctl_http_init(ctl_http *h, const char *endpoints, const char *token, int verbose, char *err,
                  size_t errlen)
{
    char *list = NULL, *save = NULL, *header = NULL;
    int rc = -1;

    memset(h, 0, sizeof(*h));
    h->verbose = verbose;
    for (const char *c = token; *c; c++)
        if ((unsigned char)*c < ' ' || *c == 0x7f) {
            snprintf(err, errlen, "the token contains a control character");
            goto done;
        }
    if (!token[0]) {
        snprintf(err, errlen, "the token is empty");
        goto done;
    }
    list = strdup(endpoints);
    if (!list)
        goto oom;
    for (char *e = strtok_r(list, ",", &save); e; e = strtok_r(NULL, ",", &save)) {
        e = ctl_trim(e);
        if (!e[0])
            continue;
        if (strncasecmp(e, "http://", strlen("http://")) != 0 &&
            strncasecmp(e, "https://", strlen("https://")) != 0) {
            snprintf(err, errlen, "endpoint \"%s\" is not an http:// or https:// URL", e);
            goto done;
        }
        size_t n = strlen(e);
        while (n > 0 && e[n - 1] == '/')
            e[--n] = '\0';
        char **grown = realloc(h->endpoints, (h->n_endpoints + 1) * sizeof(*grown));
        if (!grown)
            goto oom;
        h->endpoints = grown;
        if (!(h->endpoints[h->n_endpoints] = strdup(e)))
            goto oom;
        h->n_endpoints++;
    }
    if (h->n_endpoints == 0) {
        snprintf(err, errlen, "no endpoint given");
        goto done;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || !(h->curl = curl_easy_init())) {
        snprintf(err, errlen, "cannot initialise libcurl");
        goto done;
    }
    if (asprintf(&header, CTL_AUTH_HEADER " Bearer %s", token) < 0) {
        header = NULL;
        goto oom;
    }
    /* No "Expect: 100-continue" round trip before large configuration texts. */
    const char *const headers[] = {header, "Accept: application/json",
                                   "User-Agent: " CTL_PROG "/" PGRELAY_VERSION, "Expect:"};
    for (size_t i = 0; i < sizeof(headers) / sizeof(headers[0]); i++) {
        struct curl_slist *l = curl_slist_append(h->auth, headers[i]);
        if (!l)
            goto oom;
        h->auth = l;
    }
    rc = 0;
    goto done;
oom:
    snprintf(err, errlen, "out of memory");
done:
    free(header);
    free(list);
    if (rc != 0)
        ctl_http_free(h);
    return rc;
}

void ctl_http_free(ctl_http *h)
{
    for (size_t i = 0; i < h->n_endpoints; i++)
        free(h->endpoints[i]);
    free(h->endpoints);
    curl_slist_free_all(h->auth);
    if (h->curl) {
        curl_easy_cleanup(h->curl);
        curl_global_cleanup();
    }
    memset(h, 0, sizeof(*h));
}

char *ctl_http_escape(ctl_http *h, const char *segment)
{
    char *escaped = curl_easy_escape(h->curl, segment, 0);
    char *copy = escaped ? strdup(escaped) : NULL;
    curl_free(escaped);
    return copy;
}

void ctl_answer_free(ctl_answer *ans)
{
    json_decref(ans->body);
    ans->body = NULL;
}

static void ctl_answer_vfail(ctl_answer *ans, ctl_exit rc, const char *fmt, va_list ap)
{
    size_t size = sizeof(ans->message), used = 0;
    int n;

    /* "ENDPOINT: text (HTTP n)", in stages so that a long text only cuts itself short. */
    ans->rc = rc;
    n = snprintf(ans->message, size, "%s: ", ans->endpoint);
    used = n < 0 ? 0 : (size_t)n < size ? (size_t)n : size - 1;
    n = vsnprintf(ans->message + used, size - used, fmt, ap);
    used += n < 0 ? 0 : (size_t)n < size - used ? (size_t)n : size - used - 1;
    if (ans->status > 0)
        snprintf(ans->message + used, size - used, " (HTTP %ld)", ans->status);
}

void ctl_answer_fail(ctl_answer *ans, ctl_exit rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ctl_answer_vfail(ans, rc, fmt, ap);
    va_end(ap);
}

static size_t ctl_http_on_data(char *ptr, size_t size, size_t nmemb, void *arg)
{
    ctl_buf *b = arg;
    size_t n = size * nmemb;

    if (b->len + n > CTL_ANSWER_MAX) {
        b->too_large = true;
        return 0; /* libcurl stops with CURLE_WRITE_ERROR */
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown)
            return 0;
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, ptr, n);
    b->len += n;
    b->data[b->len] = '\0';
    return n;
}

static ctl_exit ctl_status_exit(long status)
{
    if (status >= HTTP_OK_FIRST && status <= HTTP_OK_LAST)
        return CTL_EXIT_OK;
    if (status == HTTP_UNAUTHORIZED || status == HTTP_FORBIDDEN)
        return CTL_EXIT_AUTH;
    if (status == HTTP_NOT_FOUND)
        return CTL_EXIT_NOT_FOUND;
    if (status == HTTP_GATEWAY_TIMEOUT)
        return CTL_EXIT_TIMEOUT;
    if (status >= HTTP_CLIENT_ERROR_FIRST && status < HTTP_SERVER_ERROR_FIRST)
        return CTL_EXIT_FAILED;  /* 409 and the other refusals */
    return CTL_EXIT_UNREACHABLE; /* 5xx, and 1xx/3xx, which this API never sends */
}

/* Classify a complete HTTP answer into ans. */
static void ctl_http_classify(ctl_answer *ans, const ctl_buf *b)
{
    char snippet[CTL_SNIPPET_MAX + 4];
    char text[CTL_ERROR_TEXT_MAX + 4];
    json_error_t jerr;

    ans->rc = ctl_status_exit(ans->status);
    if (b->len > 0)
        ans->body = json_loadb(b->data, b->len, JSON_DECODE_ANY, &jerr);
    if (ans->body && json_is_object(ans->body) &&
        json_is_string(json_object_get(ans->body, "error")))
        ans->has_error_text = true;

    if (ans->rc == CTL_EXIT_OK) {
        if (b->len > 0 && !ans->body) {
            ctl_one_line(snippet, sizeof(snippet), b->data, CTL_SNIPPET_MAX);
            ctl_answer_fail(ans, CTL_EXIT_UNREACHABLE,
                            "the answer is not JSON (%s at byte %d): \"%s\"", jerr.text,
                            jerr.position, snippet);
        }
        return;
    }
    if (ans->has_error_text) {
        ctl_one_line(text, sizeof(text), json_string_value(json_object_get(ans->body, "error")),
                     CTL_ERROR_TEXT_MAX);
        ctl_answer_fail(ans, ans->rc, "%s", text);
    } else if (b->len > 0 && !ans->body) {
        ctl_one_line(snippet, sizeof(snippet), b->data, CTL_SNIPPET_MAX);
        ctl_answer_fail(ans, ans->rc, "error answer that is not JSON: \"%s\"", snippet);
    } else {
        ctl_answer_fail(ans, ans->rc, "error answer without an \"error\" text");
    }
}

/* -vv: libcurl's trace on stderr, with the token masked and bodies left out. */
static int ctl_http_on_debug(CURL *curl, curl_infotype type, char *data, size_t size, void *arg)
{
    const char *prefix = type == CURLINFO_TEXT         ? "* "
                         : type == CURLINFO_HEADER_IN  ? "< "
                         : type == CURLINFO_HEADER_OUT ? "> "
                                                       : NULL;
    (void)curl;
    (void)arg;
    if (!prefix)
        return 0;
    while (size > 0) {
        const char *nl = memchr(data, '\n', size);
        size_t len = nl ? (size_t)(nl - data) + 1 : size;
        size_t shown = len;
        while (shown > 0 && (data[shown - 1] == '\n' || data[shown - 1] == '\r'))
            shown--;
        if (shown >= strlen(CTL_AUTH_HEADER) &&
            strncasecmp(data, CTL_AUTH_HEADER, strlen(CTL_AUTH_HEADER)) == 0)
            fprintf(stderr, "%s" CTL_AUTH_HEADER " Bearer (hidden)\n", prefix);
        else if (shown > 0)
            fprintf(stderr, "%s%.*s\n", prefix, (int)shown, data);
        data += len;
        size -= len;
    }
    return 0;
}

/* One try at endpoint i. reason gets why it was skipped when the answer is NEXT. */
static ctl_attempt ctl_http_attempt(ctl_http *h, size_t i, const char *method, const char *path,
                                    const char *payload, double timeout_s, ctl_answer *ans,
                                    char *reason, size_t reasonlen)
{
    char *url = NULL;
    char curl_err[CURL_ERROR_SIZE] = "";
    ctl_buf b = {0};
    struct curl_slist *headers = NULL;
    ctl_attempt result = CTL_ATTEMPT_DONE;
    long timeout_ms = (long)(timeout_s * CTL_MS_PER_S);
    long connect_ms = (long)(CTL_CONNECT_TIMEOUT_S * CTL_MS_PER_S);
    bool is_get = strcmp(method, "GET") == 0;

    ctl_answer_free(ans);
    memset(ans, 0, sizeof(*ans));
    ans->endpoint = h->endpoints[i];
    if (asprintf(&url, "%s%s", h->endpoints[i], path) < 0) {
        url = NULL;
        ctl_answer_fail(ans, CTL_EXIT_FAILED, "out of memory");
        goto done;
    }
    headers = h->auth;
    if (payload) {
        /* A private copy of the shared list with the content type appended. */
        headers = NULL;
        for (struct curl_slist *l = h->auth; l; l = l->next)
            if (!(headers = curl_slist_append(headers, l->data)))
                break;
        if (headers)
            headers = curl_slist_append(headers, "Content-Type: application/json");
        if (!headers) {
            ctl_answer_fail(ans, CTL_EXIT_FAILED, "out of memory");
            goto done;
        }
    }

    curl_easy_reset(h->curl);
    curl_easy_setopt(h->curl, CURLOPT_URL, url);
    curl_easy_setopt(h->curl, CURLOPT_PROTOCOLS_STR, "http,https");
    if (h->cacert)
        curl_easy_setopt(h->curl, CURLOPT_CAINFO, h->cacert);
    if (h->cert) {
        curl_easy_setopt(h->curl, CURLOPT_SSLCERT, h->cert);
        curl_easy_setopt(h->curl, CURLOPT_SSLKEY, h->key ? h->key : h->cert);
    }
    curl_easy_setopt(h->curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h->curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(h->curl, CURLOPT_ERRORBUFFER, curl_err);
    curl_easy_setopt(h->curl, CURLOPT_TIMEOUT_MS, timeout_ms > 0 ? timeout_ms : 1L);
    curl_easy_setopt(h->curl, CURLOPT_CONNECTTIMEOUT_MS,
                     connect_ms < timeout_ms ? connect_ms : timeout_ms);
    curl_easy_setopt(h->curl, CURLOPT_WRITEFUNCTION, ctl_http_on_data);
    curl_easy_setopt(h->curl, CURLOPT_WRITEDATA, &b);
    if (h->verbose > 1) {
        curl_easy_setopt(h->curl, CURLOPT_DEBUGFUNCTION, ctl_http_on_debug);
        curl_easy_setopt(h->curl, CURLOPT_VERBOSE, 1L);
    }
    if (payload) {
        curl_easy_setopt(h->curl, CURLOPT_POSTFIELDS, payload);
        curl_easy_setopt(h->curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(payload));
    }
    curl_easy_setopt(h->curl, CURLOPT_CUSTOMREQUEST, method);
    if (h->verbose) {
        char shown[CTL_VERBOSE_BODY_MAX + 4];
        ctl_one_line(shown, sizeof(shown), payload ? payload : "", CTL_VERBOSE_BODY_MAX);
        fprintf(stderr, CTL_PROG ": %s %s%s%s\n", method, url, payload ? " " : "", shown);
    }

    CURLcode res = curl_easy_perform(h->curl);
    if (res == CURLE_OK) {
        curl_easy_getinfo(h->curl, CURLINFO_RESPONSE_CODE, &ans->status);
        if (h->verbose) {
            double total = 0;
            curl_easy_getinfo(h->curl, CURLINFO_TOTAL_TIME, &total);
            fprintf(stderr, CTL_PROG ": HTTP %ld from %s in %.3f s, %zu bytes\n", ans->status,
                    h->endpoints[i], total, b.len);
        }
        ctl_http_classify(ans, &b);
        if (ans->status == HTTP_UNAVAILABLE) {
            /* Not the lease holder, or its store is down: nothing was done; ask another. */
            snprintf(reason, reasonlen, "%s", ans->message);
            result = CTL_ATTEMPT_NEXT;
        }
        goto done;
    }

    long sent = 0;
    curl_easy_getinfo(h->curl, CURLINFO_REQUEST_SIZE, &sent);
    const char *why = curl_err[0] ? curl_err : curl_easy_strerror(res);
    if (b.too_large) {
        ctl_answer_fail(ans, CTL_EXIT_UNREACHABLE, "the answer is larger than %u MiB",
                        CTL_ANSWER_MAX >> 20);
    } else if (sent == 0 || (is_get && res != CURLE_OPERATION_TIMEDOUT)) {
        /* Never reached a server (or only asked a question): the next endpoint may answer. */
        snprintf(reason, reasonlen, "%s: %s", h->endpoints[i], why);
        result = CTL_ATTEMPT_NEXT;
    } else if (res == CURLE_OPERATION_TIMEDOUT) {
        ctl_answer_fail(ans, CTL_EXIT_TIMEOUT, "no answer within %g s%s", timeout_s,
                        is_get ? "" : "; the operation may still complete");
    } else {
        ctl_answer_fail(ans, CTL_EXIT_UNREACHABLE, "%s; the operation may have taken effect", why);
    }
    if (h->verbose && result == CTL_ATTEMPT_NEXT)
        fprintf(stderr, CTL_PROG ": %s\n", reason);

done:
    if (headers != h->auth)
        curl_slist_free_all(headers);
    free(b.data);
    free(url);
    return result;
}

ctl_exit ctl_http_request(ctl_http *h, const char *method, const char *path, const json_t *body,
                          double timeout_s, ctl_answer *ans)
{
    char *payload = NULL;
    char reason[CTL_MESSAGE_MAX];
    char skipped_all[CTL_MESSAGE_MAX] = "";
    size_t skipped = 0, used = 0;

    memset(ans, 0, sizeof(*ans));
    if (body && !(payload = json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY))) {
        snprintf(ans->message, sizeof(ans->message), "out of memory");
        ans->rc = CTL_EXIT_FAILED;
        return ans->rc;
    }
    for (size_t tried = 0; tried < h->n_endpoints; tried++) {
        size_t i = (h->current + tried) % h->n_endpoints;
        reason[0] = '\0';
        if (ctl_http_attempt(h, i, method, path, payload, timeout_s, ans, reason, sizeof(reason)) ==
            CTL_ATTEMPT_DONE) {
            h->current = i;
            goto done;
        }
        /* Collect every endpoint's reason: "a: refused; b: not the lease holder (HTTP 503)". */
        if (used < sizeof(skipped_all))
            used += (size_t)snprintf(skipped_all + used, sizeof(skipped_all) - used, "%s%s",
                                     skipped ? "; " : "", reason);
        skipped++;
    }
    if (skipped > 1)
        snprintf(ans->message, sizeof(ans->message), "no endpoint could serve the request: %s",
                 skipped_all);
    else
        snprintf(ans->message, sizeof(ans->message), "%s", skipped_all);
    ans->rc = CTL_EXIT_UNREACHABLE;
done:
    free(payload);
    return ans->rc;
}

int ctl_http_tls(ctl_http *h, const char *cacert, const char *cert, const char *key, char *err,
                 size_t errlen)
{
    if (key && !cert) {
        snprintf(err, errlen, "--key needs --cert");
        return -1;
    }
    if (!cacert && !cert)
        return 0;
    for (size_t i = 0; i < h->n_endpoints; i++) {
        if (strncasecmp(h->endpoints[i], "https://", 8) != 0) {
            snprintf(err, errlen, "%s is not https://: with --cacert or --cert every endpoint "
                     "must use TLS", h->endpoints[i]);
            return -1;
        }
    }
    h->cacert = cacert;
    h->cert = cert;
    h->key = key;
    return 0;
}
