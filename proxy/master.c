/* master.c - the master process: forks the workers, re-forks the ones that die, handles signals.
 *
 * Signal handlers only set flags and poke a self-pipe; the master's event loop does the work
 * (reaping with waitpid(WNOHANG), respawning with backoff, passing shutdowns on).
 */
#include "master.h"
#include "admin.h"
#include "httpd.h"
#include "channel.h"
#include "log.h"
#include "shm.h"
#include "tls.h"
#include "worker.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void master_uncount_sessions(master *m, int index);

#define RESPAWN_FIRST_DELAY_MS 100   /* after a worker that died young */
#define RESPAWN_MAX_DELAY_MS   10000 /* crash-loop ceiling */
#define RESPAWN_STABLE_MS      10000 /* a worker that lived this long resets the backoff */
#define STOP_KILL_GRACE_MS     5000  /* after the shutdown deadline, SIGKILL what is left */

static master *master_self; /* the one master of this process, for timer callbacks */
static volatile sig_atomic_t sig_child, sig_term, sig_int, sig_quit, sig_hup, sig_usr1;
static int signal_pipe[2] = {-1, -1};
/* PGRELAY_TEST_CHILD_DELAY_MS, a hook for the test suite only: every forked child waits this
 * long before it drops the master's signal handlers, which widens the fork window that the
 * blocked signals below must cover. 0 (unset) in production. */
static int master_test_child_delay_ms;

static void master_on_signal(int sig)
{
    int saved = errno;
    switch (sig) {
    case SIGCHLD:
        sig_child = 1;
        break;
    case SIGTERM:
        sig_term = 1;
        break;
    case SIGINT:
        sig_int = 1;
        break;
    case SIGQUIT:
        sig_quit = 1;
        break;
    case SIGHUP:
        sig_hup = 1;
        break;
    case SIGUSR1:
        sig_usr1 = 1;
        break;
    }
    ssize_t n = write(signal_pipe[1], "s", 1);
    (void)n;
    errno = saved;
}

static const int master_signals[] = {SIGCHLD, SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1};

static void master_install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = master_on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    for (size_t i = 0; i < sizeof(master_signals) / sizeof(master_signals[0]); i++)
        sigaction(master_signals[i], &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* Block the master's signals (the old mask into old) across fork(), so that none reaches a new
 * child while it still has the master's handlers: that handler would set the child's copy of
 * a flag and poke the master's pipe, and the signal (a SIGTERM at shutdown) would be lost. */
static void master_block_signals(sigset_t *old)
{
    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof(master_signals) / sizeof(master_signals[0]); i++)
        sigaddset(&set, master_signals[i]);
    sigprocmask(SIG_BLOCK, &set, old);
}

/* In a new child, with the master's signals still blocked: back to the default actions, then
 * the mask as it was before fork(). A signal that arrived meanwhile is delivered now, with its
 * default action (SIGTERM, SIGINT and SIGQUIT end a child that has no session yet). */
