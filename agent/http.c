/* http.c - the agent's HTTP client for the control plane (libcurl, one handle per thread). */
#include "http.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HTTP_REPLY_MAX (4 * 1024 * 1024) /* a longer answer is garbage */

size_t http_collect(char *ptr, size_t size, size_t nmemb, void *arg)
{
    http_buffer *b = arg;
    size_t n = size * nmemb;
    if (b->len + n > (b->max ? b->max : HTTP_REPLY_MAX)) {
        b->too_long = true;
        return 0; /* makes curl fail the transfer */
    }
    char *grown = realloc(b->data, b->len + n + 1);
    if (!grown)
        return 0;
    b->data = grown;
    memcpy(b->data + b->len, ptr, n);
    b->len += n;
    b->data[b->len] = '\0';
    return n;
}

int http_client_init(http_client *c, const config *cfg)
{
    const char *endpoints = cfg->control_endpoint;
    char list[1024];
    char *save = NULL;
    memset(c, 0, sizeof(*c));
    c->curl = curl_easy_init();
    if (!c->curl)
        return -1;
    snprintf(list, sizeof(list), "%s", endpoints);
    for (char *e = strtok_r(list, ", ", &save); e && c->n_endpoints < HTTP_ENDPOINTS_MAX;
         e = strtok_r(NULL, ", ", &save)) {
        size_t len = strlen(e);
        while (len > 0 && e[len - 1] == '/')
            e[--len] = '\0'; /* paths start with '/' */
        snprintf(c->endpoints[c->n_endpoints++], sizeof(c->endpoints[0]), "%s", e);
    }
    snprintf(c->token, sizeof(c->token), "%s", cfg->control_token);
    c->timeout_ms = cfg->control_request_timeout_ms;
    c->ca_file = cfg->control_ca_file;
    c->cert_file = cfg->control_cert_file;
    c->key_file = cfg->control_key_file;
    return 0;
}

void http_client_free(http_client *c)
{
    if (c->curl)
        curl_easy_cleanup(c->curl);
    c->curl = NULL;
}

/* One attempt against one endpoint. Returns the status, 0 on a transport failure. */
static long http_once(http_client *c, const char *base, const char *method, const char *path,
                      const char *body, json_t **reply, long extra_ms)
{
    CURL *curl = c->curl;
    char url[512], auth[300];
    http_buffer buf = {0};
    struct curl_slist *headers = NULL;
    long status = 0;

    snprintf(url, sizeof(url), "%s%s", base, path);
    snprintf(auth, sizeof(auth), "Authorization: Bearer %s", c->token);
    headers = curl_slist_append(headers, auth);
    headers = curl_slist_append(headers, "Content-Type: application/json");
    headers = curl_slist_append(headers, "Expect:");
    curl_easy_reset(curl);
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method);
    if (body)
        curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, c->timeout_ms + extra_ms);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, c->timeout_ms);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L); /* threads: no SIGALRM */
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, http_collect);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &buf);
    curl_easy_setopt(curl, CURLOPT_USERAGENT, "pgrelay-agent/" PGRELAY_VERSION);
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
    if (c->ca_file[0]) /* else the system's CAs */
        curl_easy_setopt(curl, CURLOPT_CAINFO, c->ca_file);
    if (c->cert_file[0]) {
        curl_easy_setopt(curl, CURLOPT_SSLCERT, c->cert_file);
        curl_easy_setopt(curl, CURLOPT_SSLKEY, c->key_file[0] ? c->key_file : c->cert_file);
    }

    CURLcode rc = curl_easy_perform(curl);
    if (rc != CURLE_OK) {
        snprintf(c->error, sizeof(c->error), "%s: %s", base,
                 buf.too_long ? "answer too long" : curl_easy_strerror(rc));
        goto done;
    }
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    if (buf.len > 0) {
        json_error_t err;
        json_t *j = json_loadb(buf.data, buf.len, 0, &err);
        if (!j && status < 300 && status != 204) {
            snprintf(c->error, sizeof(c->error), "%s: answer is not JSON (%s)", base, err.text);
            status = 0; /* garbage counts as no answer */
            goto done;
        }
        if (j && reply)
            *reply = j;
        else if (j)
            json_decref(j);
    }
    if (status >= 400) {
        json_t *e = reply && *reply ? json_object_get(*reply, "error") : NULL;
        snprintf(c->error, sizeof(c->error), "%s: HTTP %ld%s%s", base, status, e ? ": " : "",
                 e && json_is_string(e) ? json_string_value(e) : "");
    }
done:
    curl_slist_free_all(headers);
    free(buf.data);
    return status;
}

long http_request(http_client *c, const char *method, const char *path, json_t *body,
                  json_t **reply, long extra_ms)
{
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    long status = 0;
    if (reply)
        *reply = NULL;
    for (int k = 0; k < c->n_endpoints; k++) {
        int i = (c->current + k) % c->n_endpoints;
        if (reply && *reply) {
            json_decref(*reply);
            *reply = NULL;
        }
        status = http_once(c, c->endpoints[i], method, path, text, reply, extra_ms);
        if (status != 0 && status != 503) {
            c->current = i;
            break;
        }
    }
    free(text);
    return status;
}
