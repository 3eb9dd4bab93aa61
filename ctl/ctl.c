/* ctl.c - pgrelayctl's command line: global options, the command table, dispatch. */
#include "ctl.h"
#include "ctl_http.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CTL_DEFAULT_ENDPOINT  "http://127.0.0.1:8080"
#define CTL_DEFAULT_TIMEOUT_S 10.0
#define CTL_TIMEOUT_MAX_S     86400.0 /* a day: larger values are surely a mistake */
#define CTL_OP_TIMEOUT_MAX_S  3600L   /* pgrelay-control refuses more */
#define CTL_WORDS_MAX         2       /* "config apply" */
#define CTL_OPTIONS_MAX       17      /* set-proxy-options: NODE_ID and 16 KEY=VALUE */
#define CTL_SYNOPSIS_MAX      128
#define CTL_HELP_COLUMN       32 /* where a command's help starts in --help */
#define CTL_ENV_ENDPOINT      "PGRELAYCTL_ENDPOINT"
#define CTL_ENV_TOKEN         "PGRELAYCTL_TOKEN"
#define CTL_ENV_DEPLOYMENT    "PGRELAYCTL_DEPLOYMENT"
#define CTL_ENV_CACERT        "PGRELAYCTL_CACERT"
#define CTL_ENV_CERT          "PGRELAYCTL_CERT"
#define CTL_ENV_KEY           "PGRELAYCTL_KEY"

/* getopt_long values of the options without a short form. */
enum ctl_opt_id {
    CTL_OPT_ENDPOINT = 256,
    CTL_OPT_TOKEN,
    CTL_OPT_CACERT,     /* global: CA file for https:// endpoints */
    CTL_OPT_CERT,       /* global: client certificate */
    CTL_OPT_KEY,        /* global: its key */
    CTL_OPT_TIMEOUT,    /* global: HTTP timeout */
    CTL_OPT_NODE,       /* switchover */
    CTL_OPT_PROMOTE,    /* switchover */
    CTL_OPT_OP_TIMEOUT, /* switchover, maintenance, unfence, config apply: sent as timeout_s */
    CTL_OPT_FORCE,      /* switchover */
    CTL_OPT_RESUME_AFTER, /* maintenance on: sent as resume_after_s */
    CTL_OPT_QUERY,        /* show-plans */
    CTL_OPT_CHANGED,    /* show-plans */
};

/* Which command options a command accepts (ctl_command.options) or needs (.required). */
#define CTL_ACCEPTS_NODE       (1u << 0)
#define CTL_ACCEPTS_PROMOTE    (1u << 1)
#define CTL_ACCEPTS_OP_TIMEOUT (1u << 2)
#define CTL_ACCEPTS_FORCE      (1u << 3)
#define CTL_ACCEPTS_RESUME     (1u << 4)
#define CTL_ACCEPTS_QUERY      (1u << 5)
#define CTL_ACCEPTS_CHANGED    (1u << 6)

#define CTL_SHORT_OPTIONS "d:o:vVh"

static const struct option ctl_global_options[] = {
    {"endpoint", required_argument, NULL, CTL_OPT_ENDPOINT},
    {"token", required_argument, NULL, CTL_OPT_TOKEN},
    {"cacert", required_argument, NULL, CTL_OPT_CACERT},
    {"cert", required_argument, NULL, CTL_OPT_CERT},
    {"key", required_argument, NULL, CTL_OPT_KEY},
    {"deployment", required_argument, NULL, 'd'},
    {"output", required_argument, NULL, 'o'},
    {"timeout", required_argument, NULL, CTL_OPT_TIMEOUT},
    {"verbose", no_argument, NULL, 'v'},
    {"version", no_argument, NULL, 'V'},
    {"help", no_argument, NULL, 'h'},
};
#define CTL_N_GLOBAL_OPTIONS (sizeof(ctl_global_options) / sizeof(ctl_global_options[0]))

