/* cconfig.c - reads control.ini with inih, driven by the key table; every problem names file:line.
 */
#include "cconfig.h"
#include "inifile.h"
#include "log.h"
#include "tls.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const char *const level_words[] = {"error", "warning", "info", "debug", NULL};


#define MS_PER_S        1000LL
#define MS_PER_MIN      (60 * MS_PER_S)
#define MS_PER_H        (60 * MS_PER_MIN)
#define MS_PER_D        (24 * MS_PER_H)
#define DURATION_MAX_MS (3650 * MS_PER_D) /* ten years: anything longer is a typo */
#define LEASE_SECS_MAX  3600

#define CTL_KEY(name_, type_, def_, reload_, field_, min_, max_, words_, help_)                    \
    {                                                                                              \
        "control", name_, type_, def_, reload_, offsetof(cconfig, field_),                         \
            sizeof(((cconfig *)0)->field_), min_, max_, words_, help_                              \
    }
#define LEASE_KEY(name_, type_, def_, field_, min_, max_, help_)                                   \
    {                                                                                              \
        "lease", name_, type_, def_, false, offsetof(cconfig, field_),                             \
            sizeof(((cconfig *)0)->field_), min_, max_, NULL, help_                                \
    }
#define DEP_KEY(name_, type_, def_, field_, help_)                                                 \
    {                                                                                              \
        "deployment", name_, type_, def_, true, offsetof(cconfig_deployment, field_),              \
            sizeof(((cconfig_deployment *)0)->field_), 0, 0, NULL, help_                           \
    }

const cconfig_key cconfig_keys[] = {
    CTL_KEY("listen_addr", KEY_STRING, "127.0.0.1", false, listen_addr, 0, 0, NULL,
            "address the HTTP API listens on (IPv4, IPv6 or host name; 0.0.0.0 for all)"),
    CTL_KEY("listen_port", KEY_INT, "8080", false, listen_port, 1, 65535, NULL,
            "TCP port of the HTTP API"),
    CTL_KEY("tls_cert_file", KEY_STRING, "", true, tls_cert_file, 0, 0, NULL,
            "certificate chain (PEM) of HTTPS; with tls_key_file the API speaks only HTTPS"),
    CTL_KEY("tls_key_file", KEY_STRING, "", true, tls_key_file, 0, 0, NULL,
            "private key (PEM) of tls_cert_file"),
    CTL_KEY("tls_client_ca_file", KEY_STRING, "", true, tls_client_ca_file, 0, 0, NULL,
            "CA (PEM) that must have signed every client's certificate; empty = none asked"),
    CTL_KEY("store", KEY_STRING, NULL, false, store, 0, 0, NULL,
            "libpq connection string of the PostgreSQL database holding durable state"),
    CTL_KEY("admin_tokens", KEY_STRING, NULL, true, admin_tokens, 0, 0, NULL,
            "comma-separated bearer tokens of operators (pgrelayctl)"),
    CTL_KEY("auto_register", KEY_BOOL, "off", true, auto_register, 0, 0, NULL,
            "an unknown agent token creates a deployment auto-<sha256 prefix>"),
    CTL_KEY("auto_declare", KEY_BOOL, "off", true, auto_declare, 0, 0, NULL,
            "an undeclared proxy is declared when it registers (development only: any holder "
            "of a deployment token becomes a voting member)"),
    CTL_KEY("proxy_timeout", KEY_DURATION64, "10s", true, proxy_timeout_ms, 100, DURATION_MAX_MS,
            NULL, "a proxy is live while its last request is at most this old"),
    CTL_KEY("command_retention", KEY_DURATION64, "7d", true, command_retention_ms, MS_PER_MIN,
            DURATION_MAX_MS, NULL, "commands and their acknowledgements are kept this long"),
    CTL_KEY("pause_lease", KEY_DURATION64, "60s", true, pause_lease_ms, 3 * MS_PER_S, MS_PER_H,
            NULL, "a fleet-wide pause ends by itself this long after it was sent unless renewed"),
    CTL_KEY("telemetry_retention", KEY_DURATION64, "5m", true, telemetry_retention_ms, MS_PER_S,
            DURATION_MAX_MS, NULL,
            "metrics samples, running queries and schema summaries are kept in memory this long"),
    CTL_KEY("poll_wait_max", KEY_DURATION64, "60s", true, poll_wait_max_ms, MS_PER_S,
            10 * MS_PER_MIN, NULL, "the longest wait_s an agent's command long poll may use"),
    CTL_KEY("max_connections", KEY_INT, "0", true, max_connections, 0, INT32_MAX, NULL,
            "open HTTP connections at most (an idle one makes room for a new one); 0 = the "
            "open-files limit less 64"),
    CTL_KEY("idle_timeout", KEY_DURATION64, "60s", true, idle_timeout_ms, MS_PER_S,
            DURATION_MAX_MS, NULL,
            "an HTTP connection with no request waiting for an answer is closed after this"),
    CTL_KEY("log_level", KEY_ENUM, "info", true, log_level, 0, 0, level_words,
            "error, warning, info or debug; -v and -q on the command line override it"),
    CTL_KEY("logfile", KEY_STRING, "", true, logfile, 0, 0, NULL,
            "append log lines to this file instead of stderr; SIGUSR1 reopens it"),
    LEASE_KEY("enabled", KEY_BOOL, "off", lease_enabled, 0, 0,
              "on: several replicas share the store and only the lease holder serves"),
    LEASE_KEY("lease_name", KEY_STRING, "pgrelay-control", lease_name, 0, 0,
              "name of the lease row; replicas with the same name compete"),
    LEASE_KEY("lease_duration_secs", KEY_INT, "15", lease_duration_secs, 1, LEASE_SECS_MAX,
              "a lease not renewed for this many seconds may be taken over"),
    LEASE_KEY("lease_interval_secs", KEY_INT, "5", lease_interval_secs, 1, LEASE_SECS_MAX,
              "seconds between two attempts to take or renew the lease"),
    LEASE_KEY("release_timeout_secs", KEY_INT, "5", release_timeout_secs, 0, LEASE_SECS_MAX,
              "on shutdown, wait at most this many seconds to give the lease up"),
    DEP_KEY("token", KEY_STRING, NULL, token,
            "bearer token of this deployment's agents (required)"),
};
const size_t cconfig_n_keys = sizeof(cconfig_keys) / sizeof(cconfig_keys[0]);

