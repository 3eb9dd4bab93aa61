/* main.c - pgrelay-agent: flags, attaching to the master's shared memory, the event loop.
 *
 * Started by the pgrelay master (fork + exec) with PGRELAY_SHM_FD and PGRELAY_CHANNEL_FD in its
 * environment, it writes the routing table and pokes the master. Run by hand
 * (`pgrelay-agent -c FILE -v`) it probes and logs its decisions without touching a running
 * pgrelay: a way to see what it would do.
 */
#include "agent.h"
#include "channel.h"
#include "control.h"
#include "log.h"
#include "planner.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

agent *agent_self;

static void usage(FILE *out)
{
    fprintf(out,
            "pgrelay-agent %s - health checks and write-leader decisions for pgrelay\n"
            "\n"
            "Usage: pgrelay-agent [OPTION]...\n"
            "\n"
            "Options:\n"
            "  -c, --config FILE    configuration file (default %s)\n"
            "  -v, --verbose        log more (repeat for debug)\n"
            "  -q, --quiet          log only errors\n"
            "  -V, --version        print the version and exit\n"
            "  -h, --help           print this help and exit\n"
            "\n"
            "pgrelay starts the agent itself. Run by hand, the agent probes the nodes of FILE\n"
            "and logs what it decides, without changing a running pgrelay. With [agent]\n"
            "ha_source = patroni it also asks the members' Patroni REST API (ha_patroni_urls)\n"
            "whom Patroni names leader. See pgrelay-agent(8).\n",
            PGRELAY_VERSION, CONFIG_DEFAULT_PATH);
}

static shm_segment *attach_shm(const char *fd_text)
{
    int fd = atoi(fd_text);
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < (off_t)sizeof(shm_segment)) {
        log_error("PGRELAY_SHM_FD=%s is not the shared memory segment", fd_text);
        return NULL;
    }
    shm_segment *shm = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (shm == MAP_FAILED || shm->magic != SHM_MAGIC) {
        log_error("cannot map the shared memory segment: %s",
                  shm == MAP_FAILED ? strerror(errno) : "bad magic");
        return NULL;
    }
    return shm;
}

/* Build the node list from the configuration, keeping the state of nodes that stay the same
 * (same name, host and port), and the leader by name. */
static void agent_load_nodes(agent *a)
{
    agent_node old[CONFIG_MAX_NODES];
    int n_old = a->n_nodes;
    char leader[CONFIG_NAME_MAX] = "";
    if (a->leader >= 0)
        snprintf(leader, sizeof(leader), "%s", a->nodes[a->leader].view.name);
    for (int k = 0; k < n_old; k++)
        probe_node_detach(&a->nodes[k]); /* before the copy: no event may live in one */
    memcpy(old, a->nodes, sizeof(agent_node) * (size_t)n_old);

    a->n_nodes = a->cfg->n_nodes;
    a->leader = -1;
    a->forced = -1;
    for (int i = 0; i < a->n_nodes; i++) {
        const config_node *c = &a->cfg->nodes[i];
        agent_node *n = &a->nodes[i];
        int keep = -1;
        for (int k = 0; k < n_old; k++)
            if (strcmp(old[k].view.name, c->name) == 0 && strcmp(old[k].view.host, c->host) == 0 &&
                old[k].view.port == c->port && old[k].conn)
                keep = k;
        if (keep >= 0) {
            /* Same node: carry its connection and history over (events re-registered). */
            agent_node *o = &old[keep];
            *n = *o;
            old[keep].conn = NULL;
            if (n->conn && PQstatus(n->conn) != CONNECTION_OK) {
                PQfinish(n->conn);
                n->conn = NULL;
            }
        } else {
            memset(n, 0, sizeof(*n));
            n->sock = -1;
            snprintf(n->view.name, sizeof(n->view.name), "%s", c->name);
            snprintf(n->view.host, sizeof(n->view.host), "%s", c->host);
            n->view.port = c->port;
            n->view.role = c->role;
            n->view.lag_bytes = -1;
            if (shm_node_resolve(&n->view) != 0)
                n->view.health = NODE_HEALTH_DOWN;
        }
        n->index = i;
        evtimer_assign(&n->ev_timeout, a->base, NULL, NULL);
        if (strcmp(c->name, leader) == 0)
            a->leader = i;
    }
    /* Nodes that left the configuration. */
    for (int k = 0; k < n_old; k++) {
        if (old[k].conn)
            PQfinish(old[k].conn);
    }
}