/* Options that belong to a command; after its words they take precedence over the global
 * option of the same name (--timeout). */
typedef struct ctl_command_option {
    struct option opt;
    unsigned bit;         /* CTL_ACCEPTS_* */
    const char *synopsis; /* "--node NAME" */
    const char *help;     /* one line */
} ctl_command_option;

static const ctl_command_option ctl_command_options[] = {
    {{"node", required_argument, NULL, CTL_OPT_NODE},
     CTL_ACCEPTS_NODE,
     "--node NAME",
     "the database node that becomes the write leader"},
    {{"timeout", required_argument, NULL, CTL_OPT_OP_TIMEOUT},
     CTL_ACCEPTS_OP_TIMEOUT,
     "--timeout S",
     "seconds the control plane waits for every live proxy (default 30)"},
    {{"promote", no_argument, NULL, CTL_OPT_PROMOTE},
     CTL_ACCEPTS_PROMOTE,
     "--promote",
     "promote the node (pg_promote) once it has replayed the leader's WAL"},
    {{"force", no_argument, NULL, CTL_OPT_FORCE},
     CTL_ACCEPTS_FORCE,
     "--force",
     "go on when the old leader cannot be fenced (the operator takes the risk)"},
    {{"resume-after", required_argument, NULL, CTL_OPT_RESUME_AFTER},
     CTL_ACCEPTS_RESUME,
     "--resume-after S",
     "maintenance on ends by itself after S seconds (default: at maintenance off)"},
    {{"query", required_argument, NULL, CTL_OPT_QUERY},
     CTL_ACCEPTS_QUERY,
     "--query TEXT",
     "only the plans whose normalised text contains TEXT"},
    {{"changed", no_argument, NULL, CTL_OPT_CHANGED},
     CTL_ACCEPTS_CHANGED,
     "--changed",
     "the plan changes (shape differs from the plan before), each with both plans"},
};
#define CTL_N_COMMAND_OPTIONS (sizeof(ctl_command_options) / sizeof(ctl_command_options[0]))

static ctl_exit ctl_check_maintenance(ctl_ctx *ctx);
static ctl_exit ctl_check_config_apply(ctl_ctx *ctx);
static ctl_exit ctl_cmd_help(ctl_ctx *ctx);

typedef struct ctl_command {
    const char *words;      /* "config apply" */
    const char *args;       /* synopsis after the words and options, "" when none */
    const char *help;       /* one line */
    unsigned options;       /* CTL_ACCEPTS_* */
    unsigned required;      /* CTL_ACCEPTS_* that must be given */
    int min_args, max_args; /* positional arguments */
    bool needs_deployment;
    ctl_exit (*check)(ctl_ctx *ctx); /* argument checks before anything is sent; NULL: none */
    ctl_exit (*handler)(ctl_ctx *ctx);
} ctl_command;

