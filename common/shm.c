/* shm.c - creating the shared segment and the lock-free protocols for routes and session slots. */
#include "shm.h"
#include "log.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <sys/un.h>
#include <unistd.h>

int64_t shm_now_us(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (int64_t)tv.tv_sec * 1000000 + tv.tv_usec;
}

int64_t shm_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

const uint32_t shm_latency_bounds_us[SHM_LATENCY_BOUNDS] = {
    100,    250,    500,     1000,    2500,    5000,     10000,    25000,    50000,
    100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, 30000000, 60000000,
};

shm_segment *shm_create(const config *cfg, int *fd_out)
{
    /* Beyond max_client_conn, a few slots let refused clients get a proper 53300 answer. */
    size_t max_sessions = (size_t)cfg->max_client_conn + SHM_REFUSE_RESERVE;
    size_t latency_offset = sizeof(shm_segment) + max_sessions * sizeof(shm_session);
    latency_offset = (latency_offset + _Alignof(shm_node_stats) - 1) / _Alignof(shm_node_stats) *
                     _Alignof(shm_node_stats);
    size_t rings_offset = latency_offset +
                          (size_t)cfg->workers * SHM_NODE_COUNTS * sizeof(shm_node_stats);
    rings_offset = (rings_offset + _Alignof(shm_plan_ring) - 1) / _Alignof(shm_plan_ring) *
                   _Alignof(shm_plan_ring);
    size_t plans_offset = rings_offset + (size_t)cfg->workers * sizeof(shm_plan_ring);
    plans_offset = (plans_offset + 63) / 64 * 64;
    size_t size = plans_offset + sizeof(shm_plans);
    long page = sysconf(_SC_PAGESIZE);
    size = (size + (size_t)page - 1) / (size_t)page * (size_t)page;

    int fd = memfd_create("pgrelay-shm", 0);
    if (fd < 0) {
        log_error("cannot create shared memory: memfd_create: %s", strerror(errno));
        return NULL;
    }
    if (ftruncate(fd, (off_t)size) != 0) {
        log_error("cannot size shared memory to %zu bytes: %s", size, strerror(errno));
        close(fd);
        return NULL;
    }
    shm_segment *shm = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (shm == MAP_FAILED) {
        log_error("cannot map shared memory (%zu bytes): %s", size, strerror(errno));
        close(fd);
        return NULL;
    }
    /* A fresh memfd is zero-filled: every slot starts SESSION_FREE, every pid 0. */
    shm->magic = SHM_MAGIC;
    shm->size = size;
    shm->n_workers = (uint32_t)cfg->workers;
    shm->max_sessions = (uint32_t)max_sessions;
    shm->latency_offset = latency_offset;
    shm->plan_rings_offset = rings_offset;
    shm->plans_offset = plans_offset;
    shm->master_pid = (int32_t)getpid();
    shm->started_at_us = shm_now_us();
    atomic_store(&shm->next_session_id, 1);
    *fd_out = fd;
    return shm;
}

/* Fill the half readers are not using with len bytes of src (halves are stride apart), then
 * make it current. */
static void shm_dbuf_publish(shm_dbuf *d, char *halves, size_t stride, const void *src,
                             size_t len)
{
    uint32_t next = 1 - atomic_load_explicit(&d->current, memory_order_relaxed);
    /* Mark odd even if a previous writer died with it odd: readers never use this half until
     * current points at it, and a reader that raced a flip sees the change and retries. */
    uint32_t seq = atomic_load_explicit(&d->seq[next], memory_order_relaxed) | 1u;
    atomic_store_explicit(&d->seq[next], seq, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    memcpy(halves + next * stride, src, len);
    atomic_store_explicit(&d->seq[next], seq + 1, memory_order_release);
    atomic_store_explicit(&d->current, next, memory_order_release);
    atomic_fetch_add_explicit(&d->version, 1, memory_order_release);
}

/* Copy len bytes of the current half consistently, then tail(out) more when tail is given (a
 * length read from the copied bytes, which a torn copy may get wrong: tail bounds it, and the
 * sequence check retries). Returns the version the copy belongs to. */
static uint64_t shm_dbuf_read(shm_dbuf *d, const char *halves, size_t stride, size_t len,
                              size_t (*tail)(const void *copied), void *out)
{
    for (;;) {
        uint64_t version = atomic_load_explicit(&d->version, memory_order_acquire);
        uint32_t cur = atomic_load_explicit(&d->current, memory_order_acquire);
        uint32_t s1 = atomic_load_explicit(&d->seq[cur], memory_order_acquire);
        if (s1 & 1u)
            continue; /* the writer flipped and reuses this half; the other half is current */
        const char *half = halves + cur * stride;
        memcpy(out, half, len);
        if (tail) {
            size_t more = tail(out);
            memcpy((char *)out + len, half + len, more);
        }
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&d->seq[cur], memory_order_relaxed) == s1)
            return version;
    }
}

