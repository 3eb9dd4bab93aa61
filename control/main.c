/* main.c - pgrelay-control's command line: flags, config check, daemon mode, pidfile, signals,
 * housekeeping, and the event loop. */
#include "cconfig.h"
#include "control.h"
#include "daemon.h"
#include "http.h"
#include "lease.h"
#include "periodic.h"
#include "store_worker.h"
#include "log.h"
#include "plans.h"
#include "state.h"
#include "store.h"
#include "tls.h"

#include <errno.h>
#include <event2/event.h>
#include <getopt.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PROG                  "pgrelay-control"
#define HOUSEKEEPING_MS       1000  /* telemetry pruning, lease term check */
#define FLUSH_EVERY_MS        5000  /* proxies' last-seen times written to the store */
#define EXPIRE_EVERY_MS       60000 /* old commands deleted from the store */
#define STORE_IDLE_PING_MS    1000  /* an idle store connection is checked this often */
#define SHUTDOWN_FLUSH_MS     200   /* time given to answers in flight before exiting */
#define IDENTITY_RANDOM_BYTES 4
#define MS_PER_S              1000
#define NS_PER_MS             1000000
#define US_PER_MS             1000
#define EXIT_USAGE            2

control_ctx control;

static struct {
    int verbose; /* -v count */
    bool quiet;  /* -q */
    struct event *signals[5];
    struct event *housekeeping;
    int64_t last_flush_ms;
    int64_t last_expire_ms;
} main_state;

/* ---- shared helpers (control.h) ---- */

int64_t control_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * MS_PER_S + ts.tv_nsec / NS_PER_MS;
}

int64_t control_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * MS_PER_S + ts.tv_nsec / NS_PER_MS;
}

void control_sha256_hex(const char *text, char out[CONTROL_SHA256_HEX_LEN])
{
    static const char hex[] = "0123456789abcdef";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (!EVP_Digest(text, strlen(text), md, &len, EVP_sha256(), NULL))
        len = 0;
    for (unsigned int i = 0; i < len && 2 * i + 1 < CONTROL_SHA256_HEX_LEN; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 0xf];
    }
    out[2 * len < CONTROL_SHA256_HEX_LEN ? 2 * len : CONTROL_SHA256_HEX_LEN - 1] = '\0';
}

bool control_digest_equal(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    return la == lb && la > 0 && CRYPTO_memcmp(a, b, la) == 0;
}

/* ---- command line ---- */

static void usage(FILE *out)
{
    fprintf(out,
            PROG
            " %s - control plane of pgrelay proxies (HTTP/JSON API)\n"
            "\n"
            "Usage: " PROG " [OPTION]...\n"
            "\n"
            "Options:\n"
            "  -c, --config FILE    configuration file (default %s)\n"
            "  -t, --check          check the configuration file and exit (0 valid, 1 not)\n"
            "  -d, --daemon         detach and run in the background (needs logfile)\n"
            "  -p, --pidfile FILE   write the pid to FILE; refuse to start if another running\n"
            "                       " PROG " holds it\n"
            "  -v, --verbose        log more (repeat for debug)\n"
            "  -q, --quiet          log only errors\n"
            "  -V, --version        print the version and exit\n"
            "  -h, --help           print this help and exit\n"
            "\n"
            "Signals: TERM and INT stop (giving the lease up), HUP reloads tokens and\n"
            "deployments, USR1 reopens the log file, QUIT exits at once.\n"
            "See " PROG "(8); the API is described in protocol.md.\n",
            PGRELAY_VERSION, CCONFIG_DEFAULT_PATH);
}

/* The level from the file, moved by -v and -q. */
static void apply_logging(const cconfig *cfg)
{
    int level = cfg->log_level + main_state.verbose;
    if (level > LOG_LVL_DEBUG)
        level = LOG_LVL_DEBUG;
    log_current_level = main_state.quiet ? LOG_LVL_ERROR : (log_level)level;
}

/* Allow as many open files as the hard limit does: every agent holds a connection. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            log_warning("cannot raise the open-files limit: %s", strerror(errno));
    }
}

static void make_identity(void)
{
    char host[HOST_NAME_MAX + 1] = "localhost";
    unsigned char rnd[IDENTITY_RANDOM_BYTES] = {0};
    gethostname(host, sizeof(host) - 1);
    host[sizeof(host) - 1] = '\0';
    if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
        unsigned int seed = (unsigned int)(control_mono_ms() ^ getpid());
        for (size_t i = 0; i < sizeof(rnd); i++)
            rnd[i] = (unsigned char)rand_r(&seed);
    }
    snprintf(control.identity, sizeof(control.identity), "%.200s_%d_%02x%02x%02x%02x", host,
             (int)getpid(), rnd[0], rnd[1], rnd[2], rnd[3]);
}

/* ---- reload ---- */