static const ctl_command ctl_commands[] = {
    {"show-deployments", "", "deployments and how many of their proxies are live", 0, 0, 0, 0,
     false, NULL, ctl_cmd_show_deployments},
    {"show-proxies", "", "proxies: host, version, last seen, live, epoch, leader, ..., status", 0,
     0, 0, 0, true, NULL, ctl_cmd_show_proxies},
    {"create-proxy", "NODE_ID", "declare a proxy: it votes and takes commands", 0, 0, 1, 1, true,
     NULL, ctl_cmd_create_proxy},
    {"delete-proxy", "NODE_ID", "undeclare a proxy: it is pending again", 0, 0, 1, 1, true, NULL,
     ctl_cmd_delete_proxy},
    {"set-proxy-options", "NODE_ID KEY=VALUE...",
     "a declared proxy's maintenance_exempt=on|off, read_only=on|off, address=IP (empty: "
     "default)", 0, 0, 2,
     CTL_OPTIONS_MAX, true, ctl_check_proxy_options, ctl_cmd_set_proxy_options},
    {"show-nodes", "", "database nodes: address, role, leader, health, lag", 0, 0, 0, 0, true, NULL,
     ctl_cmd_show_nodes},
    {"show-queries", "", "running statements on every proxy", 0, 0, 0, 0, true, NULL,
     ctl_cmd_show_queries},
    {"show-metrics", "", "per proxy and node: sessions, statements/s, bytes/s, errors/s, latency",
     0, 0, 0, 0, true, NULL, ctl_cmd_show_metrics},
    {"show-plans", "", "EXPLAIN plans of slow, sampled and running statements, as trees",
     CTL_ACCEPTS_QUERY | CTL_ACCEPTS_CHANGED, 0, 0, 0, true, NULL, ctl_cmd_show_plans},
    {"show-operations", "", "switchovers: node, state, steps done, outcome (newest first)", 0, 0,
     0, 0, true, NULL, ctl_cmd_show_operations},
    {"switchover", "", "make node NAME the write leader of every proxy",
     CTL_ACCEPTS_NODE | CTL_ACCEPTS_PROMOTE | CTL_ACCEPTS_OP_TIMEOUT | CTL_ACCEPTS_FORCE,
     CTL_ACCEPTS_NODE, 0, 0, true, NULL, ctl_cmd_switchover},
    {"unfence", "NODE", "lift the fence a switchover left on node NODE", CTL_ACCEPTS_OP_TIMEOUT, 0,
     1, 1, true, NULL, ctl_cmd_unfence},
    {"maintenance", "on|off", "pause (on) or resume (off) every live proxy",
     CTL_ACCEPTS_OP_TIMEOUT | CTL_ACCEPTS_RESUME, 0, 1, 1, true, ctl_check_maintenance,
     ctl_cmd_maintenance},
    {"config apply", "FILE", "every proxy's pgrelay.ini from FILE (- stdin), all or none",
     CTL_ACCEPTS_OP_TIMEOUT, 0, 1, 1, true, ctl_check_config_apply, ctl_cmd_config_apply},
    {"config show", "", "configuration version and text; each proxy's version", 0, 0, 0, 0, true,
     NULL, ctl_cmd_config_show},
    {"reload", "", "every live proxy reloads its configuration file", 0, 0, 0, 0, true, NULL,
     ctl_cmd_reload},
    {"help", "[COMMAND]", "this list, or one command's options", 0, 0, 0, CTL_WORDS_MAX, false,
     NULL, ctl_cmd_help},
};
#define CTL_N_COMMANDS (sizeof(ctl_commands) / sizeof(ctl_commands[0]))