void shm_routes_publish(shm_segment *shm, const shm_route_table *tab)
{
    shm_dbuf_publish(&shm->routes.d, (char *)shm->routes.tab, sizeof(*tab), tab, sizeof(*tab));
}

uint64_t shm_routes_read(shm_segment *shm, shm_route_table *out)
{
    return shm_dbuf_read(&shm->routes.d, (const char *)shm->routes.tab, sizeof(*out),
                         sizeof(*out), NULL, out);
}

size_t shm_tls_files_size(const shm_tls_files *tls)
{
    uint64_t used = 0;
    for (int i = 0; i < SHM_TLS_FILES; i++)
        used += tls->len[i];
    if (used > SHM_TLS_BYTES)
        used = SHM_TLS_BYTES;
    return offsetof(shm_tls_files, data) + (size_t)used;
}

void shm_settings_publish(shm_segment *shm, const config *cfg, const shm_tls_files *tls)
{
    /* Built in one piece so that one copy fills the half: the configuration, then the files'
     * lengths and the bytes used. */
    static shm_settings_half next;
    size_t len = offsetof(shm_settings_half, tls.data);
    memcpy(&next.cfg, cfg, sizeof(*cfg));
    memset(&next.tls, 0, offsetof(shm_tls_files, data));
    if (tls) {
        len = offsetof(shm_settings_half, tls) + shm_tls_files_size(tls);
        memcpy(&next.tls, tls, shm_tls_files_size(tls));
    }
    shm_dbuf_publish(&shm->settings.d, (char *)shm->settings.half, sizeof(shm_settings_half),
                     &next, len);
}

uint64_t shm_settings_read(shm_segment *shm, config *out)
{
    return shm_dbuf_read(&shm->settings.d, (const char *)shm->settings.half,
                         sizeof(shm_settings_half), sizeof(*out), NULL, out);
}

/* The files' bytes after their lengths, copied already at the end of a shm_settings_half. */
static size_t shm_settings_tls_tail(const void *copied)
{
    const shm_settings_half *h = copied;
    return shm_tls_files_size(&h->tls) - offsetof(shm_tls_files, data);
}

uint64_t shm_settings_read_tls(shm_segment *shm, shm_settings_half *out)
{
    return shm_dbuf_read(&shm->settings.d, (const char *)shm->settings.half, sizeof(*out),
                         offsetof(shm_settings_half, tls.data), shm_settings_tls_tail, out);
}