static void master_child_reset_signals(const sigset_t *old)
{
    if (master_test_child_delay_ms > 0) {
        struct timespec ts = {master_test_child_delay_ms / 1000,
                              (long)(master_test_child_delay_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
    }
    for (size_t k = 0; k < sizeof(master_signals) / sizeof(master_signals[0]); k++)
        signal(master_signals[k], SIG_DFL);
    sigprocmask(SIG_SETMASK, old, NULL);
}

static bool master_is_agent(const master *m, int i)
{
    return i >= m->n_workers;
}

static void master_on_child_channel(evutil_socket_t fd, short what, void *arg);

/* In the forked child: exec the agent with the segment and its channel end. */
static void master_exec_agent(master *m, int channel) __attribute__((noreturn));
static void master_exec_agent(master *m, int channel)
{
    char shm_fd[16], chan_fd[16];
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    /* Keep exactly these two descriptors across exec. */
    fcntl(channel, F_SETFD, 0);
    fcntl(m->shm_fd, F_SETFD, 0);
    snprintf(shm_fd, sizeof(shm_fd), "%d", m->shm_fd);
    snprintf(chan_fd, sizeof(chan_fd), "%d", channel);
    setenv("PGRELAY_SHM_FD", shm_fd, 1);
    setenv("PGRELAY_CHANNEL_FD", chan_fd, 1);
    char *const argv[] = {m->agent_path, "-c", m->cfg->path, NULL};
    execv(m->agent_path, argv);
    log_error("cannot start the agent %s: %s", m->agent_path, strerror(errno));
    _exit(127);
}

static void master_spawn(master *m, int i)
{
    master_child *c = &m->children[i];
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
        log_error("cannot create the channel for worker %d: %s; retrying in %d ms", i,
                  strerror(errno), RESPAWN_MAX_DELAY_MS);
        struct timeval tv = {RESPAWN_MAX_DELAY_MS / 1000, 0};
        evtimer_add(&c->ev_respawn, &tv);
        return;
    }
    sigset_t old_mask;
    master_block_signals(&old_mask);
    pid_t pid = fork();
    if (pid != 0)
        sigprocmask(SIG_SETMASK, &old_mask, NULL);
    if (pid < 0) {
        log_error("cannot fork worker %d: %s; retrying in %d ms", i, strerror(errno),
                  RESPAWN_MAX_DELAY_MS);
        close(pair[0]);
        close(pair[1]);
        struct timeval tv = {RESPAWN_MAX_DELAY_MS / 1000, 0};
        evtimer_add(&c->ev_respawn, &tv);
        return;
    }
    if (pid == 0) {
        /* Named at once, so that ps, top and killall tell the children from the master. */
        prctl(PR_SET_NAME, master_is_agent(m, i) ? "pgrelay-agent" : "pgrelay-worker");
        /* The worker sets up its own handlers; drop the master's, and its descriptors. */
        master_child_reset_signals(&old_mask);
        close(signal_pipe[0]);
        close(signal_pipe[1]);
        close(pair[0]);
        for (int k = 0; k < m->n_children; k++)
            if (m->children[k].channel_fd >= 0)
                close(m->children[k].channel_fd);
        admin_close_in_child();
        httpd_close_in_child();
        if (master_is_agent(m, i))
            master_exec_agent(m, pair[1]);
        worker_main(i, m->cfg, m->shm, m->listen_fds, m->n_workers, pair[1]);
    }
    close(pair[1]);
    c->channel_fd = pair[0];
    event_assign(&c->ev_channel, m->base, c->channel_fd, EV_READ | EV_PERSIST,
                 master_on_child_channel, c);
    event_add(&c->ev_channel, NULL);
    c->pid = pid;
    c->started_us = shm_mono_us();
    if (master_is_agent(m, i)) {
        log_info("agent started (pid %d): %s", (int)pid, m->agent_path);
        return;
    }
    /* the heartbeat's grace while the worker starts (worker.c, WORKER_STUCK_MS) */
    atomic_store(&m->shm->workers[i].heartbeat_us, worker_clock_us());
    atomic_store(&m->shm->workers[i].pid, pid);
    m->shm->workers[i].started_at_us = c->started_us;
    log_info("worker %d started (pid %d)", i, (int)pid);
    master_poke_workers(m); /* its neighbour stops accepting from its sockets */
}

/* A message from a worker or the agent. */
static void master_on_child_channel(evutil_socket_t fd, short what, void *arg)
{
    master *m = master_self;
    master_child *c = arg;
    channel_msg msg;
    (void)what;
    for (;;) {
        ssize_t n = recv(fd, &msg, sizeof(msg), MSG_DONTWAIT);
        if (n == 0) {
            event_del(&c->ev_channel); /* the child is gone; reaping closes the fd */
            return;
        }
        if (n != (ssize_t)sizeof(msg))
            return;
        bool from_agent = master_is_agent(m, (int)(c - m->children));
        if (from_agent && msg.cmd == CHANNEL_LOOK_AGAIN) {
            master_poke_workers(m);
        } else if (from_agent && msg.cmd == CHANNEL_MAINTENANCE) {
            if ((msg.arg & 1) != (atomic_load(&m->shm->maintenance) != 0)) /* not a renewal */
                log_info("control plane: maintenance %s", (msg.arg & 1) ? "on" : "off");
            master_set_maintenance(m, (msg.arg & 1) != 0, (int)(msg.arg >> 1));
        } else if (from_agent && msg.cmd == CHANNEL_READ_ONLY) {
            bool on = msg.arg != 0;
            if ((atomic_exchange(&m->shm->read_only_role, on ? 1u : 0u) != 0) != on)
                log_warning("control plane: this proxy is %s", on ? "read-only now (proxy option "
                            "read_only): new sessions on the write port go where the read-only "
                            "port's would" : "no longer read-only: the write port routes writes "
                            "again");
        } else if (from_agent && msg.cmd == CHANNEL_RELOAD) {
            char why[256];
            log_info("control plane: reloading %s", m->cfg->path);
            master_reload(m, why, sizeof(why));
        } else if (!from_agent && msg.cmd == CHANNEL_PROBE_NOW) {
            /* Many sessions may fail at once: one request per 100 ms is plenty. */
            int64_t now = shm_mono_us();
            master_child *a = m->n_children > m->n_workers ? &m->children[m->n_workers] : NULL;
            if (a && a->channel_fd >= 0 && now - m->last_probe_request_us > 100000) {
                m->last_probe_request_us = now;
                channel_send(a->channel_fd, CHANNEL_PROBE_NOW, 0);
            }
        }
    }
}

int master_set_leader(master *m, int node, bool force)
{
    if (m->n_children == m->n_workers)
        return -1;
    master_child *a = &m->children[m->n_workers];
    if (a->channel_fd < 0)
        return -1;
    return channel_send(a->channel_fd, CHANNEL_SET_LEADER,
                        (uint64_t)(uint32_t)node | ((uint64_t)(force ? 1 : 0) << 32));
}

static void master_on_respawn(evutil_socket_t fd, short what, void *arg)
{
    master_child *c = arg;
    (void)fd;
    (void)what;
    if (master_self->stop == MASTER_RUNNING)
        master_spawn(master_self, (int)(c - master_self->children));
}

static int master_alive(const master *m)
{
    int n = 0;
    for (int i = 0; i < m->n_children; i++)
        n += m->children[i].pid != 0;
    return n;
}

static void describe_status(int status, char *buf, size_t len)
{
    if (WIFEXITED(status))
        snprintf(buf, len, "exited with code %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, len, "was killed by signal %d (%s)%s", WTERMSIG(status),
                 strsignal(WTERMSIG(status)), WCOREDUMP(status) ? ", core dumped" : "");
    else
        snprintf(buf, len, "ended with status %d", status);
}

static void master_reap(master *m)
{
    int status;
    pid_t pid;
    char how[128];

    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        int i;
        for (i = 0; i < m->n_children && m->children[i].pid != pid; i++)
            ;
        if (i == m->n_children)
            continue; /* not a worker */
        master_child *c = &m->children[i];
        c->pid = 0;
        if (c->channel_fd >= 0) {
            event_del(&c->ev_channel);
            close(c->channel_fd);
            c->channel_fd = -1;
        }
        bool agent = master_is_agent(m, i);
        int lost = 0;
        char who[32];
        if (agent) {
            snprintf(who, sizeof(who), "agent");
        } else {
            snprintf(who, sizeof(who), "worker %d", i);
            atomic_store(&m->shm->workers[i].pid, 0);
            master_poke_workers(m); /* a neighbour accepts from its sockets meanwhile */
            master_uncount_sessions(m, i);
            lost = shm_sessions_reclaim(m->shm, i);
        }
        describe_status(status, how, sizeof(how));
        if (m->stop != MASTER_RUNNING) {
            log_info("%s (pid %d) %s", who, (int)pid, how);
            continue;
        }
        int64_t lived_ms = (shm_mono_us() - c->started_us) / 1000;
        if (lived_ms >= RESPAWN_STABLE_MS)
            c->backoff_ms = 0;
        else if (c->backoff_ms == 0)
            c->backoff_ms = RESPAWN_FIRST_DELAY_MS;
        else if ((c->backoff_ms *= 2) > RESPAWN_MAX_DELAY_MS)
            c->backoff_ms = RESPAWN_MAX_DELAY_MS;
        if (agent)
            log_warning("agent (pid %d) %s after %lld ms; routing stays as it is; restarting "
                        "in %d ms", (int)pid, how, (long long)lived_ms, c->backoff_ms);
        else
            log_warning("worker %d (pid %d) %s after %lld ms; %d session(s) lost; restarting "
                        "in %d ms", i, (int)pid, how, (long long)lived_ms, lost, c->backoff_ms);
        if (!agent)
            m->shm->workers[i].restarts++;
        struct timeval tv = {c->backoff_ms / 1000, (c->backoff_ms % 1000) * 1000};
        evtimer_add(&c->ev_respawn, &tv);
    }
    if (m->stop != MASTER_RUNNING && master_alive(m) == 0)
        event_base_loopbreak(m->base);
}