void ctl_error(const char *fmt, ...)
{
    va_list ap;
    fputs(CTL_PROG ": ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* "maintenance on|off [--timeout S]" */
static void ctl_command_synopsis(const ctl_command *c, char *out, size_t outlen)
{
    size_t used = 0;
    int n = snprintf(out, outlen, "%s%s%s", c->words, c->args[0] ? " " : "", c->args);
    used = n > 0 ? (size_t)n : 0;
    for (size_t i = 0; i < CTL_N_COMMAND_OPTIONS && used < outlen; i++) {
        const ctl_command_option *o = &ctl_command_options[i];
        if (!(c->options & o->bit))
            continue;
        n = snprintf(out + used, outlen - used, (c->required & o->bit) ? " %s" : " [%s]",
                     o->synopsis);
        used += n > 0 ? (size_t)n : 0;
    }
}

static void ctl_command_usage(FILE *out, const ctl_command *c)
{
    char synopsis[CTL_SYNOPSIS_MAX];
    ctl_command_synopsis(c, synopsis, sizeof(synopsis));
    fprintf(out, "Usage: " CTL_PROG " [OPTION]... %s\n\n%s\n", synopsis, c->help);
    if (c->options) {
        fprintf(out, "\nOptions:\n");
        for (size_t i = 0; i < CTL_N_COMMAND_OPTIONS; i++) {
            const ctl_command_option *o = &ctl_command_options[i];
            if (c->options & o->bit)
                fprintf(out, "  %-18s %s%s\n", o->synopsis, o->help,
                        (c->required & o->bit) ? " (required)" : "");
        }
    }
    fprintf(out, "\nThe global options (" CTL_PROG " --help) are accepted too.\n");
}

static void ctl_usage(FILE *out)
{
    fprintf(out,
            CTL_PROG
            " %s - operate pgrelay proxies through the control plane\n"
            "\n"
            "Usage: " CTL_PROG " [OPTION]... COMMAND [ARG]...\n"
            "\n"
            "Options (also accepted after the command):\n"
            "      --endpoint URL[,URL]...  control plane (env " CTL_ENV_ENDPOINT ", default\n"
            "                               " CTL_DEFAULT_ENDPOINT
            "); the next URL is tried when one\n"
            "                               cannot be reached or answers 503\n"
            "      --token TOKEN            admin token (env " CTL_ENV_TOKEN "; required)\n"
            "      --cacert FILE            CA (PEM) the https:// endpoints must chain to (env\n"
            "                               " CTL_ENV_CACERT "; default: the system's CAs)\n"
            "      --cert FILE              client certificate (PEM) (env " CTL_ENV_CERT ")\n"
            "      --key FILE               its private key (PEM) (env " CTL_ENV_KEY ")\n"
            "  -d, --deployment NAME        deployment (env " CTL_ENV_DEPLOYMENT "; default: the\n"
            "                               only one there is)\n"
            "  -o, --output table|json      output format (default table)\n"
            "      --timeout S              HTTP timeout in seconds (default 10); "
            "operations\n"
            "                               wait for their own --timeout plus 5\n"
            "  -v, --verbose                show requests and answers on stderr "
            "(-vv: more)\n"
            "  -V, --version                print the version and exit\n"
            "  -h, --help                   print this help and exit\n"
            "\n"
            "Commands:\n",
            PGRELAY_VERSION);
    for (size_t i = 0; i < CTL_N_COMMANDS; i++) {
        const ctl_command *c = &ctl_commands[i];
        char synopsis[CTL_SYNOPSIS_MAX];
        ctl_command_synopsis(c, synopsis, sizeof(synopsis));
        if (strlen(synopsis) < CTL_HELP_COLUMN - 3)
            fprintf(out, "  %-*s %s\n", CTL_HELP_COLUMN - 3, synopsis, c->help);
        else
            fprintf(out, "  %s\n  %-*s %s\n", synopsis, CTL_HELP_COLUMN - 3, "", c->help);
    }
    fprintf(out, "\n"
                 "Exit status: 0 done, 1 failed or refused, 2 usage error, 3 no endpoint "
                 "reachable\n"
                 "(or 5xx, or a malformed answer), 4 authentication failed, 5 timed out, "
                 "6 not found,\n"
                 "7 config apply committed (in force) but not yet on every proxy.\n"
                 "'" CTL_PROG " COMMAND --help' shows a command's options; see " CTL_PROG "(1).\n");
}

/* The command whose words start argv, or NULL. *nwords gets how many words it has. */
static const ctl_command *ctl_find_command(int argc, char **argv, int *nwords)
{
    for (size_t i = 0; i < CTL_N_COMMANDS; i++) {
        const char *w = ctl_commands[i].words;
        int n = 0;
        while (n < argc) {
            size_t len = strcspn(w, " ");
            if (strlen(argv[n]) != len || strncmp(argv[n], w, len) != 0)
                break;
            n++;
            w += len;
            if (*w == '\0') {
                *nwords = n;
                return &ctl_commands[i];
            }
            w++;
        }
    }
    return NULL;
}

/* "config apply FILE, config show" for a first word that only starts commands. */
static bool ctl_command_group(const char *word, char *out, size_t outlen)
{
    size_t len = strlen(word), used = 0;
    for (size_t i = 0; i < CTL_N_COMMANDS; i++) {
        const ctl_command *c = &ctl_commands[i];
        if (strncmp(c->words, word, len) != 0 || c->words[len] != ' ')
            continue;
        if (used < outlen)
            used += (size_t)snprintf(out + used, outlen - used, "%s%s%s%s", used ? ", " : "",
                                     c->words, c->args[0] ? " " : "", c->args);
    }
    return used > 0;
}

static ctl_exit ctl_cmd_help(ctl_ctx *ctx)
{
    int nwords = 0;
    if (ctx->argc == 0) {
        ctl_usage(stdout);
        return CTL_EXIT_OK;
    }
    const ctl_command *c = ctl_find_command(ctx->argc, ctx->argv, &nwords);
    if (!c || nwords != ctx->argc) {
        ctl_error("help: no command \"%s\"; see '" CTL_PROG " --help'", ctx->argv[0]);
        return CTL_EXIT_USAGE;
    }
    ctl_command_usage(stdout, c);
    return CTL_EXIT_OK;
}

static ctl_exit ctl_check_maintenance(ctl_ctx *ctx)
{
    if (strcmp(ctx->argv[0], "on") != 0 && strcmp(ctx->argv[0], "off") != 0) {
        ctl_error("maintenance: \"%s\" is neither on nor off", ctx->argv[0]);
        return CTL_EXIT_USAGE;
    }
    ctx->maintenance_on = strcmp(ctx->argv[0], "on") == 0;
    if (!ctx->maintenance_on && ctx->resume_after_s > 0) {
        ctl_error("maintenance: --resume-after goes with on, not off");
        return CTL_EXIT_USAGE;
    }
    return CTL_EXIT_OK;
}

static ctl_exit ctl_check_config_apply(ctl_ctx *ctx)
{
    return ctl_read_config_file(ctx, ctx->argv[0]);
}

/* Global settings as given on the command line (NULL when not given). */
typedef struct ctl_settings {
    const char *endpoint;
    const char *token;
    const char *cacert;
    const char *cert;
    const char *key;
    bool help;
} ctl_settings;

static int ctl_parse_timeout(const char *text, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || end == text || *end || !isfinite(v) || v <= 0 || v > CTL_TIMEOUT_MAX_S) {
        ctl_error("--timeout: \"%s\" is not a number of seconds between 0 and %.0f", text,
                  CTL_TIMEOUT_MAX_S);
        return -1;
    }
    *out = v;
    return 0;
}

static int ctl_parse_op_timeout(const char *text, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < 1 || v > CTL_OP_TIMEOUT_MAX_S) {
        ctl_error("--timeout: \"%s\" is not a whole number of seconds from 1 to %ld", text,
                  CTL_OP_TIMEOUT_MAX_S);
        return -1;
    }
    *out = v;
    return 0;
}

