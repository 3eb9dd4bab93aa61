/* ha_patroni.c - [agent] ha_source = patroni: whom Patroni names leader, from its REST API.
 *
 * A thread of its own (a member whose Patroni hangs must never delay a probe) asks the members'
 * GET /cluster in turn, every health_interval, each with health_timeout, starting with the
 * member that answered last; the first answer ends the round. /cluster is what every member
 * serves from its view of the DCS, so one answering member is enough, and the URLs of the
 * members are all the operator configures (no DCS client, no scope, no etcd credentials here).
 * The leader member's own Patroni is asked too (GET /liveness beside its api_url, which answers
 * without asking PostgreSQL, so that a leader busy restarting is not taken for dead): a leader
 * whose Patroni
 * died or hangs renews its key no more, and its PostgreSQL, still a primary, would take writes
 * right up to the key's expiry and after it, until the agent heard of it; two failures in a row
 * and the agent takes writes away from it at once, as HAProxy's GET /primary check does.
 * The thread tells the event loop over a socketpair when what it learned changes: the member
 * whose role is "leader" (none while the leader key is absent) and whether its Patroni answers,
 * or that no member answered a whole round. The loop maps that member to a [node.NAME] by host and port (else by name) and
 * decides again (leader.c): Patroni's word only ever takes writes away from a node; a probe
 * still has to see its leader out of recovery before a session goes there.
 */
#include "agent.h"
#include "http.h"
#include "log.h"

#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HA_URLS_MAX      16          /* members' URLs kept from ha_patroni_urls */
#define HA_URL_MAX       256         /* one base URL, "/cluster" appended */
#define HA_ANSWER_MAX    (256 * 1024) /* a /cluster answer larger than this is not Patroni's */
#define HA_LEADER_FALL   2           /* failed asks of the leader's own Patroni before it is
                                        taken for dead */

/* What the poll thread tells the event loop. */
typedef struct ha_msg {
    uint32_t view;                /* ha_view: ANSWERED or SILENT */
    char member[CONFIG_NAME_MAX]; /* Patroni's leader member, "" when it names none */
    char host[CONFIG_HOST_MAX];   /* that member's PostgreSQL host and port, as Patroni says */
    int port;
    uint32_t leader_alive;        /* the leader's own Patroni answers (or did until
                                     HA_LEADER_FALL asks ago) */
    char detail[320];             /* the URL that answered, or why the last one failed */
} ha_msg;

/* The poll thread's own settings (copied at start: ha_source and its URLs are restart-only). */
typedef struct ha_thread {
    char urls[HA_URLS_MAX][HA_URL_MAX];
    int n_urls;
    int current;      /* the URL tried first: the last that answered */
    long interval_ms; /* health_interval */
    long timeout_ms;  /* health_timeout, per request */
    int fd;           /* our end of the socketpair */
    CURL *curl;
} ha_thread;

/* Split ha_patroni_urls into t->urls ("/" at the end dropped). Returns how many. */
static int ha_parse_urls(ha_thread *t, const char *list)
{
    const char *p = list;
    t->n_urls = 0;
    while (*p && t->n_urls < HA_URLS_MAX) {
        while (*p == ',' || *p == ' ' || *p == '\t')
            p++;
        const char *end = p;
        while (*end && *end != ',')
            end++;
        size_t len = (size_t)(end - p);
        while (len && (p[len - 1] == ' ' || p[len - 1] == '\t' || p[len - 1] == '/'))
            len--;
        if (len && len < HA_URL_MAX - sizeof("/cluster")) {
            memcpy(t->urls[t->n_urls], p, len);
            t->urls[t->n_urls][len] = '\0';
            t->n_urls++;
        } else if (len) {
            log_error("ha_patroni_urls: \"%.*s\" is longer than %zu characters; ignored",
                      (int)(len > 60 ? 60 : len), p, HA_URL_MAX - sizeof("/cluster"));
        }
        p = end;
    }
    return t->n_urls;
}