static void master_signal_workers(master *m, int sig)
{
    for (int i = 0; i < m->n_children; i++)
        if (m->children[i].pid > 0)
            kill(m->children[i].pid, sig);
}

static void master_on_kill_deadline(evutil_socket_t fd, short what, void *arg)
{
    master *m = arg;
    (void)fd;
    (void)what;
    log_warning("%d worker(s) still running after the shutdown deadline: killing them",
                master_alive(m));
    master_signal_workers(m, SIGKILL);
}

static void master_begin_stop(master *m, master_stop how, int sig, int deadline_ms)
{
    m->stop = how;
    for (int i = 0; i < 2; i++) {
        for (int k = 0; k < m->n_workers; k++) {
            if (m->listen_fds[i][k] >= 0) {
                close(m->listen_fds[i][k]);
                m->listen_fds[i][k] = -1;
            }
        }
    }
    for (int i = 0; i < m->n_children; i++)
        evtimer_del(&m->children[i].ev_respawn);
    master_signal_workers(m, sig);
    struct timeval tv = {deadline_ms / 1000, (deadline_ms % 1000) * 1000};
    evtimer_del(&m->ev_kill_deadline);
    evtimer_add(&m->ev_kill_deadline, &tv);
    if (master_alive(m) == 0)
        event_base_loopbreak(m->base);
}

