/* ctl.h - pgrelayctl, the operator CLI of the control plane: exit codes, the per-run context. */
#ifndef PGRELAY_CTL_H
#define PGRELAY_CTL_H

#include <stdbool.h>
#include <stddef.h>

#define CTL_PROG "pgrelayctl"

#define CTL_OP_TIMEOUT_DEFAULT_S 30L        /* what operations may take on the server */
#define CTL_OP_TIMEOUT_MARGIN_S  5.0        /* the HTTP timeout of an operation: its own + this */
#define CTL_CONFIG_MAX           (4u << 20) /* the server refuses larger bodies (413) */
#define CTL_CONFIG_COMMIT_MIN_S  5L /* config apply's commit step may outlast timeout_s by this */

/* Exit statuses, as pgrelayctl(1) documents them. */
typedef enum ctl_exit {
    CTL_EXIT_OK = 0,          /* the command did what was asked */
    CTL_EXIT_FAILED = 1,      /* refused or failed: HTTP 409, other 4xx, "ok": false */
    CTL_EXIT_USAGE = 2,       /* bad options or arguments (nothing was sent) */
    CTL_EXIT_UNREACHABLE = 3, /* no endpoint answered usefully: connection, 5xx, 503, garbage */
    CTL_EXIT_AUTH = 4,        /* the token was refused: HTTP 401 or 403 */
    CTL_EXIT_TIMEOUT = 5,     /* HTTP 504, or no answer within the client's timeout */
    CTL_EXIT_NOT_FOUND = 6,   /* HTTP 404: unknown deployment, proxy or node */
    CTL_EXIT_COMMITTED = 7,   /* config apply: the version is committed (in force) but some
                                 proxies have not acknowledged it yet; they converge to it */
} ctl_exit;

typedef enum ctl_format {
    CTL_FORMAT_TABLE, /* aligned columns for people */
    CTL_FORMAT_JSON,  /* the server's JSON answer, indented, for scripts */
} ctl_format;

/* Everything one run of pgrelayctl knows: global options, the client, command options. */
typedef struct ctl_ctx {
    ctl_format format;
    double timeout_s;       /* HTTP timeout of quick requests (--timeout before the command) */
    int verbose;            /* -v: requests and answers on stderr; -vv: libcurl's trace too */
    const char *deployment; /* --deployment, PGRELAYCTL_DEPLOYMENT, or the only one there is */
    struct ctl_http *http;  /* the endpoints, with the token */

    /* Options after the command words (only the ones the command accepts are parsed). */
    const char *node;  /* switchover --node */
    bool promote;      /* switchover --promote */
    bool force;        /* switchover --force */
    long op_timeout_s; /* switchover/maintenance/config apply --timeout: what the server may take */
    bool op_timeout_given; /* --timeout was given after the command */
    long resume_after_s; /* maintenance on --resume-after: its own end (0: none) */
    const char *query; /* show-plans --query: plans whose text contains it */
    bool changed;      /* show-plans --changed: the plan changes instead */

    /* Prepared by the command's checks before anything is sent. */
    bool maintenance_on; /* maintenance on|off */
    char *config_text;   /* config apply FILE: its text (NUL-terminated, UTF-8) */
    size_t config_len;
    char *resolved_deployment; /* owns ctx->deployment when ctl_resolve_deployment chose it */

    /* Positional arguments after the command words. */
    int argc;
    char **argv;
} ctl_ctx;

/* Command handlers (ctl_cmd.c). Each prints its result on stdout, its error on stderr (one
 * line) and returns the exit status. */
ctl_exit ctl_cmd_show_deployments(ctl_ctx *ctx);
ctl_exit ctl_cmd_show_proxies(ctl_ctx *ctx);
ctl_exit ctl_cmd_show_nodes(ctl_ctx *ctx);
ctl_exit ctl_cmd_show_queries(ctl_ctx *ctx);
ctl_exit ctl_cmd_show_metrics(ctl_ctx *ctx);
ctl_exit ctl_cmd_unfence(ctl_ctx *ctx);
ctl_exit ctl_cmd_show_operations(ctl_ctx *ctx);
ctl_exit ctl_cmd_show_plans(ctl_ctx *ctx); /* ctl_plans.c */
ctl_exit ctl_cmd_switchover(ctl_ctx *ctx);
ctl_exit ctl_cmd_maintenance(ctl_ctx *ctx);
ctl_exit ctl_cmd_config_apply(ctl_ctx *ctx);
ctl_exit ctl_cmd_config_show(ctl_ctx *ctx);
ctl_exit ctl_cmd_reload(ctl_ctx *ctx);
ctl_exit ctl_cmd_create_proxy(ctl_ctx *ctx);
ctl_exit ctl_cmd_delete_proxy(ctl_ctx *ctx);
ctl_exit ctl_cmd_set_proxy_options(ctl_ctx *ctx);

/* set-proxy-options: every argument after NODE_ID is KEY=VALUE. */
ctl_exit ctl_check_proxy_options(ctl_ctx *ctx);

/* Read config apply's FILE ("-": stdin) into ctx->config_text. CTL_EXIT_USAGE when it cannot
 * be read, is too large, or is not UTF-8 text. */
ctl_exit ctl_read_config_file(ctl_ctx *ctx, const char *path);

/* Pick the deployment when none was named: the only one the control plane has, else an error
 * listing them. */
ctl_exit ctl_resolve_deployment(ctl_ctx *ctx);

/* "pgrelayctl: " + the message, on stderr, as one line. */
void ctl_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