static int ctl_parse_resume_after(const char *text, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < 1 || v > INT32_MAX) {
        ctl_error("--resume-after: \"%s\" is not a whole number of seconds from 1 to %d", text,
                  INT32_MAX);
        return -1;
    }
    *out = v;
    return 0;
}

/* Apply one parsed option. Returns 0, 1 for --version (printed), or -1 on a usage error. */
static int ctl_apply_option(ctl_ctx *ctx, ctl_settings *s, int opt, const char *arg)
{
    switch (opt) {
    case CTL_OPT_ENDPOINT:
        s->endpoint = arg;
        return 0;
    case CTL_OPT_TOKEN:
        s->token = arg;
        return 0;
    case CTL_OPT_CACERT:
        s->cacert = arg;
        return 0;
    case CTL_OPT_CERT:
        s->cert = arg;
        return 0;
    case CTL_OPT_KEY:
        s->key = arg;
        return 0;
    case 'd':
        ctx->deployment = arg;
        return 0;
    case 'o':
        if (strcmp(arg, "table") == 0) {
            ctx->format = CTL_FORMAT_TABLE;
        } else if (strcmp(arg, "json") == 0) {
            ctx->format = CTL_FORMAT_JSON;
        } else {
            ctl_error("-o: \"%s\" is neither table nor json", arg);
            return -1;
        }
        return 0;
    case CTL_OPT_TIMEOUT:
        return ctl_parse_timeout(arg, &ctx->timeout_s);
    case 'v':
        ctx->verbose++;
        return 0;
    case 'V':
        printf(CTL_PROG " %s\n", PGRELAY_VERSION);
        return 1;
    case 'h':
        s->help = true;
        return 0;
    case CTL_OPT_NODE:
        ctx->node = arg;
        return 0;
    case CTL_OPT_PROMOTE:
        ctx->promote = true;
        return 0;
    case CTL_OPT_FORCE:
        ctx->force = true;
        return 0;
    case CTL_OPT_QUERY:
        ctx->query = arg;
        return 0;
    case CTL_OPT_CHANGED:
        ctx->changed = true;
        return 0;
    case CTL_OPT_OP_TIMEOUT:
        ctx->op_timeout_given = true;
        return ctl_parse_op_timeout(arg, &ctx->op_timeout_s);
    case CTL_OPT_RESUME_AFTER:
        return ctl_parse_resume_after(arg, &ctx->resume_after_s);
    default:
        return -1; /* getopt_long has said what was wrong */
    }
}