static void master_on_signal_pipe(evutil_socket_t fd, short what, void *arg)
{
    master *m = arg;
    char buf[64];
    (void)what;
    while (read(fd, buf, sizeof(buf)) > 0)
        ;
    if (sig_quit) {
        sig_quit = 0;
        log_info("SIGQUIT: immediate shutdown");
        master_signal_workers(m, SIGKILL);
        m->stop = MASTER_FAST;
        event_base_loopbreak(m->base);
        return;
    }
    if (sig_int) {
        sig_int = 0;
        master_shutdown(m, MASTER_FAST);
    }
    if (sig_term) {
        sig_term = 0;
        master_shutdown(m, MASTER_GRACEFUL);
    }
    if (sig_hup) {
        char msg[256];
        sig_hup = 0;
        log_info("SIGHUP: reloading %s", m->cfg->path);
        master_reload(m, msg, sizeof(msg));
    }
    if (sig_usr1) {
        sig_usr1 = 0;
        if (log_reopen() != 0)
            log_error("cannot reopen the log file %s: %s", m->cfg->logfile, strerror(errno));
        master_signal_workers(m, SIGUSR1);
        log_info("SIGUSR1: log file reopened");
    }
    if (sig_child) {
        sig_child = 0;
        master_reap(m);
    }
}