/* The control plane has not answered for control_grace_period: decide alone from now on, and
 * say so once. The last answer from any endpoint (the reporter's or the poller's) is what
 * counts: the reporter's own failures alone would end the grace at once while it still backs
 * off from an older outage. Checked at every tick and whenever the reporter fails. */
static void agent_check_control_grace(agent *a)
{
    if (!a->control_on || !a->control_seen_us ||
        shm_mono_us() - a->control_seen_us < (int64_t)a->cfg->control_grace_period_ms * 1000)
        return;
    static const char *const what[] = {
        [CONTROL_LOST_KEEP_LEADER] = "keeping the leader it named while that answers as a "
                                     "primary (control_lost = keep_leader)",
        [CONTROL_LOST_DECIDE_ALONE] = "deciding the leader alone (control_lost = decide_alone)",
        [CONTROL_LOST_STOP_WRITES] = "routing no writes until it is back "
                                     "(control_lost = stop_writes)",
    };
    int mode = a->cfg->control_lost;
    log_warning("control plane unreachable for more than control_grace_period (%d ms): %s",
                a->cfg->control_grace_period_ms,
                mode >= 0 && mode <= CONTROL_LOST_STOP_WRITES ? what[mode] : "?");
    a->control_seen_us = 0;
    a->control_lost = true;
    leader_decide(a);
}

static void agent_on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    agent_check_control_grace(arg);
    probe_all(arg);
}

static void agent_arm_tick(agent *a)
{
    struct timeval tv = {a->cfg->health_interval_ms / 1000,
                         (a->cfg->health_interval_ms % 1000) * 1000};
    event_del(&a->ev_tick);
    event_add(&a->ev_tick, &tv);
}

/* The master published new settings (reload). */
static void agent_reload(agent *a)
{
    config *next = malloc(sizeof(*next));
    if (!next)
        return;
    if (a->shm)
        shm_settings_read(a->shm, next);
    else if (config_load(next, a->cfg->path) > 0) {
        for (int i = 0; i < next->n_errors; i++)
            log_error("reload: %s", next->errors[i]);
        free(next);
        return;
    }
    memcpy(a->cfg, next, sizeof(*next));
    free(next);
    config_apply_logging(a->cfg);
    agent_load_nodes(a);
    ha_patroni_remap(a);
    agent_arm_tick(a);
    log_info("configuration reloaded: %d node(s), health_interval %d ms", a->n_nodes,
             a->cfg->health_interval_ms);
    leader_decide(a);
    probe_all(a);
}

static void agent_on_channel(evutil_socket_t fd, short what, void *arg)
{
    agent *a = arg;
    channel_msg m;
    char why[160];
    (void)what;
    for (;;) {
        ssize_t n = recv(fd, &m, sizeof(m), MSG_DONTWAIT);
        if (n == 0) {
            log_info("the master has gone; exiting");
            event_base_loopbreak(a->base);
            return;
        }
        if (n != (ssize_t)sizeof(m))
            return;
        switch (m.cmd) {
        case CHANNEL_LOOK_AGAIN:
            agent_reload(a);
            break;
        case CHANNEL_PROBE_NOW:
            log_debug("probe requested by a worker");
            probe_all_fresh(a);
            break;
        case CHANNEL_SET_LEADER:
            if (leader_set(a, (int)(m.arg & 0xffffffffu), (m.arg >> 32) != 0, why,
                           sizeof(why)) != 0)
                log_warning("set leader refused: %s", why);
            break;
        default:
            log_warning("unknown channel command %u", m.cmd);
        }
    }
}