/* Parsing state shared between the line reader and the inih handler. */
typedef struct cconfig_parse {
    cconfig *cfg;
    const char *name;                       /* file name for messages */
    FILE *fp;                               /* file source, or NULL */
    const char *text;                       /* string source, or NULL */
    int line;                               /* number of the line inih is looking at */
    bool section_ok;                        /* the current section is a known one */
    const char *kind;                       /* key-table section: "control", "lease" */
    cconfig_deployment *dep;                /* the current [deployment.NAME], or NULL */
    int control_line;                       /* line of [control], 0 when absent */
    int lease_line;                         /* line of [lease], 0 when absent */
} cconfig_parse;

static void cconfig_error(cconfig_parse *p, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void cconfig_error(cconfig_parse *p, int line, const char *fmt, ...)
{
    cconfig *cfg = p->cfg;
    va_list ap;
    int off;

    if (cfg->n_errors >= CCONFIG_MAX_ERRORS)
        return;
    char *buf = cfg->errors[cfg->n_errors++];
    if (line > 0)
        off = snprintf(buf, CCONFIG_ERROR_LEN, "%s:%d: ", p->name, line);
    else
        off = snprintf(buf, CCONFIG_ERROR_LEN, "%s: ", p->name);
    if (off < 0 || off >= CCONFIG_ERROR_LEN - 1)
        return; /* the file name alone fills the message */
    va_start(ap, fmt);
    vsnprintf(buf + off, CCONFIG_ERROR_LEN - (size_t)off, fmt, ap);
    va_end(ap);
}

int cconfig_parse_duration(const char *text, int64_t *ms_out)
{
    return inifile_duration(text, INT64_MAX, ms_out);
}


const cconfig_key *cconfig_find(const char *section, const char *name)
{
    for (size_t i = 0; i < cconfig_n_keys; i++)
        if (strcmp(cconfig_keys[i].section, section) == 0 &&
            strcmp(cconfig_keys[i].name, name) == 0)
            return &cconfig_keys[i];
    return NULL;
}

static bool deployment_name_valid(const char *name)
{
    if (*name == '\0' || strlen(name) >= CCONFIG_NAME_MAX)
        return false;
    for (const char *c = name; *c; c++)
        if (!isalnum((unsigned char)*c) && *c != '_' && *c != '-')
            return false;
    return true;
}

/* A new [section] header: check the name; for [deployment.NAME] start a deployment. */
static void cconfig_begin_section(cconfig_parse *p, const char *section)
{
    cconfig *cfg = p->cfg;
    p->dep = NULL;
    p->section_ok = false;
    if (strcmp(section, "control") == 0 || strcmp(section, "lease") == 0) {
        bool is_control = strcmp(section, "control") == 0;
        int *seen = is_control ? &p->control_line : &p->lease_line;
        if (*seen)
            cconfig_error(p, p->line, "[%s] appears twice (first at line %d); keys are merged",
                          section, *seen);
        *seen = p->line;
        p->kind = is_control ? "control" : "lease";
        p->section_ok = true;
        return;
    }
    if (strncmp(section, CCONFIG_DEPLOYMENT_PREFIX, strlen(CCONFIG_DEPLOYMENT_PREFIX)) == 0) {
        const char *name = section + strlen(CCONFIG_DEPLOYMENT_PREFIX);
        if (!deployment_name_valid(name)) {
            cconfig_error(p, p->line,
                          "[%s]: deployment name must be 1 to %d letters, digits, '_' or '-'",
                          section, CCONFIG_NAME_MAX - 1);
            return;
        }
        for (int i = 0; i < cfg->n_deployments; i++) {
            if (strcmp(cfg->deployments[i].name, name) == 0) {
                cconfig_error(p, p->line, "[%s]: deployment defined twice (first at line %d)",
                              section, cfg->deployments[i].line);
                return;
            }
        }
        if (cfg->n_deployments >= CCONFIG_MAX_DEPLOYMENTS) {
            cconfig_error(p, p->line, "[%s]: too many deployments (at most %d)", section,
                          CCONFIG_MAX_DEPLOYMENTS);
            return;
        }
        cconfig_deployment *d = &cfg->deployments[cfg->n_deployments++];
        memset(d, 0, sizeof(*d));
        snprintf(d->name, sizeof(d->name), "%s", name);
        d->line = p->line;
        p->dep = d;
        p->section_ok = true;
        return;
    }
    cconfig_error(p, p->line, "unknown section [%s] (known: [control], [lease], [deployment.NAME])",
                  section);
}

static void cconfig_on_section(void *user, int line, const char *section)
{
    cconfig_parse *p = user;
    p->line = line;
    cconfig_begin_section(p, section);
}

static void cconfig_on_error(void *user, int line, const char *message)
{
    cconfig_error(user, line, "%s", message);
}

static void cconfig_on_key(void *user, int line, const char *section, const char *name,
                           const char *value)
{
    cconfig_parse *p = user;
    char why[256];
    const cconfig_key *key;
    void *base;

    p->line = line;
    if (section[0] == '\0') {
        cconfig_error(p, p->line, "key \"%s\" is outside any section (put it under [control])",
                      name);
        return;
    }
    if (!p->section_ok)
        return; /* the section itself was already reported */
    if (p->dep) {
        key = cconfig_find("deployment", name);
        base = p->dep;
    } else {
        key = cconfig_find(p->kind, name);
        base = p->cfg;
    }
    if (!key) {
        cconfig_error(p, p->line, "[%s]: unknown key \"%s\"", section, name);
        return;
    }
    const char *err = inifile_set(key, base, value, why, sizeof(why));
    if (err)
        cconfig_error(p, p->line, "[%s] %s: %s", section, name, err);
}

static void cconfig_defaults(cconfig *cfg)
{
    char why[256];
    memset(cfg, 0, sizeof(*cfg));
    for (size_t i = 0; i < cconfig_n_keys; i++) {
        const cconfig_key *k = &cconfig_keys[i];
        if (strcmp(k->section, "deployment") != 0 && k->def)
            inifile_set(k, cfg, k->def, why, sizeof(why));
    }
}

/* A token: printable, no blanks or commas, long enough. Returns NULL or why not. */
static const char *token_problem(const char *token)
{
    if (strlen(token) < CCONFIG_TOKEN_MIN_LEN)
        return "is shorter than 8 characters";
    if (strcasestr(token, "change-me") || strcasestr(token, "changeme") ||
        strcasestr(token, "change_me"))
        return "is a placeholder of the sample (CHANGE-ME): generate one with "
               "openssl rand -hex 24";
    for (const char *c = token; *c; c++)
        if (!isgraph((unsigned char)*c) || *c == ',')
            return "may contain only printable characters other than blanks and ','";
    return NULL;
}

const char *cconfig_weak_token(const cconfig *cfg, char *where, size_t len)
{
    for (int i = 0; i < cfg->n_admin_tokens; i++)
        if (strlen(cfg->admin_token_list[i]) < CCONFIG_TOKEN_GOOD_LEN) {
            snprintf(where, len, "[control] admin_tokens: token %d", i + 1);
            return where;
        }
    for (int i = 0; i < cfg->n_deployments; i++)
        if (strlen(cfg->deployments[i].token) < CCONFIG_TOKEN_GOOD_LEN) {
            snprintf(where, len, "[%s%s] token", CCONFIG_DEPLOYMENT_PREFIX,
                     cfg->deployments[i].name);
            return where;
        }
    return NULL;
}

/* Split admin_tokens into admin_token_list. */
static void cconfig_split_admin_tokens(cconfig_parse *p)
{
    cconfig *cfg = p->cfg;
    char copy[CCONFIG_TOKENS_MAX];
    char *save = NULL;

    snprintf(copy, sizeof(copy), "%s", cfg->admin_tokens);
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        inifile_trim(&tok);
        if (*tok == '\0')
            continue;
        const char *why = token_problem(tok);
        if (why) {
            cconfig_error(p, p->control_line, "[control] admin_tokens: token %d %s",
                          cfg->n_admin_tokens + 1, why);
            continue;
        }
        if (cfg->n_admin_tokens >= CCONFIG_MAX_ADMIN_TOKENS) {
            cconfig_error(p, p->control_line, "[control] admin_tokens: more than %d tokens",
                          CCONFIG_MAX_ADMIN_TOKENS);
            return;
        }
        snprintf(cfg->admin_token_list[cfg->n_admin_tokens++], CCONFIG_TOKEN_MAX, "%s", tok);
    }
}