void master_shutdown(master *m, master_stop how)
{
    if (how == MASTER_FAST && m->stop != MASTER_FAST) {
        log_info("fast shutdown: closing every session");
        master_begin_stop(m, MASTER_FAST, SIGINT, STOP_KILL_GRACE_MS);
    } else if (how == MASTER_GRACEFUL && m->stop == MASTER_RUNNING) {
        log_info("graceful shutdown: waiting up to %d ms for sessions",
                 m->cfg->shutdown_timeout_ms);
        master_begin_stop(m, MASTER_GRACEFUL, SIGTERM,
                          m->cfg->shutdown_timeout_ms + STOP_KILL_GRACE_MS);
    }
}

void master_poke_workers(master *m)
{
    for (int i = 0; i < m->n_workers; i++)
        if (m->children[i].channel_fd >= 0)
            channel_send(m->children[i].channel_fd, CHANNEL_LOOK_AGAIN, 0);
}

static void master_on_maintenance_end(evutil_socket_t fd, short what, void *arg)
{
    master *m = arg;
    (void)fd;
    (void)what;
    log_info("maintenance timeout reached: resuming");
    master_set_maintenance(m, false, 0);
}

void master_set_maintenance(master *m, bool on, int timeout_ms)
{
    evtimer_del(&m->ev_maintenance_end);
    if (on) {
        if (!atomic_load(&m->shm->maintenance))
            atomic_store(&m->shm->maintenance_since_us, shm_now_us());
        atomic_store(&m->shm->maintenance_until_us,
                     timeout_ms > 0 ? shm_now_us() + (int64_t)timeout_ms * 1000 : 0);
        if (timeout_ms > 0) {
            struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
            evtimer_add(&m->ev_maintenance_end, &tv);
        }
    } else {
        atomic_store(&m->shm->maintenance_since_us, 0);
        atomic_store(&m->shm->maintenance_until_us, 0);
    }
    bool was_on = atomic_exchange(&m->shm->maintenance, on ? 1u : 0u) != 0;
    if (was_on != on)
        log_info("maintenance mode %s",
                 on ? "on: holding new sessions and next statements" : "off");
    else
        log_debug("maintenance mode stays %s%s", on ? "on" : "off",
                  on && timeout_ms > 0 ? ", with a new end" : "");
    master_poke_workers(m);
}

int master_kill_session(master *m, uint64_t id)
{
    for (uint32_t i = 0; i < m->shm->max_sessions; i++) {
        shm_session *s = &m->shm->sessions[i];
        if (atomic_load(&s->state) != SESSION_FREE && s->id == id) {
            int w = s->worker;
            if (w < 0 || w >= m->n_workers || m->children[w].channel_fd < 0)
                return -1;
            return channel_send(m->children[w].channel_fd, CHANNEL_KILL_SESSION, id);
        }
    }
    return -1;
}

int master_effective_log_level(const master *m, int configured)
{
    if (m->opts.quiet)
        return LOG_LVL_ERROR;
    int level = configured + m->opts.verbose;
    return level > LOG_LVL_DEBUG ? LOG_LVL_DEBUG : level;
}

static bool nodes_equal(const config *a, const config *b)
{
    if (a->n_nodes != b->n_nodes)
        return false;
    for (int i = 0; i < a->n_nodes; i++) {
        const config_node *x = &a->nodes[i], *y = &b->nodes[i];
        if (strcmp(x->name, y->name) != 0 || strcmp(x->host, y->host) != 0 ||
            x->port != y->port || x->role != y->role)
            return false;
    }
    return true;
}

static void master_publish_static_routes(master *m);