/* Read Patroni's GET /cluster answer into m (view ANSWERED) and the leader's api_url ("" when
 * none). Returns 0, or -1 with why in m. */
static int ha_read_cluster(const char *text, ha_msg *m, char *api_url, size_t api_len)
{
    json_error_t jerr;
    json_t *root = json_loads(text, 0, &jerr);
    json_t *members = root ? json_object_get(root, "members") : NULL;
    int rc = -1;
    if (!json_is_array(members)) {
        snprintf(m->detail, sizeof(m->detail), "the answer is not Patroni's /cluster (%s)",
                 root ? "no members array" : jerr.text);
        goto done;
    }
    m->view = HA_VIEW_ANSWERED;
    m->member[0] = m->host[0] = '\0';
    m->port = 0;
    api_url[0] = '\0';
    size_t i;
    json_t *mem;
    json_array_foreach(members, i, mem) {
        const char *role = json_string_value(json_object_get(mem, "role"));
        const char *name = json_string_value(json_object_get(mem, "name"));
        if (!role || !name || strcmp(role, "leader") != 0)
            continue;
        const char *host = json_string_value(json_object_get(mem, "host"));
        json_t *port = json_object_get(mem, "port");
        snprintf(m->member, sizeof(m->member), "%s", name);
        snprintf(m->host, sizeof(m->host), "%s", host ? host : "");
        m->port = json_is_integer(port) ? (int)json_integer_value(port) : 0;
        const char *api = json_string_value(json_object_get(mem, "api_url"));
        snprintf(api_url, api_len, "%s", api ? api : "");
        break;
    }
    rc = 0;
done:
    json_decref(root);
    return rc;
}

/* GET url with health_timeout into b. Returns the HTTP status, 0 when there was no answer (why
 * in err). */
static long ha_get(ha_thread *t, const char *url, http_buffer *b, char *err, size_t len)
{
    long status = 0;
    curl_easy_reset(t->curl);
    curl_easy_setopt(t->curl, CURLOPT_URL, url);
    curl_easy_setopt(t->curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(t->curl, CURLOPT_TIMEOUT_MS, t->timeout_ms);
    curl_easy_setopt(t->curl, CURLOPT_CONNECTTIMEOUT_MS, t->timeout_ms);
    curl_easy_setopt(t->curl, CURLOPT_WRITEFUNCTION, http_collect);
    curl_easy_setopt(t->curl, CURLOPT_WRITEDATA, b);
    CURLcode cc = curl_easy_perform(t->curl);
    if (cc != CURLE_OK) {
        snprintf(err, len, "%s: %s", url, b->too_long ? "answer too large" : curl_easy_strerror(cc));
        return 0;
    }
    curl_easy_getinfo(t->curl, CURLINFO_RESPONSE_CODE, &status);
    return status;
}

/* One GET /cluster on url. Returns 0 with m and the leader's api_url filled, or -1 with why in
 * m->detail. */
static int ha_ask(ha_thread *t, const char *base, ha_msg *m, char *api_url, size_t api_len)
{
    char url[HA_URL_MAX + 16];
    http_buffer b = {.max = HA_ANSWER_MAX};
    int rc = -1;
    snprintf(url, sizeof(url), "%s/cluster", base);
    long status = ha_get(t, url, &b, m->detail, sizeof(m->detail));
    if (status == 0)
        goto done;
    if (status != 200) {
        snprintf(m->detail, sizeof(m->detail), "%s: HTTP status %ld", url, status);
        goto done;
    }
    if (ha_read_cluster(b.data ? b.data : "", m, api_url, api_len) != 0) {
        log_debug("ha_source = patroni: %s: %s", url, m->detail);
        goto done;
    }
    snprintf(m->detail, sizeof(m->detail), "%s", url);
    rc = 0;
done:
    free(b.data);
    return rc;
}

static void ha_sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Does the leader's own Patroni answer? Its api_url is BASE/patroni; GET BASE/liveness answers
 * 200 while Patroni's loop runs, without a query to PostgreSQL (GET /patroni makes one, and is
 * slow while PostgreSQL restarts). Not asked again when the member that just answered /cluster
 * is the leader. */