int shm_node_resolve(shm_node *n)
{
    memset(&n->addr, 0, sizeof(n->addr));
    n->addrlen = 0;
    if (n->host[0] == '/') {
        struct sockaddr_un *un = (struct sockaddr_un *)&n->addr;
        un->sun_family = AF_UNIX;
        int len = snprintf(un->sun_path, sizeof(un->sun_path), "%s/.s.PGSQL.%d", n->host,
                           n->port);
        if (len < 0 || (size_t)len >= sizeof(un->sun_path)) {
            log_error("node %s: socket path %s/.s.PGSQL.%d is too long", n->name, n->host,
                      n->port);
            return -1;
        }
        n->addrlen = (socklen_t)sizeof(*un);
        return 0;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    char port[16];
    snprintf(port, sizeof(port), "%d", n->port);
    int rc = getaddrinfo(n->host, port, &hints, &res);
    if (rc != 0 || !res) {
        log_error("node %s: cannot resolve %s: %s", n->name, n->host, gai_strerror(rc));
        return -1;
    }
    memcpy(&n->addr, res->ai_addr, res->ai_addrlen);
    n->addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

void shm_routes_from_config(shm_route_table *tab, const config *cfg, uint64_t epoch)
{
    memset(tab, 0, sizeof(*tab));
    tab->epoch = epoch;
    tab->n_nodes = (uint32_t)cfg->n_nodes;
    tab->leader = config_first_primary(cfg);
    for (int i = 0; i < cfg->n_nodes; i++) {
        shm_node *n = &tab->nodes[i];
        const config_node *c = &cfg->nodes[i];
        snprintf(n->name, sizeof(n->name), "%s", c->name);
        snprintf(n->host, sizeof(n->host), "%s", c->host);
        n->port = c->port;
        n->role = c->role;
        n->health = shm_node_resolve(n) == 0 ? NODE_HEALTH_UNKNOWN : NODE_HEALTH_DOWN;
        /* Without probes the configured roles decide: replicas take read sessions. */
        n->readable = c->role == NODE_ROLE_REPLICA && n->health != NODE_HEALTH_DOWN;
        n->lag_bytes = -1;
    }
}

const char *shm_node_role_name(const shm_route_table *t, uint32_t i)
{
    const shm_node *n = &t->nodes[i];
    if (t->agent_pid == 0 && !n->probed)
        return n->role == NODE_ROLE_PRIMARY ? "primary" : "replica"; /* configured */
    if (!n->probed || n->health != NODE_HEALTH_UP)
        return "unknown";
    return n->in_recovery ? "replica" : "primary";
}

shm_session *shm_session_claim(shm_segment *shm, int worker, uint32_t hint)
{
    uint32_t n = shm->max_sessions;
    for (uint32_t k = 0; k < n; k++) {
        shm_session *s = &shm->sessions[(hint + k) % n];
        uint32_t expect = SESSION_FREE;
        if (atomic_load_explicit(&s->state, memory_order_relaxed) == SESSION_FREE &&
            atomic_compare_exchange_strong(&s->state, &expect, SESSION_STARTUP)) {
            shm_session_write_begin(s);
            s->worker = worker;
            s->id = atomic_fetch_add(&shm->next_session_id, 1);
            s->node = -1;
            s->node_name[0] = '\0';
            s->node_addrlen = 0;
            atomic_store(&s->backend_valid, 0);
            s->stmt_start_us = 0;
            s->stmt[0] = '\0';
            s->user[0] = s->database[0] = s->application_name[0] = s->tls[0] = '\0';
            shm_session_write_end(s);
            atomic_fetch_add(&shm->clients, 1);
            return s;
        }
    }
    return NULL;
}

void shm_session_release(shm_segment *shm, shm_session *s)
{
    /* An owner that stopped mid-update (closed while capturing a statement, or died) leaves
     * the seqlock odd; make it even so the next owner's brackets mean what they should. */
    if (atomic_load(&s->seq) & 1u)
        atomic_fetch_add(&s->seq, 1);
    atomic_fetch_sub(&shm->clients, 1);
    atomic_store(&s->backend_valid, 0);
    atomic_store_explicit(&s->state, SESSION_FREE, memory_order_release);
}

int shm_sessions_reclaim(shm_segment *shm, int worker)
{
    int freed = 0;
    for (uint32_t i = 0; i < shm->max_sessions; i++) {
        shm_session *s = &shm->sessions[i];
        if (atomic_load(&s->state) != SESSION_FREE && s->worker == worker) {
            shm_session_release(shm, s);
            freed++;
        }
    }
    return freed;
}

bool shm_session_snapshot(shm_session *s, shm_session *out)
{
    for (int tries = 0; tries < 1000; tries++) {
        uint32_t s1 = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (s1 & 1u)
            continue;
        memcpy((char *)out, (char *)s, sizeof(*out));
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&s->seq, memory_order_relaxed) == s1)
            return atomic_load(&out->state) != SESSION_FREE;
    }
    return false;
}