/* Checks that need the whole file: required keys, token rules, lease timing. */
static void cconfig_validate(cconfig_parse *p)
{
    cconfig *cfg = p->cfg;

    for (size_t i = 0; i < cconfig_n_keys; i++) {
        const cconfig_key *k = &cconfig_keys[i];
        if (k->def || strcmp(k->section, "deployment") == 0)
            continue;
        const char *field = (const char *)cfg + k->offset;
        if (k->type == KEY_STRING && field[0] == '\0')
            cconfig_error(p, 0, "[%s]: missing required key \"%s\"", k->section, k->name);
    }
    if (cfg->admin_tokens[0]) {
        cconfig_split_admin_tokens(p);
        if (cfg->n_admin_tokens == 0)
            cconfig_error(p, p->control_line, "[control] admin_tokens: no token given");
    }
    for (int i = 0; i < cfg->n_deployments; i++) {
        cconfig_deployment *d = &cfg->deployments[i];
        if (d->token[0] == '\0') {
            cconfig_error(p, d->line, "[deployment.%s]: missing required key \"token\"", d->name);
            continue;
        }
        const char *why = token_problem(d->token);
        if (why)
            cconfig_error(p, d->line, "[deployment.%s] token %s", d->name, why);
        for (int j = 0; j < cfg->n_admin_tokens; j++)
            if (strcmp(cfg->admin_token_list[j], d->token) == 0)
                cconfig_error(p, d->line, "[deployment.%s] token is also an admin token", d->name);
        for (int j = 0; j < i; j++)
            if (strcmp(cfg->deployments[j].token, d->token) == 0)
                cconfig_error(p, d->line, "[deployment.%s] token is also the token of [%s%s]",
                              d->name, CCONFIG_DEPLOYMENT_PREFIX, cfg->deployments[j].name);
    }
    if (!cfg->tls_cert_file[0] != !cfg->tls_key_file[0])
        cconfig_error(p, p->control_line, "[control] tls_cert_file and tls_key_file go together");
    else if (cfg->tls_cert_file[0]) {
        char err[CCONFIG_ERROR_LEN - 64];
        SSL_CTX *ctx = tls_server_ctx(cfg->tls_cert_file, cfg->tls_key_file,
                                      cfg->tls_client_ca_file, err, sizeof(err));
        if (!ctx)
            cconfig_error(p, p->control_line, "[control] %s", err);
        SSL_CTX_free(ctx);
    } else if (cfg->tls_client_ca_file[0]) {
        cconfig_error(p, p->control_line, "[control] tls_client_ca_file needs tls_cert_file");
    }
    if (cfg->lease_interval_secs >= cfg->lease_duration_secs)
        cconfig_error(p, p->lease_line,
                      "[lease] lease_interval_secs (%d) must be shorter than "
                      "lease_duration_secs (%d)",
                      cfg->lease_interval_secs, cfg->lease_duration_secs);
}