static bool ha_leader_answers(ha_thread *t, const char *api_url, const char *answered)
{
    char err[320], url[HA_URL_MAX + 16];
    http_buffer b = {.max = HA_ANSWER_MAX};
    if (!api_url[0])
        return true; /* nothing to ask: Patroni's word on the key is all there is */
    size_t n = strlen(api_url);
    size_t suffix = sizeof("/patroni") - 1;
    if (n >= suffix && strcmp(api_url + n - suffix, "/patroni") == 0)
        n -= suffix;
    if (strlen(answered) == n && strncmp(api_url, answered, n) == 0)
        return true; /* the leader answered /cluster itself */
    snprintf(url, sizeof(url), "%.*s/liveness", (int)n, api_url);
    long status = ha_get(t, url, &b, err, sizeof(err));
    free(b.data);
    if (status != 200)
        log_debug("ha_source = patroni: the leader's Patroni: %s", status ? "not 200" : err);
    return status == 200;
}

static void *ha_main(void *arg)
{
    ha_thread *t = arg;
    ha_msg last = {.view = HA_VIEW_UNKNOWN};
    char api_url[HA_URL_MAX];
    int leader_fails = 0; /* failed asks of the current leader's own Patroni in a row */
    for (;;) {
        ha_msg m = {.view = HA_VIEW_SILENT, .leader_alive = 1};
        for (int k = 0; k < t->n_urls; k++) {
            int u = (t->current + k) % t->n_urls;
            if (ha_ask(t, t->urls[u], &m, api_url, sizeof(api_url)) == 0) {
                t->current = u;
                break;
            }
            m.view = HA_VIEW_SILENT; /* the detail is the last failure's */
        }
        if (m.view == HA_VIEW_ANSWERED && m.member[0]) {
            if (strcmp(m.member, last.member) != 0)
                leader_fails = 0;
            if (ha_leader_answers(t, api_url, t->urls[t->current]))
                leader_fails = 0;
            else if (leader_fails < HA_LEADER_FALL)
                leader_fails++;
            m.leader_alive = leader_fails < HA_LEADER_FALL;
        }
        bool changed = m.view != last.view || strcmp(m.member, last.member) != 0 ||
                       strcmp(m.host, last.host) != 0 || m.port != last.port ||
                       m.leader_alive != last.leader_alive;
        if (changed) {
            if (send(t->fd, &m, sizeof(m), MSG_NOSIGNAL) != (ssize_t)sizeof(m)) {
                log_error("ha_source = patroni: cannot tell the agent's loop: %s",
                          strerror(errno));
                break; /* the loop has gone */
            }
            last = m;
        }
        ha_sleep_ms(t->interval_ms);
    }
    curl_easy_cleanup(t->curl);
    close(t->fd);
    free(t);
    return NULL;
}