shm_node_count *shm_node_count_get(shm_segment *shm, const char *name)
{
    const size_t n = sizeof(shm->node_counts) / sizeof(shm->node_counts[0]);
    for (size_t i = 0; i < n; i++) {
        shm_node_count *c = &shm->node_counts[i];
        if (atomic_load_explicit(&c->used, memory_order_acquire) &&
            strncmp(c->name, name, sizeof(c->name)) == 0)
            return c;
    }
    return NULL;
}

void shm_node_count_ensure(shm_segment *shm, const char *name)
{
    const size_t n = sizeof(shm->node_counts) / sizeof(shm->node_counts[0]);
    if (shm_node_count_get(shm, name))
        return;
    for (size_t i = 0; i < n; i++) {
        shm_node_count *c = &shm->node_counts[i];
        if (!atomic_load(&c->used)) {
            snprintf(c->name, sizeof(c->name), "%s", name);
            atomic_store_explicit(&c->used, 1, memory_order_release);
            return;
        }
    }
}

void shm_history_add(shm_segment *shm, uint64_t epoch, const char *from, const char *to,
                     const char *reason)
{
    uint64_t i = atomic_load(&shm->history_count);
    shm_leader_event *e = &shm->history[i % SHM_HISTORY_MAX];
    e->at_us = shm_now_us();
    e->epoch = epoch;
    snprintf(e->from, sizeof(e->from), "%s", from ? from : "");
    snprintf(e->to, sizeof(e->to), "%s", to ? to : "");
    snprintf(e->reason, sizeof(e->reason), "%s", reason);
    atomic_store_explicit(&shm->history_count, i + 1, memory_order_release);
}

void shm_node_totals_read(shm_segment *shm, const shm_node_count *c, shm_node_totals *out)
{
    memset(out, 0, sizeof(*out));
    size_t i = shm_node_count_index(shm, c);
    for (uint32_t w = 0; w < shm->n_workers; w++) {
        const shm_node_stats *row = shm_node_stats_row(shm, w, i);
        for (unsigned b = 0; b <= SHM_LATENCY_BOUNDS; b++) {
            uint64_t n = atomic_load_explicit(&row->buckets[b], memory_order_relaxed);
            out->buckets[b] += n;
            out->count += n;
        }
        out->latency_us += atomic_load_explicit(&row->latency_us, memory_order_relaxed);
        out->statements += atomic_load_explicit(&row->statements, memory_order_relaxed);
        out->bytes_in += atomic_load_explicit(&row->bytes_in, memory_order_relaxed);
        out->bytes_out += atomic_load_explicit(&row->bytes_out, memory_order_relaxed);
        out->errors += atomic_load_explicit(&row->errors, memory_order_relaxed);
    }
}

double shm_latency_quantile_us(const shm_node_totals *h, double q)
{
    if (h->count == 0)
        return -1;
    double rank = q * (double)h->count;
    uint64_t below = 0;
    for (unsigned b = 0; b < SHM_LATENCY_BOUNDS; b++) {
        uint64_t n = h->buckets[b];
        if (n > 0 && (double)(below + n) >= rank) {
            double lo = b ? shm_latency_bounds_us[b - 1] : 0;
            double hi = shm_latency_bounds_us[b];
            return lo + (hi - lo) * (rank - (double)below) / (double)n;
        }
        below += n;
    }
    return shm_latency_bounds_us[SHM_LATENCY_BOUNDS - 1];
}

bool shm_plan_snapshot(shm_segment *shm, uint32_t i, shm_plan *out)
{
    shm_plan *p = &shm_plans_of(shm)->plans[i];
    for (int tries = 0; tries < 1000; tries++) {
        uint32_t s1 = atomic_load_explicit(&p->seq, memory_order_acquire);
        if (s1 & 1u)
            continue;
        memcpy((char *)out, (char *)p, sizeof(*out));
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&p->seq, memory_order_relaxed) == s1)
            return out->used != 0;
    }
    return false;
}