static int cconfig_run(cconfig *cfg, cconfig_parse *p)
{
    static const inifile_handlers handlers = {cconfig_on_section, cconfig_on_key,
                                              cconfig_on_error};
    inifile_read(p->fp, p->text, &handlers, p);
    cconfig_validate(p);
    return cfg->n_errors;
}

int cconfig_load(cconfig *cfg, const char *path)
{
    cconfig_parse p = {.cfg = cfg, .name = path};
    cconfig_defaults(cfg);
    snprintf(cfg->path, sizeof(cfg->path), "%s", path);
    p.fp = fopen(path, "r");
    if (!p.fp) {
        cconfig_error(&p, 0, "cannot open: %s", strerror(errno));
        return cfg->n_errors;
    }
    int n = cconfig_run(cfg, &p);
    fclose(p.fp);
    return n;
}

int cconfig_load_string(cconfig *cfg, const char *name, const char *text)
{
    cconfig_parse p = {.cfg = cfg, .name = name, .text = text};
    cconfig_defaults(cfg);
    snprintf(cfg->path, sizeof(cfg->path), "%s", name);
    return cconfig_run(cfg, &p);
}

void cconfig_format_value(const cconfig_key *key, const void *base, char *buf, size_t len)
{
    inifile_format(key, base, buf, len);
}