int master_reload(master *m, char *msg, size_t msglen)
{
    config *next = calloc(1, sizeof(*next));
    if (!next) {
        snprintf(msg, msglen, "reload failed: out of memory");
        return -1;
    }
    int errors = config_load(next, m->cfg->path);
    if (errors > 0) {
        for (int i = 0; i < next->n_errors; i++)
            log_error("reload: %s", next->errors[i]);
        snprintf(msg, msglen, "reload failed: %d error(s) in %s (see the log); keeping the "
                 "running configuration", errors, m->cfg->path);
        log_error("%s", msg);
        free(next);
        return -1;
    }
    /* The certificate and key files are part of the configuration: a broken one is refused
     * like a bad key, and the running context stays. */
    char tls_err[1024];
    shm_tls_files *tls_files = tls_load(next, tls_err, sizeof(tls_err));
    if (!tls_files) {
        log_error("reload: %s", tls_err);
        snprintf(msg, msglen, "reload failed: %s; keeping the running configuration", tls_err);
        log_error("%s", msg);
        free(next);
        return -1;
    }
    /* Keys that need a restart keep their running values; the answer names them. */
    int kept = 0;
    char kept_names[256] = "";
    for (size_t i = 0; i < config_n_keys; i++) {
        const config_key *k = &config_keys[i];
        if (k->reloadable ||
            (strcmp(k->section, "pgrelay") != 0 && strcmp(k->section, "control") != 0))
            continue;
        if (memcmp((char *)next + k->offset, (char *)m->cfg + k->offset, k->size) != 0) {
            char was[256], now[256];
            config_format_value(m->cfg, k, m->cfg, was, sizeof(was));
            config_format_value(next, k, next, now, sizeof(now));
            if (config_key_is_secret(k))
                log_warning("reload: [%s] %s changed; this needs a restart, keeping the "
                            "running one", k->section, k->name);
            else
                log_warning("reload: [%s] %s changed from %s to %s; this needs a restart, "
                            "keeping %s", k->section, k->name, was, now, was);
            memcpy((char *)next + k->offset, (char *)m->cfg + k->offset, k->size);
            size_t used = strlen(kept_names);
            snprintf(kept_names + used, sizeof(kept_names) - used, "%s%s", kept ? ", " : "",
                     k->name);
            kept++;
        }
    }
    /* max_client_conn is reloadable up to the session slots shared memory got at start. */
    int capacity = shm_client_capacity(m->shm);
    if (next->max_client_conn > capacity) {
        log_warning("reload: max_client_conn %d is more than the %d session slots made at "
                    "start; raising it above %d needs a restart, using %d", next->max_client_conn,
                    capacity, capacity, capacity);
        next->max_client_conn = capacity;
        size_t used = strlen(kept_names);
        snprintf(kept_names + used, sizeof(kept_names) - used, "%smax_client_conn",
                 kept ? ", " : "");
        kept++;
    }
    bool nodes_changed = !nodes_equal(m->cfg, next);
    next->log_level = master_effective_log_level(m, next->log_level);
    memcpy(m->cfg, next, sizeof(*next));
    free(next);
    config_apply_logging(m->cfg);
    if (nodes_changed && m->n_children == m->n_workers)
        master_publish_static_routes(m); /* with an agent, it republishes on its reload */
    for (int i = 0; i < m->cfg->n_nodes; i++)
        shm_node_count_ensure(m->shm, m->cfg->nodes[i].name);
    /* The workers build their contexts from the bytes checked above, not from the files. */
    shm_settings_publish(m->shm, m->cfg, tls_files);
    free(tls_files);
    atomic_fetch_add(&m->shm->reloads, 1);
    master_poke_workers(m);
    if (m->n_children > m->n_workers && m->children[m->n_workers].channel_fd >= 0)
        channel_send(m->children[m->n_workers].channel_fd, CHANNEL_LOOK_AGAIN, 0);
    snprintf(msg, msglen, "reloaded %s%s%s%s%s", m->cfg->path,
             nodes_changed ? "; node list changed" : "",
             kept ? "; changed but kept until a restart: " : "", kept_names,
             kept ? " (see the log)" : "");
    log_info("%s", msg);
    return 0;
}