/* The command's own options, then the global ones, then the terminator. */
static struct option *ctl_command_longopts(const ctl_command *c)
{
    struct option *opts = calloc(CTL_N_COMMAND_OPTIONS + CTL_N_GLOBAL_OPTIONS + 1, sizeof(*opts));
    size_t n = 0;
    if (!opts)
        return NULL;
    for (size_t i = 0; i < CTL_N_COMMAND_OPTIONS; i++)
        if (c->options & ctl_command_options[i].bit)
            opts[n++] = ctl_command_options[i].opt;
    for (size_t i = 0; i < CTL_N_GLOBAL_OPTIONS; i++)
        opts[n++] = ctl_global_options[i];
    return opts;
}

static const char *ctl_env(const char *name)
{
    const char *v = getenv(name);
    return v && v[0] ? v : NULL;
}

int main(int argc, char **argv)
{
    struct option global[CTL_N_GLOBAL_OPTIONS + 1] = {{0}};
    ctl_ctx ctx = {.format = CTL_FORMAT_TABLE,
                   .timeout_s = CTL_DEFAULT_TIMEOUT_S,
                   .op_timeout_s = CTL_OP_TIMEOUT_DEFAULT_S};
    ctl_settings s = {0};
    ctl_http http = {0};
    struct option *longopts = NULL;
    const ctl_command *cmd = NULL;
    char err[CTL_MESSAGE_MAX];
    ctl_exit rc = CTL_EXIT_USAGE;
    int opt, nwords = 0, applied;

    memcpy(global, ctl_global_options, sizeof(ctl_global_options));
    /* '+': stop at the command; what follows it is parsed with the command's options. */
    while ((opt = getopt_long(argc, argv, "+" CTL_SHORT_OPTIONS, global, NULL)) != -1) {
        if ((applied = ctl_apply_option(&ctx, &s, opt, optarg)) != 0) {
            rc = applied > 0 ? CTL_EXIT_OK : CTL_EXIT_USAGE;
            goto usage_hint;
        }
    }
    if (optind >= argc) {
        if (s.help) {
            ctl_usage(stdout);
            return CTL_EXIT_OK;
        }
        ctl_error("no command given");
        goto usage_hint;
    }
    cmd = ctl_find_command(argc - optind, argv + optind, &nwords);
    if (!cmd) {
        char group[CTL_MESSAGE_MAX / 2];
        if (ctl_command_group(argv[optind], group, sizeof(group)))
            ctl_error("\"%s\" needs a subcommand: %s", argv[optind], group);
        else
            ctl_error("unknown command \"%s\"", argv[optind]);
        goto usage_hint;
    }

    /* Re-parse from the last command word, which getopt takes for the program name. */
    int sub_argc = argc - optind - nwords + 1;
    char **sub_argv = argv + optind + nwords - 1;
    if (!(longopts = ctl_command_longopts(cmd))) {
        ctl_error("out of memory");
        rc = CTL_EXIT_FAILED;
        goto done;
    }
    optind = 0; /* glibc: start afresh */
    while ((opt = getopt_long(sub_argc, sub_argv, CTL_SHORT_OPTIONS, longopts, NULL)) != -1) {
        if ((applied = ctl_apply_option(&ctx, &s, opt, optarg)) != 0) {
            rc = applied > 0 ? CTL_EXIT_OK : CTL_EXIT_USAGE;
            goto command_hint;
        }
    }
    if (s.help) {
        ctl_command_usage(stdout, cmd);
        rc = CTL_EXIT_OK;
        goto done;
    }
    ctx.argc = sub_argc - optind;
    ctx.argv = sub_argv + optind;
    if (ctx.argc < cmd->min_args || ctx.argc > cmd->max_args) {
        ctl_error("%s: %s", cmd->words,
                  ctx.argc < cmd->min_args ? "missing argument" : "too many arguments");
        goto command_hint;
    }
    if ((cmd->required & CTL_ACCEPTS_NODE) && !ctx.node) {
        ctl_error("%s: --node NAME is required", cmd->words);
        goto command_hint;
    }
    if (cmd->handler == ctl_cmd_help) {
        rc = ctl_cmd_help(&ctx);
        goto done;
    }
    if (cmd->check && (rc = cmd->check(&ctx)) != CTL_EXIT_OK)
        goto done;

    const char *endpoint = s.endpoint ? s.endpoint : ctl_env(CTL_ENV_ENDPOINT);
    const char *token = s.token ? s.token : ctl_env(CTL_ENV_TOKEN);
    if (!ctx.deployment)
        ctx.deployment = ctl_env(CTL_ENV_DEPLOYMENT);
    if (!token) {
        ctl_error("no token: give --token TOKEN or set " CTL_ENV_TOKEN);
        rc = CTL_EXIT_USAGE;
        goto done;
    }
    if (ctl_http_init(&http, endpoint ? endpoint : CTL_DEFAULT_ENDPOINT, token, ctx.verbose, err,
                      sizeof(err)) != 0) {
        ctl_error("%s", err);
        rc = CTL_EXIT_USAGE;
        goto done;
    }
    ctx.http = &http;
    if (ctl_http_tls(&http, s.cacert ? s.cacert : ctl_env(CTL_ENV_CACERT),
                     s.cert ? s.cert : ctl_env(CTL_ENV_CERT), s.key ? s.key : ctl_env(CTL_ENV_KEY),
                     err, sizeof(err)) != 0) {
        ctl_error("%s", err);
        rc = CTL_EXIT_USAGE;
        goto done;
    }
    if (cmd->needs_deployment && !ctx.deployment &&
        (rc = ctl_resolve_deployment(&ctx)) != CTL_EXIT_OK)
        goto done;
    rc = cmd->handler(&ctx);
    goto done;

command_hint:
    if (rc == CTL_EXIT_USAGE)
        fprintf(stderr, "Try '" CTL_PROG " %s --help' for more information.\n", cmd->words);
    goto done;
usage_hint:
    if (rc == CTL_EXIT_USAGE)
        fprintf(stderr, "Try '" CTL_PROG " --help' for more information.\n");
done:
    if (ctx.http)
        ctl_http_free(&http);
    free(ctx.resolved_deployment);
    free(ctx.config_text);
    free(longopts);
    return (int)rc;
}