int ha_patroni_start(agent *a)
{
    int pair[2] = {-1, -1};
    pthread_t tid;
    ha_thread *t = NULL;

    if (a->cfg->ha_source != HA_SOURCE_PATRONI)
        return -1;
    t = calloc(1, sizeof(*t));
    if (!t) {
        log_error("ha_source = patroni: out of memory; deciding from probes alone");
        return -1;
    }
    if (ha_parse_urls(t, a->cfg->ha_patroni_urls) == 0) {
        log_error("ha_source = patroni: no URL in ha_patroni_urls; deciding from probes alone");
        goto failed;
    }
    t->interval_ms = a->cfg->health_interval_ms;
    t->timeout_ms = a->cfg->health_timeout_ms;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
        log_error("ha_source = patroni: socketpair: %s; deciding from probes alone",
                  strerror(errno));
        goto failed;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (!(t->curl = curl_easy_init())) {
        log_error("ha_source = patroni: libcurl cannot start; deciding from probes alone");
        goto failed;
    }
    t->fd = pair[1];
    if (pthread_create(&tid, NULL, ha_main, t) != 0) {
        log_error("ha_source = patroni: cannot start its thread; deciding from probes alone");
        goto failed;
    }
    pthread_detach(tid);
    log_info("ha_source = patroni: asking %d member(s) for Patroni's leader every %ld ms "
             "(first %s)", t->n_urls, t->interval_ms, t->urls[0]);
    return pair[0];
failed:
    if (t && t->curl)
        curl_easy_cleanup(t->curl);
    free(t);
    if (pair[0] >= 0) {
        close(pair[0]);
        close(pair[1]);
    }
    return -1;
}

/* The node a Patroni member is: same host and port, else same name; -1 for none. */
static int ha_node_of(const agent *a, const char *member, const char *host, int port)
{
    if (!member[0])
        return -1;
    for (int i = 0; i < a->n_nodes; i++)
        if (port && a->nodes[i].view.port == port && strcmp(a->nodes[i].view.host, host) == 0)
            return i;
    for (int i = 0; i < a->n_nodes; i++)
        if (strcmp(a->nodes[i].view.name, member) == 0)
            return i;
    return -1;
}

void ha_patroni_remap(agent *a)
{
    if (a->ha_on)
        a->ha_leader = ha_node_of(a, a->ha_member, a->ha_host, a->ha_port);
}

void ha_patroni_on_msg(evutil_socket_t fd, short what, void *arg)
{
    agent *a = arg;
    ha_msg m;
    (void)what;
    bool changed = false;
    while (recv(fd, &m, sizeof(m), MSG_DONTWAIT) == (ssize_t)sizeof(m)) {
        m.member[sizeof(m.member) - 1] = m.host[sizeof(m.host) - 1] = '\0';
        m.detail[sizeof(m.detail) - 1] = '\0';
        int was = a->ha_view;
        if (m.view == HA_VIEW_SILENT) {
            if (was != HA_VIEW_SILENT)
                log_warning("ha_source = patroni: no Patroni member answers (last: %s): "
                            "deciding from probes alone until one does", m.detail);
            a->ha_view = HA_VIEW_SILENT;
            changed = true;
            continue;
        }
        int node = ha_node_of(a, m.member, m.host, m.port);
        if (was == HA_VIEW_SILENT)
            log_warning("ha_source = patroni: Patroni answers again (%s)", m.detail);
        if (!m.member[0])
            log_warning("ha_source = patroni: Patroni names no leader (its leader key is "
                        "absent): no node takes writes until it names one that a probe sees "
                        "as a primary");
        else if (!m.leader_alive)
            log_warning("ha_source = patroni: Patroni names %s leader, but its own Patroni does "
                        "not answer %d asks in a row (dead or hung: its key will expire): no "
                        "writes go to it", m.member, HA_LEADER_FALL);
        else if (node < 0)
            log_warning("ha_source = patroni: Patroni names %s (%s:%d) leader, which is no "
                        "[node.NAME] here: no writes until it names a configured node",
                        m.member, m.host, m.port);
        else
            log_info("ha_source = patroni: Patroni names %s leader (node %s)", m.member,
                     a->nodes[node].view.name);
        a->ha_view = HA_VIEW_ANSWERED;
        a->ha_leader = node;
        a->ha_leader_alive = m.leader_alive != 0;
        snprintf(a->ha_member, sizeof(a->ha_member), "%s", m.member);
        snprintf(a->ha_host, sizeof(a->ha_host), "%s", m.host);
        a->ha_port = m.port;
        changed = true;
    }
    if (changed)
        leader_ha_changed(a);
}