static void master_publish_static_routes(master *m)
{
    shm_route_table *tab = calloc(1, sizeof(*tab));
    shm_route_table *old = calloc(1, sizeof(*old));
    if (!tab || !old) {
        free(tab);
        free(old);
        return;
    }
    /* The epoch only grows: it moves on when the leader is another node than before. */
    uint64_t version = shm_routes_read(m->shm, old);
    uint64_t epoch = old->epoch ? old->epoch : 1;
    shm_routes_from_config(tab, m->cfg, epoch);
    if (version > 0 && tab->leader >= 0 &&
        (old->leader < 0 ||
         strcmp(old->nodes[old->leader].name, tab->nodes[tab->leader].name) != 0))
        tab->epoch = epoch + 1;
    free(old);
    shm_routes_publish(m->shm, tab);
    if (tab->leader >= 0 && m->cfg->agent) /* a guess: role= may be stale */
        log_info("configured primary: node %s (%s:%d), epoch %llu; no session goes to it until "
                 "the agent's first probe confirms a leader", tab->nodes[tab->leader].name,
                 tab->nodes[tab->leader].host, tab->nodes[tab->leader].port,
                 (unsigned long long)tab->epoch);
    else if (tab->leader >= 0)
        log_info("write leader: node %s (%s:%d), epoch %llu", tab->nodes[tab->leader].name,
                 tab->nodes[tab->leader].host, tab->nodes[tab->leader].port,
                 (unsigned long long)tab->epoch);
    else
        log_warning("no node has role = primary: new sessions will be refused (57P03)");
    free(tab);
}

/* The agent program: agent_path, or pgrelay-agent beside this executable. */
static int master_find_agent(master *m)
{
    if (m->cfg->agent_path[0]) {
        snprintf(m->agent_path, sizeof(m->agent_path), "%s", m->cfg->agent_path);
    } else {
        char self[sizeof(m->agent_path) - 32];
        ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
        if (n < 0) {
            log_error("cannot find my own path to locate pgrelay-agent: %s", strerror(errno));
            return -1;
        }
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash)
            *slash = '\0';
        snprintf(m->agent_path, sizeof(m->agent_path), "%s/pgrelay-agent", self);
    }
    if (access(m->agent_path, X_OK) != 0) {
        log_error("agent = on but %s cannot be run: %s (set agent_path, or agent = off for "
                  "static roles)", m->agent_path, strerror(errno));
        return -1;
    }
    return 0;
}

/* Descriptors a worker may need besides two per session: listen sockets, the channel, the
 * log, cancel requests on their way. */
#define MASTER_FD_SPARE 64

/* Raise the soft descriptor limit to the hard one (children inherit it), and say so when even
 * that is too low for max_client_conn: the accept race may hand one worker every session,
 * each taking a client and a server socket. */
static void master_raise_fd_limit(const config *cfg)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
        log_warning("cannot read the descriptor limit (RLIMIT_NOFILE): %s", strerror(errno));
        return;
    }
    if (rl.rlim_cur < rl.rlim_max) {
        rlim_t was = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
            log_warning("cannot raise the descriptor limit from %llu to %llu: %s",
                        (unsigned long long)was, (unsigned long long)rl.rlim_max,
                        strerror(errno));
            rl.rlim_cur = was;
        } else {
            log_info("descriptor limit raised from %llu to %llu", (unsigned long long)was,
                     (unsigned long long)rl.rlim_cur);
        }
    }
    unsigned long long need =
        2ull * ((unsigned long long)cfg->max_client_conn + SHM_REFUSE_RESERVE) + MASTER_FD_SPARE;
    if (rl.rlim_cur != RLIM_INFINITY && (unsigned long long)rl.rlim_cur < need)
        log_warning("descriptor limit %llu is below the %llu a worker may need for "
                    "max_client_conn = %d (two per session); above about %llu sessions in one "
                    "worker, accepts fail until sessions end: raise the hard limit (ulimit -n, "
                    "LimitNOFILE=)",
                    (unsigned long long)rl.rlim_cur, need, cfg->max_client_conn,
                    ((unsigned long long)rl.rlim_cur > MASTER_FD_SPARE
                         ? ((unsigned long long)rl.rlim_cur - MASTER_FD_SPARE) / 2
                         : 0));
}

/* A worker died: take its sessions off their nodes' session counters (it cannot), so that
 * read routing by least sessions does not stay skewed. A slot names its node only while the
 * session is counted on it. */