static void reload(void)
{
    cconfig *next = calloc(1, sizeof(*next));
    cconfig *cur = control.cfg;
    char a[CCONFIG_ERROR_LEN], b[CCONFIG_ERROR_LEN];

    if (!next) {
        log_error("reload: out of memory; configuration unchanged");
        return;
    }
    if (cconfig_load(next, cur->path) > 0) {
        for (int i = 0; i < next->n_errors; i++)
            log_error("reload: %s", next->errors[i]);
        log_error("reload: %d error(s) in %s; configuration unchanged", next->n_errors, cur->path);
        free(next);
        return;
    }
    /* Keys that need a restart keep their running value. */
    for (size_t i = 0; i < cconfig_n_keys; i++) {
        const cconfig_key *k = &cconfig_keys[i];
        if (k->reloadable || strcmp(k->section, "deployment") == 0)
            continue;
        cconfig_format_value(k, cur, a, sizeof(a));
        cconfig_format_value(k, next, b, sizeof(b));
        if (strcmp(a, b) == 0)
            continue;
        log_warning("reload: [%s] %s changed; it takes effect only after a restart", k->section,
                    k->name);
        memcpy((char *)next + k->offset, (const char *)cur + k->offset, k->size);
    }
    control.cfg = next;
    free(cur);
    apply_logging(next);
    if (log_open_file(next->logfile) != 0)
        log_error("reload: cannot open logfile %s: %s", next->logfile, strerror(errno));
    http_apply_config();
    state_apply_config();
    log_info("reload: %s loaded (%d deployment(s), %d admin token(s))", next->path,
             next->n_deployments, next->n_admin_tokens);
}

/* ---- signals and timers ---- */

static void stop(void)
{
    struct timeval tv = {.tv_sec = 0, .tv_usec = SHUTDOWN_FLUSH_MS * US_PER_MS};
    if (control.stopping)
        return;
    control.stopping = true;
    log_info("stopping");
    if (control.active)
        state_flush();
    state_deactivate("pgrelay-control is shutting down");
    lease_stop();
    event_base_loopexit(control.base, &tv);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    (void)arg;
    switch (sig) {
    case SIGTERM:
    case SIGINT:
        stop();
        break;
    case SIGHUP:
        log_info("SIGHUP: reloading %s", control.cfg->path);
        reload();
        break;
    case SIGUSR1:
        if (log_reopen() != 0)
            log_error("cannot reopen the log file: %s", strerror(errno));
        break;
    case SIGQUIT:
        log_info("SIGQUIT: exiting at once (the lease runs out by itself)");
        _exit(0);
    }
}

static void on_housekeeping(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (control.stopping)
        return;
    lease_check();
    if (!control.active)
        return;
    int64_t now = control_now_ms();
    state_prune(now);
    /* the store work of housekeeping runs on the store worker, never on this loop */
    /* notice a restarted store before a request does */
    if (store_idle_ms() >= STORE_IDLE_PING_MS)
        periodic_ping();
    int64_t mono = control_mono_ms();
    if (mono - main_state.last_flush_ms >= FLUSH_EVERY_MS) {
        main_state.last_flush_ms = mono;
        periodic_flush();
    }
    if (mono - main_state.last_expire_ms >= EXPIRE_EVERY_MS) {
        main_state.last_expire_ms = mono;
        periodic_expire(control.cfg->command_retention_ms, control.cfg->telemetry_retention_ms);
    }
}

static int start_events(void)
{
    static const int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGQUIT};
    struct timeval tv = {.tv_sec = HOUSEKEEPING_MS / MS_PER_S,
                         .tv_usec = (HOUSEKEEPING_MS % MS_PER_S) * US_PER_MS};
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
        main_state.signals[i] = evsignal_new(control.base, sigs[i], on_signal, NULL);
        if (!main_state.signals[i] || event_add(main_state.signals[i], NULL) != 0)
            return -1;
    }
    main_state.housekeeping = event_new(control.base, -1, EV_PERSIST, on_housekeeping, NULL);
    if (!main_state.housekeeping || event_add(main_state.housekeeping, &tv) != 0)
        return -1;
    return 0;
}