/* What the control-plane threads learned. */
static void agent_on_control(evutil_socket_t fd, short what, void *arg)
{
    agent *a = arg;
    control_msg m;
    (void)what;
    while (recv(fd, &m, sizeof(m), MSG_DONTWAIT) == (ssize_t)sizeof(m)) {
        if (m.type == CONTROL_MSG_LEADER) {
            bool was_stale = !a->control_seen_us;
            m.leader[sizeof(m.leader) - 1] = '\0';
            a->control_seen_us = shm_mono_us();
            if (a->control_lost) {
                log_info("control plane answers again: following its leader");
                a->control_lost = false;
                a->writes_stopped = false;
            }
            if (strcmp(a->control_leader, m.leader) == 0 && a->control_epoch == m.epoch &&
                !was_stale)
                continue;
            /* The reporter and the poller both bring the control plane's word and may deliver
             * it out of order: an older epoch than the last one heard is a stale answer. */
            if (!was_stale && m.epoch < a->control_epoch)
                continue;
            memcpy(a->control_leader, m.leader, sizeof(m.leader));
            a->control_epoch = m.epoch;
            if (m.leader[0])
                probe_all(a); /* see the named leader's state now, not in an interval */
            leader_decide(a);
        } else if (m.type == CONTROL_MSG_UNREACHABLE) {
            agent_check_control_grace(a);
        }
    }
}