static void master_uncount_sessions(master *m, int index)
{
    for (uint32_t i = 0; i < m->shm->max_sessions; i++) {
        shm_session *s = &m->shm->sessions[i];
        if (atomic_load(&s->state) == SESSION_FREE || s->worker != index || !s->node_name[0])
            continue;
        shm_node_count *c = shm_node_count_get(m->shm, s->node_name);
        if (c)
            atomic_fetch_sub(s->read_port ? &c->read_sessions : &c->write_sessions, 1);
    }
}

int master_run(config *cfg, int *const listen_fds[2], const master_options *opts)
{
    master m = {.cfg = cfg, .listen_fds = {listen_fds[0], listen_fds[1]}, .shm_fd = -1,
                .opts = *opts};
    int rc = 1;

    master_self = &m;
    m.started_us = shm_mono_us();
    log_set_process("master");
    master_raise_fd_limit(cfg);
    m.shm = shm_create(cfg, &m.shm_fd);
    if (!m.shm)
        return 1;
    shm_settings_publish(m.shm, cfg, NULL); /* workers inherit the contexts at fork */
    master_publish_static_routes(&m);

    if (pipe2(signal_pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
        log_error("cannot create the signal pipe: %s", strerror(errno));
        return 1;
    }
    m.base = event_base_new();
    if (!m.base) {
        log_error("cannot create the event loop");
        return 1;
    }
    master_install_signals();
    const char *delay = getenv("PGRELAY_TEST_CHILD_DELAY_MS");
    if (delay && atoi(delay) > 0) {
        master_test_child_delay_ms = atoi(delay) > 10000 ? 10000 : atoi(delay);
        log_warning("PGRELAY_TEST_CHILD_DELAY_MS is set: a test hook; every child waits %d ms "
                    "after fork", master_test_child_delay_ms);
    }
    event_assign(&m.ev_signal_pipe, m.base, signal_pipe[0], EV_READ | EV_PERSIST,
                 master_on_signal_pipe, &m);
    event_add(&m.ev_signal_pipe, NULL);
    evtimer_assign(&m.ev_kill_deadline, m.base, master_on_kill_deadline, &m);
    evtimer_assign(&m.ev_maintenance_end, m.base, master_on_maintenance_end, &m);
    if (admin_start(&m) != 0)
        return 1;
    if (httpd_start(&m) != 0)
        return 1;

    m.n_workers = cfg->workers;
    m.n_children = cfg->workers + (cfg->agent ? 1 : 0);
    if (cfg->agent && master_find_agent(&m) != 0)
        return 1;
    for (int i = 0; i < cfg->n_nodes; i++)
        shm_node_count_ensure(m.shm, cfg->nodes[i].name);
    m.children = calloc((size_t)m.n_children, sizeof(*m.children));
    if (!m.children) {
        log_error("out of memory");
        return 1;
    }
    for (int i = 0; i < m.n_children; i++)
        m.children[i].channel_fd = -1;
    for (int i = 0; i < m.n_children; i++) {
        evtimer_assign(&m.children[i].ev_respawn, m.base, master_on_respawn, &m.children[i]);
        master_spawn(&m, i);
    }
    log_info("pgrelay %s ready: %d worker(s) on %s:%d", PGRELAY_VERSION, m.n_workers,
             cfg->listen_addr, cfg->listen_port);

    event_base_dispatch(m.base);

    /* Stopped: make sure no worker outlives us. */
    if (master_alive(&m) > 0 && m.stop == MASTER_FAST) {
        master_signal_workers(&m, SIGKILL);
        while (waitpid(-1, NULL, 0) > 0)
            ;
    }
    rc = 0;
    admin_stop_listening();
    httpd_stop();
    log_info("pgrelay stopped");
    if (m.opts.pidfile)
        unlink(m.opts.pidfile);
    for (int i = 0; i < m.n_children; i++)
        evtimer_del(&m.children[i].ev_respawn);
    event_del(&m.ev_signal_pipe);
    evtimer_del(&m.ev_kill_deadline);
    evtimer_del(&m.ev_maintenance_end);
    event_base_free(m.base);
    free(m.children);
    return rc;
}