static void free_events(void)
{
    for (size_t i = 0; i < sizeof(main_state.signals) / sizeof(main_state.signals[0]); i++)
        if (main_state.signals[i])
            event_free(main_state.signals[i]);
    if (main_state.housekeeping)
        event_free(main_state.housekeeping);
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"config", required_argument, NULL, 'c'},
        {"check", no_argument, NULL, 't'},
        {"daemon", no_argument, NULL, 'd'},
        {"pidfile", required_argument, NULL, 'p'},
        {"verbose", no_argument, NULL, 'v'},
        {"quiet", no_argument, NULL, 'q'},
        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *config_path = CCONFIG_DEFAULT_PATH;
    const char *pidfile = NULL;
    bool check = false, daemon_mode = false;
    int opt, rc = 1, pid_fd = -1;
    char config_abs[PATH_MAX], err[CCONFIG_ERROR_LEN];
    cconfig *cfg = NULL;

    while ((opt = getopt_long(argc, argv, "c:tdp:vqVh", options, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 't':
            check = true;
            break;
        case 'd':
            daemon_mode = true;
            break;
        case 'p':
            pidfile = optarg;
            break;
        case 'v':
            main_state.verbose++;
            break;
        case 'q':
            main_state.quiet = true;
            break;
        case 'V':
            printf(PROG " %s\n", PGRELAY_VERSION);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            fprintf(stderr, "Try '" PROG " --help' for more information.\n");
            return EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, PROG ": unexpected argument \"%s\"\nTry '" PROG " --help'.\n",
                argv[optind]);
        return EXIT_USAGE;
    }

    cfg = calloc(1, sizeof(*cfg));
    if (!cfg) {
        fprintf(stderr, PROG ": out of memory\n");
        return 1;
    }
    /* Absolute, so that reloads still find it after daemon mode's chdir("/"). */
    if (realpath(config_path, config_abs))
        config_path = config_abs;
    char weak[CCONFIG_NAME_MAX + 64];
    int errors = cconfig_load(cfg, config_path);
    if (errors > 0) {
        for (int i = 0; i < cfg->n_errors; i++)
            fprintf(stderr, "%s\n", cfg->errors[i]);
        if (!check)
            fprintf(stderr, PROG ": %d error(s) in %s; not starting\n", errors, config_path);
        goto done;
    }
    if (check) {
        printf("%s: configuration is valid (%d deployment(s), %d admin token(s))\n", config_path,
               cfg->n_deployments, cfg->n_admin_tokens);
        if (!cfg->tls_cert_file[0] && !tls_addr_is_loopback(cfg->listen_addr))
            fprintf(stderr,
                    "%s: warning: listen_addr %s is beyond loopback without TLS: bearer tokens "
                    "travel in clear (set tls_cert_file and tls_key_file)\n",
                    config_path, cfg->listen_addr);
        if (cconfig_weak_token(cfg, weak, sizeof(weak)))
            fprintf(stderr, "%s: warning: %s is shorter than %d characters: easy to guess "
                    "(generate one with openssl rand -hex 24)\n", config_path, weak,
                    CCONFIG_TOKEN_GOOD_LEN);
        rc = 0;
        goto done;
    }
    control.cfg = cfg;
    apply_logging(cfg);
    log_set_process("control");
    if (cconfig_weak_token(cfg, weak, sizeof(weak)))
        log_warning("%s: %s is shorter than %d characters: easy to guess", config_path, weak,
                    CCONFIG_TOKEN_GOOD_LEN);

    if (daemon_mode && !cfg->logfile[0]) {
        fprintf(stderr,
                PROG ": daemon mode needs logfile in %s (otherwise its logs would be lost)\n",
                config_path);
        goto done;
    }
    if (pidfile && (pid_fd = daemon_pidfile_lock(PROG, pidfile)) < 0)
        goto done;
    if (cfg->logfile[0] && log_open_file(cfg->logfile) != 0) {
        fprintf(stderr, PROG ": cannot open logfile %s: %s\n", cfg->logfile, strerror(errno));
        goto done;
    }
    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    control.base = event_base_new();
    if (!control.base) {
        log_error("cannot create the event loop");
        goto done;
    }
    /* Listen before detaching, so "address in use" reaches the terminal. */
    if (http_start(control.base, err, sizeof(err)) != 0) {
        log_error("%s", err);
        if (cfg->logfile[0])
            fprintf(stderr, PROG ": %s\n", err);
        goto done;
    }
    if (daemon_mode && daemon_detach() != 0) {
        log_error("cannot detach: %s", strerror(errno));
        goto done;
    }
    if (pid_fd >= 0 && daemon_pidfile_write(pid_fd, pidfile) != 0)
        goto done;
    make_identity();
    log_info(PROG " %s listening on %s:%d (pid %d)", PGRELAY_VERSION, cfg->listen_addr,
             cfg->listen_port, (int)getpid());
    if (start_events() != 0) {
        log_error("cannot set up signal handling");
        goto done;
    }
    store_init(cfg->store);
    if (store_worker_start() != 0)
        goto done;
    if (lease_start() != 0)
        goto done;
    event_base_dispatch(control.base);
    log_info("stopped");
    rc = 0;

done:
    if (control.base) {
        if (!control.stopping) {
            state_deactivate("pgrelay-control is exiting");
            lease_stop();
        }
        store_worker_stop(); /* first: a job's end may answer a request (a long poll) */
        http_stop();
        free_events();
        event_base_free(control.base);
    }
    store_close();
    daemon_pidfile_abandon(pid_fd, pidfile);
    free(control.cfg ? control.cfg : cfg);
    return rc;
}