static void agent_on_signal(evutil_socket_t sig, short what, void *arg)
{
    agent *a = arg;
    (void)what;
    switch (sig) {
    case SIGTERM:
    case SIGINT:
        log_info("stopping");
        event_base_loopbreak(a->base);
        break;
    case SIGHUP:
        if (!a->shm)
            agent_reload(a); /* under a master, reloads come over the channel */
        break;
    case SIGUSR1:
        log_reopen();
        break;
    }
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"config", required_argument, NULL, 'c'}, {"verbose", no_argument, NULL, 'v'},
        {"quiet", no_argument, NULL, 'q'},        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    static const int signals[] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1};
    const char *config_path = CONFIG_DEFAULT_PATH;
    int verbose = 0, opt;
    bool quiet = false;
    char kept_leader[CONFIG_NAME_MAX] = "";
    bool use_kept_leader = false;

    while ((opt = getopt_long(argc, argv, "c:vqVh", options, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 'v':
            verbose++;
            break;
        case 'q':
            quiet = true;
            break;
        case 'V':
            printf("pgrelay-agent %s\n", PGRELAY_VERSION);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            fprintf(stderr, "Try 'pgrelay-agent --help' for more information.\n");
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "pgrelay-agent: unexpected argument \"%s\"\n", argv[optind]);
        return 2;
    }
    log_set_process("agent");
    agent *a = calloc(1, sizeof(*a));
    if (!a || !(a->cfg = calloc(1, sizeof(*a->cfg))) ||
        !(a->published = calloc(1, sizeof(*a->published)))) {
        fprintf(stderr, "pgrelay-agent: out of memory\n");
        return 1;
    }
    agent_self = a;
    a->channel_fd = -1;
    a->leader = -1;
    a->forced = -1;

    const char *shm_fd = getenv("PGRELAY_SHM_FD");
    const char *chan_fd = getenv("PGRELAY_CHANNEL_FD");
    if (shm_fd && chan_fd) {
        if (!(a->shm = attach_shm(shm_fd)))
            return 1;
        a->channel_fd = atoi(chan_fd);
        /* The master's effective settings (its -v/-q included). */
        shm_settings_read(a->shm, a->cfg);
        config_apply_logging(a->cfg);
        /* Carry the epoch and leader over from the table in force (a restarted agent). */
        shm_route_table *t = a->published;
        shm_routes_read(a->shm, t);
        a->epoch = t->epoch;
        a->change = (shm_leader_change)t->change;
        /* A restarted proxy has a fresh segment (epoch 1): go on from the kept epoch, with the
         * leader it named as the first guess, so no epoch is handed out twice. */
        uint64_t kept = 0;
        if (agent_state_load(a->cfg, &kept, kept_leader, sizeof(kept_leader))) {
            a->saved_epoch = kept;
            snprintf(a->saved_leader, sizeof(a->saved_leader), "%s", kept_leader);
            if (kept > a->epoch && t->agent_pid == 0) {
                log_info("epoch %llu and leader %s from the agent state (the table had epoch "
                         "%llu)", (unsigned long long)kept, kept_leader[0] ? kept_leader : "(none)",
                         (unsigned long long)a->epoch);
                a->epoch = kept;
                use_kept_leader = true;
            } else {
                kept_leader[0] = '\0';
            }
        }
    } else {
        if (config_load(a->cfg, config_path) > 0) {
            for (int i = 0; i < a->cfg->n_errors; i++)
                fprintf(stderr, "%s\n", a->cfg->errors[i]);
            return 1;
        }
        int level = a->cfg->log_level + verbose;
        log_current_level = quiet ? LOG_LVL_ERROR
                                  : (log_level)(level > LOG_LVL_DEBUG ? LOG_LVL_DEBUG : level);
        log_info("running by hand: probing the nodes of %s and logging decisions only",
                 config_path);
    }

    a->base = event_base_new();
    if (!a->base) {
        log_error("cannot create the event loop");
        return 1;
    }
    agent_load_nodes(a);
    if (a->shm) {
        const shm_route_table *t = a->published;
        const char *first = use_kept_leader ? kept_leader
                            : t->leader >= 0 ? t->nodes[t->leader].name
                                             : "";
        for (int i = 0; i < a->n_nodes && first[0]; i++)
            if (strcmp(a->nodes[i].view.name, first) == 0)
                a->leader = i;
    }
    struct event *sig_events[sizeof(signals) / sizeof(signals[0])];
    for (size_t i = 0; i < sizeof(signals) / sizeof(signals[0]); i++) {
        sig_events[i] = evsignal_new(a->base, signals[i], agent_on_signal, a);
        evsignal_add(sig_events[i], NULL);
    }
    signal(SIGPIPE, SIG_IGN);
    event_assign(&a->ev_tick, a->base, -1, EV_PERSIST, agent_on_tick, a);
    agent_arm_tick(a);
    if (a->channel_fd >= 0) {
        event_assign(&a->ev_channel, a->base, a->channel_fd, EV_READ | EV_PERSIST,
                     agent_on_channel, a);
        event_add(&a->ev_channel, NULL);
    }
    int control_fd = control_start(a);
    if (control_fd >= 0) {
        a->control_on = true;
        event_assign(&a->ev_control, a->base, control_fd, EV_READ | EV_PERSIST,
                     agent_on_control, a);
        event_add(&a->ev_control, NULL);
    }
    int ha_fd = ha_patroni_start(a);
    if (ha_fd >= 0) {
        a->ha_on = true;
        a->ha_leader = -1;
        event_assign(&a->ev_ha, a->base, ha_fd, EV_READ | EV_PERSIST, ha_patroni_on_msg, a);
        event_add(&a->ev_ha, NULL);
    }
    planner_start(a);
    log_info("started: %d node(s), leader %s, epoch %llu, health_interval %d ms", a->n_nodes,
             a->leader >= 0 ? a->nodes[a->leader].view.name : "(none)",
             (unsigned long long)a->epoch, a->cfg->health_interval_ms);
    probe_all(a);
    event_base_dispatch(a->base);

    for (int i = 0; i < a->n_nodes; i++)
        probe_node_close(&a->nodes[i]);
    for (size_t i = 0; i < sizeof(signals) / sizeof(signals[0]); i++)
        event_free(sig_events[i]);
    event_del(&a->ev_tick);
    if (a->channel_fd >= 0)
        event_del(&a->ev_channel);
    if (a->control_on)
        event_del(&a->ev_control);
    if (a->ha_on)
        event_del(&a->ev_ha);
    event_base_free(a->base);
    free(a->published);
    free(a->cfg);
    free(a);
    return 0;
}
