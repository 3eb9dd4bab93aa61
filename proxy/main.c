/* main.c - pgrelay's command line: flags, config check, daemon mode, pidfile, then the master. */
#include "config.h"
#include "daemon.h"
#include "log.h"
#include "master.h"
#include "net.h"
#include "tls.h"
#include "worker.h"

#include <limits.h>

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int pgrelay_run(config *cfg, const char *config_path, bool check, bool daemon_mode,
                       const master_options *opts);

static void usage(FILE *out)
{
    fprintf(out,
            "pgrelay %s - PostgreSQL proxy that follows the write leader\n"
            "\n"
            "Usage: pgrelay [OPTION]...\n"
            "\n"
            "Options:\n"
            "  -c, --config FILE    configuration file (default %s)\n"
            "  -t, --check          check the configuration file and exit (0 valid, 1 not)\n"
            "  -d, --daemon         detach and run in the background\n"
            "  -p, --pidfile FILE   write the master's pid to FILE; refuse to start if another\n"
            "                       running pgrelay holds it\n"
            "  -v, --verbose        log more (repeat for debug)\n"
            "  -q, --quiet          log only errors\n"
            "  -V, --version        print the version and exit\n"
            "  -h, --help           print this help and exit\n"
            "\n"
            "Signals: TERM graceful shutdown, INT fast shutdown, QUIT immediate shutdown.\n"
            "See pgrelay(8) and pgrelay.ini(5).\n",
            PGRELAY_VERSION, CONFIG_DEFAULT_PATH);
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"config", required_argument, NULL, 'c'}, {"check", no_argument, NULL, 't'},
        {"daemon", no_argument, NULL, 'd'},       {"pidfile", required_argument, NULL, 'p'},
        {"verbose", no_argument, NULL, 'v'},      {"quiet", no_argument, NULL, 'q'},
        {"version", no_argument, NULL, 'V'},      {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *config_path = CONFIG_DEFAULT_PATH;
    const char *pidfile = NULL;
    bool check = false, daemon_mode = false, quiet = false;
    int verbose = 0, opt;

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
            verbose++;
            break;
        case 'q':
            quiet = true;
            break;
        case 'V':
            printf("pgrelay %s\n", PGRELAY_VERSION);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            fprintf(stderr, "Try 'pgrelay --help' for more information.\n");
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "pgrelay: unexpected argument \"%s\"\nTry 'pgrelay --help'.\n",
                argv[optind]);
        return 2;
    }

    config *cfg = calloc(1, sizeof(*cfg));
    if (!cfg) {
        fprintf(stderr, "pgrelay: out of memory\n");
        return 1;
    }
    master_options opts = {.pidfile = pidfile, .verbose = verbose, .quiet = quiet};
    int rc = pgrelay_run(cfg, config_path, check, daemon_mode, &opts);
    free(cfg);
    return rc;
}

/* Everything after the flags: load and check the file, detach, listen, run the master. */
static int pgrelay_run(config *cfg, const char *config_path, bool check, bool daemon_mode,
                       const master_options *opts)
{
    const char *pidfile = opts->pidfile;
    /* Absolute, so that reloads still find it after daemon mode's chdir("/"). */
    char config_abs[PATH_MAX];
    if (realpath(config_path, config_abs))
        config_path = config_abs;
    int errors = config_load(cfg, config_path);
    if (errors > 0) {
        for (int i = 0; i < cfg->n_errors; i++)
            fprintf(stderr, "%s\n", cfg->errors[i]);
        if (!check)
            fprintf(stderr, "pgrelay: %d error(s) in %s; not starting\n", errors, config_path);
        return 1;
    }
    /* Certificates and keys are read now: a broken one stops the check and the start. */
    char tls_err[1024];
    shm_tls_files *tls_files = tls_load(cfg, tls_err, sizeof(tls_err));
    free(tls_files); /* the workers inherit the contexts */
    if (!tls_files) {
        fprintf(stderr, "%s: %s\n", config_path, tls_err);
        if (!check)
            fprintf(stderr, "pgrelay: TLS configuration error in %s; not starting\n",
                    config_path);
        return 1;
    }
    char exposed[PATH_MAX + 200];
    bool secrets_exposed = config_secrets_exposed(cfg, config_path, exposed, sizeof(exposed));
    if (check) {
        if (secrets_exposed)
            fprintf(stderr, "%s: warning: %s\n", config_path, exposed);
        printf("%s: configuration is valid (%d node(s))\n", config_path, cfg->n_nodes);
        return 0;
    }

    int level = cfg->log_level + opts->verbose;
    if (level > LOG_LVL_DEBUG)
        level = LOG_LVL_DEBUG;
    cfg->log_level = opts->quiet ? LOG_LVL_ERROR : level;
    log_current_level = (log_level)cfg->log_level;
    log_set_process("master");
    if (secrets_exposed)
        log_warning("%s: %s", config_path, exposed);

    if (daemon_mode && !cfg->logfile[0] && !cfg->syslog) {
        fprintf(stderr, "pgrelay: daemon mode needs logfile or syslog = on in %s "
                        "(otherwise its logs would be lost)\n", config_path);
        return 1;
    }
    int pid_fd = -1;
    if (pidfile && (pid_fd = daemon_pidfile_lock("pgrelay", pidfile)) < 0)
        return 1;
    int *listen_fds[2] = {NULL, NULL};

    /* From here on log lines go where the configuration says; start-up failures are also
     * printed on the terminal while there still is one. */
    if (cfg->logfile[0] && log_open_file(cfg->logfile) != 0) {
        fprintf(stderr, "pgrelay: cannot open logfile %s: %s\n", cfg->logfile,
                strerror(errno));
        goto fail;
    }

    /* Open the listen sockets before detaching, so "port in use" reaches the terminal: one
     * per worker and port (SO_REUSEPORT), kept by the master for the workers it respawns. */
    char err[512];
    const int ports[2] = {cfg->listen_port, cfg->read_listen_port};
    for (int i = 0; i < 2; i++) {
        listen_fds[i] = malloc((size_t)cfg->workers * sizeof(int));
        if (!listen_fds[i]) {
            log_error("out of memory");
            goto fail;
        }
        for (int k = 0; k < cfg->workers; k++)
            listen_fds[i][k] = -1;
    }
    for (int i = 0; i < 2; i++) {
        if (ports[i] == 0)
            continue;
        if (net_listen_group(cfg->listen_addr, ports[i], cfg->workers, listen_fds[i], err,
                             sizeof(err)) != 0) {
            log_error("%s", err);
            if (cfg->logfile[0])
                fprintf(stderr, "pgrelay: %s\n", err);
            goto fail;
        }
        log_info("listening on %s:%d (%s port)", cfg->listen_addr, ports[i],
                 i == 0 ? "write" : "read-only");
    }
    if (daemon_mode && daemon_detach() != 0) {
        log_error("cannot detach: %s", strerror(errno));
        goto fail;
    }
    config_apply_logging(cfg);
    if (pid_fd >= 0 && daemon_pidfile_write(pid_fd, pidfile) != 0)
        goto fail;
    int rc = master_run(cfg, listen_fds, opts); /* it has closed the sockets */
    free(listen_fds[0]);
    free(listen_fds[1]);
    return rc;

fail: /* not started: no listen socket and no pidfile are left behind */
    for (int i = 0; i < 2; i++) {
        for (int k = 0; listen_fds[i] && k < cfg->workers; k++)
            if (listen_fds[i][k] >= 0)
                close(listen_fds[i][k]);
        free(listen_fds[i]);
    }
    daemon_pidfile_abandon(pid_fd, pidfile);
    return 1;
}
