/* config.c - reads pgrelay.ini with inih, driven by the key table; every problem names file:line. */
#include "config.h"
#include "inifile.h"
#include "log.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const role_words[] = {"primary", "replica", NULL};
static const char *const fallback_words[] = {"leader", "none", NULL};
static const char *const leader_change_words[] = {"close_idle", "close_all", NULL};
static const char *const control_lost_words[] = {"keep_leader", "decide_alone", "stop_writes",
                                                 NULL};
static const char *const ha_source_words[] = {"none", "patroni", NULL};
static const char *const client_tls_words[] = {"disable", "allow", "require", "verify-ca",
                                               "verify-full", NULL};
static const char *const server_tls_words[] = {"disable", "prefer", "require", "verify-ca",
                                               "verify-full", NULL};
/* A node's own server_tls_mode: "default" (index 0) takes [pgrelay]'s. */
static const char *const node_server_tls_words[] = {"default", "disable", "prefer", "require",
                                                    "verify-ca", "verify-full", NULL};
static const char *const level_words[] = {"error", "warning", "info", "debug", NULL};
static const char *const facility_words[] = {"daemon", "user",   "local0", "local1",
                                             "local2", "local3", "local4", "local5",
                                             "local6", "local7", NULL};


/* The longest duration a key takes: 24 days, within an int of milliseconds. */
#define DURATION_MAX_MS (24 * 24 * 60 * 60 * 1000)

#define PG_KEY(name_, type_, def_, reload_, field_, min_, max_, words_, help_)                     \
    {"pgrelay", name_, type_, def_, reload_, offsetof(config, field_), sizeof(((config *)0)->field_), \
     min_, max_, words_, help_}
#define AGENT_KEY(name_, type_, def_, field_, min_, max_, help_)                                   \
    {"agent", name_, type_, def_, true, offsetof(config, field_), sizeof(((config *)0)->field_),    \
     min_, max_, NULL, help_}
#define CONTROL_KEY(name_, type_, def_, field_, min_, max_, help_)                                 \
    {"control", name_, type_, def_, true, offsetof(config, field_),                               \
     sizeof(((config *)0)->field_), min_, max_, NULL, help_}
/* A [control] key the agent reads once, when it starts: a reload keeps the running value. */
#define CONTROL_START_KEY(name_, type_, def_, field_, help_)                                       \
    {"control", name_, type_, def_, false, offsetof(config, field_),                              \
     sizeof(((config *)0)->field_), 0, 0, NULL, help_}
#define NODE_KEY(name_, type_, def_, field_, min_, max_, words_, help_)                            \
    {"node", name_, type_, def_, true, offsetof(config_node, field_),                             \
     sizeof(((config_node *)0)->field_), min_, max_, words_, help_}

const config_key config_keys[] = {
    PG_KEY("listen_addr", KEY_STRING, "127.0.0.1", false, listen_addr, 0, 0, NULL,
           "address of the write port (IPv4, IPv6, host name, or * for all)"),
    PG_KEY("listen_port", KEY_INT, "6432", false, listen_port, 1, 65535, NULL,
           "TCP port of the write port"),
    PG_KEY("workers", KEY_INT, "0", false, workers, 0, 256, NULL,
           "worker processes; 0 means one per CPU"),
    /* Reloadable down to 1 and up to its value at start: shared memory has a session slot
     * per client sized then (master_reload keeps a higher value out and logs why). */
    PG_KEY("max_client_conn", KEY_INT, "1000", true, max_client_conn, 1, 1000000, NULL,
           "client sessions allowed across all workers; more get SQLSTATE 53300"),
    PG_KEY("client_login_timeout", KEY_DURATION, "60s", true, client_login_timeout_ms, 0,
           DURATION_MAX_MS, NULL, "startup and authentication must finish within this; 0 disables"),
    PG_KEY("client_startup_timeout", KEY_DURATION, "5s", true, client_startup_timeout_ms, 0,
           DURATION_MAX_MS, NULL,
           "the startup packet must arrive within this of the connection, else it is closed; 0 disables"),
    PG_KEY("server_connect_timeout", KEY_DURATION, "5s", true, server_connect_timeout_ms, 1,
           DURATION_MAX_MS, NULL,
           "connecting to a node, up to its answer to the startup packet, must finish within this"),
    PG_KEY("shutdown_timeout", KEY_DURATION, "30s", true, shutdown_timeout_ms, 0, DURATION_MAX_MS, NULL,
           "graceful shutdown (SIGTERM) waits this long for sessions to finish"),
    PG_KEY("tcp_keepalive", KEY_BOOL, "on", true, tcp_keepalive, 0, 0, NULL,
           "enable TCP keepalive on client and server sockets"),
    PG_KEY("log_level", KEY_ENUM, "info", true, log_level, 0, 0, level_words,
           "error, warning, info or debug; -v and -q on the command line override it"),
    PG_KEY("logfile", KEY_STRING, "", true, logfile, 0, 0, NULL,
           "append log lines to this file instead of stderr; SIGUSR1 reopens it"),
    PG_KEY("syslog", KEY_BOOL, "off", true, syslog, 0, 0, NULL, "also send log lines to syslog"),
    PG_KEY("syslog_facility", KEY_ENUM, "daemon", true, syslog_facility, 0, 0, facility_words,
           "syslog facility: daemon, user, local0 ... local7"),
    PG_KEY("syslog_ident", KEY_STRING, "pgrelay", true, syslog_ident, 0, 0, NULL,
           "program name syslog lines carry"),
    PG_KEY("admin_socket", KEY_STRING, CONFIG_DEFAULT_ADMIN_SOCKET, false, admin_socket, 0, 0,
           NULL, "Unix socket of the admin console; empty disables it"),
    PG_KEY("admin_socket_mode", KEY_MODE, "0600", false, admin_socket_mode, 0, 0777, NULL,
           "permission bits of the admin socket file (octal)"),
    PG_KEY("admin_socket_group", KEY_STRING, "", false, admin_socket_group, 0, 0, NULL,
           "group that owns the admin socket file; empty keeps the daemon's group"),
    PG_KEY("admin_users", KEY_STRING, "", true, admin_users, 0, 0, NULL,
           "comma-separated system users with admin level on the admin socket"),
    PG_KEY("operator_users", KEY_STRING, "", true, operator_users, 0, 0, NULL,
           "comma-separated system users with operator level (pause, resume, kill)"),
    PG_KEY("stats_users", KEY_STRING, "", true, stats_users, 0, 0, NULL,
           "comma-separated system users with user level (show commands, no statement text)"),
    PG_KEY("http_listen_port", KEY_INT, "0", false, http_listen_port, 0, 65535, NULL,
           "TCP port of the HTTP endpoint (health checks, /metrics); 0 disables it"),
    PG_KEY("http_listen_addr", KEY_STRING, "127.0.0.1", false, http_listen_addr, 0, 0, NULL,
           "address of the HTTP endpoint (IPv4, IPv6, host name, or * for all)"),
    PG_KEY("http_token", KEY_STRING, "", true, http_token, 0, 0, NULL,
           "bearer token GET /metrics must carry; empty = none (health checks never need one)"),
    PG_KEY("read_listen_port", KEY_INT, "0", false, read_listen_port, 0, 65535, NULL,
           "TCP port of the read-only port (on listen_addr); 0 disables it"),
    PG_KEY("read_fallback", KEY_ENUM, "leader", true, read_fallback, 0, 0, fallback_words,
           "leader or none: where read sessions go when no replica qualifies"),
    PG_KEY("max_replica_lag_bytes", KEY_INT, "16777216", true, max_replica_lag_bytes, 0, INT_MAX,
           NULL, "replicas whose replay is further behind get no new read sessions"),
    PG_KEY("max_replica_lag_seconds", KEY_DURATION, "30s", true, max_replica_lag_ms, 0, DURATION_MAX_MS,
           NULL, "replicas whose replay is older than this get no new read sessions"),
    PG_KEY("no_leader_wait", KEY_DURATION, "5s", true, no_leader_wait_ms, 0, DURATION_MAX_MS, NULL,
           "with no write leader, hold new write sessions this long before 57P03"),
    PG_KEY("leader_change_grace", KEY_DURATION, "10s", true, leader_change_grace_ms, 0, DURATION_MAX_MS,
           NULL, "a session in a transaction on the old leader is closed after this"),
    PG_KEY("on_leader_change", KEY_ENUM, "close_idle", true, on_leader_change, 0, 0,
           leader_change_words, "close_idle (at the next safe point) or close_all (at once)"),
    PG_KEY("agent", KEY_BOOL, "on", false, agent, 0, 0, NULL,
           "run pgrelay-agent to follow the write leader; off = static roles"),
    PG_KEY("agent_path", KEY_STRING, "", false, agent_path, 0, 0, NULL,
           "pgrelay-agent program; empty = the one beside the pgrelay binary"),
    PG_KEY("client_tls_mode", KEY_ENUM, "disable", true, client_tls_mode, 0, 0, client_tls_words,
           "disable, allow, require, verify-ca or verify-full: TLS toward clients (both ports)"),
    PG_KEY("client_tls_cert_file", KEY_STRING, "", true, client_tls_cert_file, 0, 0, NULL,
           "certificate chain (PEM) pgrelay shows to TLS clients; read again at every reload"),
    PG_KEY("client_tls_key_file", KEY_STRING, "", true, client_tls_key_file, 0, 0, NULL,
           "private key (PEM) of client_tls_cert_file"),
    PG_KEY("client_tls_ca_file", KEY_STRING, "", true, client_tls_ca_file, 0, 0, NULL,
           "CA certificates (PEM) client certificates must chain to (verify-ca, verify-full)"),
    PG_KEY("client_tls_protocols", KEY_STRING, "secure", true, client_tls_protocols, 0, 0, NULL,
           "TLS versions offered to clients: secure (tlsv1.2,tlsv1.3), all, or a list"),
    PG_KEY("client_tls_ciphers", KEY_STRING, "default", true, client_tls_ciphers, 0, 0, NULL,
           "OpenSSL cipher list for TLS 1.2 clients; default = OpenSSL's"),
    PG_KEY("server_tls_mode", KEY_ENUM, "disable", true, server_tls_mode, 0, 0, server_tls_words,
           "disable, prefer, require, verify-ca or verify-full: TLS toward the nodes (sessions and "
           "the agent's probes); [node.NAME] may override it"),
    PG_KEY("server_tls_ca_file", KEY_STRING, "", true, server_tls_ca_file, 0, 0, NULL,
           "CA certificates (PEM) node certificates must chain to (verify-ca, verify-full)"),
    PG_KEY("server_tls_cert_file", KEY_STRING, "", true, server_tls_cert_file, 0, 0, NULL,
           "client certificate (PEM) shown to nodes that ask for one; empty = none"),
    PG_KEY("server_tls_key_file", KEY_STRING, "", true, server_tls_key_file, 0, 0, NULL,
           "private key (PEM) of server_tls_cert_file"),
    AGENT_KEY("monitor_user", KEY_STRING, "postgres", monitor_user, 0, 0,
              "user of the agent's health-check connections"),
    AGENT_KEY("monitor_password", KEY_STRING, "", monitor_password, 0, 0,
              "its password (or use ~/.pgpass)"),
    AGENT_KEY("monitor_dbname", KEY_STRING, "postgres", monitor_dbname, 0, 0,
              "database of the health-check connections"),
    AGENT_KEY("health_interval", KEY_DURATION, "1s", health_interval_ms, 10, DURATION_MAX_MS,
              "time between two probes of a node"),
    AGENT_KEY("health_timeout", KEY_DURATION, "2s", health_timeout_ms, 10, DURATION_MAX_MS,
              "a probe (connect included) that takes longer has failed"),
    AGENT_KEY("fall", KEY_INT, "3", fall, 1, 1000,
              "failed probes in a row before a node is down"),
    AGENT_KEY("rise", KEY_INT, "2", rise, 1, 1000,
              "good probes in a row before a down node is up"),
    {"agent", "control_lost", KEY_ENUM, "keep_leader", true, offsetof(config, control_lost),
     sizeof(((config *)0)->control_lost), 0, 0, control_lost_words,
     "control plane silent past control_grace_period: keep_leader, decide_alone or stop_writes"},
    AGENT_KEY("state_file", KEY_STRING, "", state_file, 0, 0,
              "where the agent keeps its epoch and leader across restarts; empty = "
              "agent.state beside admin_socket"),
    {"agent", "ha_source", KEY_ENUM, "none", false, offsetof(config, ha_source),
     sizeof(((config *)0)->ha_source), 0, 0, ha_source_words,
     "none, or patroni: the leader Patroni names (ha_patroni_urls) gates writes too"},
    {"agent", "ha_patroni_urls", KEY_STRING, "", false, offsetof(config, ha_patroni_urls),
     sizeof(((config *)0)->ha_patroni_urls), 0, 0, NULL,
     "comma-separated Patroni REST API base URLs of the members (ha_source = patroni)"},
    AGENT_KEY("plan_slow_threshold", KEY_DURATION, "1s", plan_slow_threshold_ms, 0,
              DURATION_MAX_MS,
              "statements whose round trip takes at least this get an EXPLAIN plan; 0 = off"),
    AGENT_KEY("plan_sample_rate", KEY_STRING, "0", plan_sample_rate_text, 0, 0,
              "share of all statements (0 to 1) planned at random, reason sampled; 0 = none"),
    AGENT_KEY("plan_max_age", KEY_DURATION, "60s", plan_max_age_ms, 0, DURATION_MAX_MS,
              "the same statement (normalised text, database, user) is planned again after this"),
    AGENT_KEY("plan_rate_limit", KEY_INT, "10", plan_rate_limit, 1, 10000,
              "EXPLAINs per second at most; requests past it are dropped and counted"),
    AGENT_KEY("plan_timeout", KEY_DURATION, "2s", plan_timeout_ms, 10, DURATION_MAX_MS,
              "statement_timeout of each EXPLAIN (and connect timeout of the planner)"),
    CONTROL_START_KEY("endpoint", KEY_STRING, "", control_endpoint,
                      "base URL(s) of pgrelay-control, comma-separated; empty = no control plane"),
    CONTROL_START_KEY("token", KEY_STRING, "", control_token,
                      "the deployment's token (Authorization: Bearer)"),
    CONTROL_KEY("ca_file", KEY_STRING, "", control_ca_file, 0, 0,
                "CA certificates (PEM) that an https:// endpoint must chain to; empty = system's"),
    CONTROL_KEY("cert_file", KEY_STRING, "", control_cert_file, 0, 0,
                "client certificate (PEM) shown to the control plane when it asks for one"),
    CONTROL_KEY("key_file", KEY_STRING, "", control_key_file, 0, 0,
                "private key (PEM) of cert_file"),
    CONTROL_START_KEY("node_id", KEY_STRING, "", control_node_id,
                      "this proxy's node id in the control plane (default: the host name; the "
                      "NODE_ID environment variable overrides it)"),
    CONTROL_KEY("request_timeout", KEY_DURATION, "5s", control_request_timeout_ms, 100, DURATION_MAX_MS,
                "an HTTP request to the control plane that takes longer has failed"),
    CONTROL_KEY("metrics_interval", KEY_DURATION, "1s", metrics_interval_ms, 100, DURATION_MAX_MS,
                "time between two metrics uploads"),
    CONTROL_KEY("active_queries_interval", KEY_DURATION, "5s", active_queries_interval_ms, 100,
                DURATION_MAX_MS, "time between two uploads of the running queries"),
    CONTROL_KEY("schema_interval", KEY_DURATION, "60s", schema_interval_ms, 1000, DURATION_MAX_MS,
                "how often the leader's schema summary is read (sent when it changed)"),
    CONTROL_KEY("control_grace_period", KEY_DURATION, "10s", control_grace_period_ms, 0, DURATION_MAX_MS,
                "control plane unreachable this long: the agent decides the leader alone"),
    NODE_KEY("host", KEY_STRING, NULL, host, 0, 0, NULL,
             "host name or IP address of the node, or a Unix socket directory"),
    NODE_KEY("port", KEY_INT, "5432", port, 1, 65535, NULL, "PostgreSQL port of the node"),
    NODE_KEY("role", KEY_ENUM, NULL, role, 0, 0, role_words,
             "primary or replica: the static hint of which node takes writes"),
    NODE_KEY("monitor_user", KEY_STRING, "", monitor_user, 0, 0, NULL,
             "overrides [agent] monitor_user for this node"),
    NODE_KEY("monitor_password", KEY_STRING, "", monitor_password, 0, 0, NULL,
             "overrides [agent] monitor_password for this node"),
    NODE_KEY("monitor_dbname", KEY_STRING, "", monitor_dbname, 0, 0, NULL,
             "overrides [agent] monitor_dbname for this node"),
    NODE_KEY("server_tls_mode", KEY_ENUM, "default", server_tls_mode, 0, 0, node_server_tls_words,
             "overrides [pgrelay] server_tls_mode for this node; default = [pgrelay]'s"),
};
const size_t config_n_keys = sizeof(config_keys) / sizeof(config_keys[0]);

/* Parsing state shared between the line reader and the inih handler. */
typedef struct config_parse {
    config *cfg;
    const char *name;     /* file name for messages */
    FILE *fp;             /* file source, or NULL */
    const char *text;     /* string source, or NULL */
    int line;             /* number of the line inih is looking at */
    bool section_ok;      /* the current section is a known one */
    const char *kind;     /* key-table section of the current section: "pgrelay", "agent" */
    config_node *node;    /* the current [node.NAME], or NULL */
} config_parse;

static void config_error(config_parse *p, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void config_error(config_parse *p, int line, const char *fmt, ...)
{
    config *cfg = p->cfg;
    va_list ap;
    int off;

    if (cfg->n_errors >= CONFIG_MAX_ERRORS)
        return;
    char *buf = cfg->errors[cfg->n_errors++];
    if (line > 0)
        off = snprintf(buf, CONFIG_ERROR_LEN, "%s:%d: ", p->name, line);
    else
        off = snprintf(buf, CONFIG_ERROR_LEN, "%s: ", p->name);
    if (off < 0 || off >= CONFIG_ERROR_LEN - 1)
        return; /* the file name alone fills the message */
    va_start(ap, fmt);
    vsnprintf(buf + off, CONFIG_ERROR_LEN - (size_t)off, fmt, ap);
    va_end(ap);
}

int config_parse_duration(const char *text, long *ms_out)
{
    int64_t ms;
    if (inifile_duration(text, INT_MAX, &ms) != 0)
        return -1;
    *ms_out = (long)ms;
    return 0;
}

int config_parse_bool(const char *text)
{
    return inifile_bool(text);
}


const config_key *config_find(const char *section, const char *name)
{
    for (size_t i = 0; i < config_n_keys; i++)
        if (strcmp(config_keys[i].section, section) == 0 && strcmp(config_keys[i].name, name) == 0)
            return &config_keys[i];
    return NULL;
}

static bool node_name_valid(const char *name)
{
    if (*name == '\0' || strlen(name) >= CONFIG_NAME_MAX)
        return false;
    for (const char *c = name; *c; c++)
        if (!isalnum((unsigned char)*c) && *c != '_' && *c != '-')
            return false;
    return true;
}

/* A new [section] header: check the name; for [node.NAME] start a node. */
static void config_begin_section(config_parse *p, const char *section)
{
    config *cfg = p->cfg;
    p->node = NULL;
    p->section_ok = false;
    if (strcmp(section, "pgrelay") == 0 || strcmp(section, "agent") == 0 ||
        strcmp(section, "control") == 0) {
        p->kind = strcmp(section, "pgrelay") == 0 ? "pgrelay"
                  : strcmp(section, "agent") == 0 ? "agent"
                                                  : "control";
        p->section_ok = true;
        return;
    }
    if (strncmp(section, CONFIG_NODE_PREFIX, strlen(CONFIG_NODE_PREFIX)) == 0) {
        const char *name = section + strlen(CONFIG_NODE_PREFIX);
        if (!node_name_valid(name)) {
            config_error(p, p->line,
                         "[%s]: node name must be 1 to %d letters, digits, '_' or '-'", section,
                         CONFIG_NAME_MAX - 1);
            return;
        }
        for (int i = 0; i < cfg->n_nodes; i++) {
            if (strcmp(cfg->nodes[i].name, name) == 0) {
                config_error(p, p->line, "[%s]: node defined twice (first at line %d)", section,
                             cfg->nodes[i].line);
                return;
            }
        }
        if (cfg->n_nodes >= CONFIG_MAX_NODES) {
            config_error(p, p->line, "[%s]: too many nodes (at most %d)", section,
                         CONFIG_MAX_NODES);
            return;
        }
        config_node *n = &cfg->nodes[cfg->n_nodes++];
        memset(n, 0, sizeof(*n));
        snprintf(n->name, sizeof(n->name), "%s", name);
        n->port = 5432;
        n->role = -1;
        /* other node keys default to "" (memset above) */
        n->line = p->line;
        p->node = n;
        p->section_ok = true;
        return;
    }
    config_error(p, p->line,
                 "unknown section [%s] (known: [pgrelay], [agent], [control], [node.NAME])",
                 section);
}

static void config_on_section(void *user, int line, const char *section)
{
    config_parse *p = user;
    p->line = line;
    config_begin_section(p, section);
}

static void config_on_error(void *user, int line, const char *message)
{
    config_error(user, line, "%s", message);
}

/* plan_sample_rate's text into its number. 0, or -1 when it is not a number from 0 to 1. */
static int config_sample_rate(config *cfg)
{
    char *end = NULL;
    errno = 0;
    double r = strtod(cfg->plan_sample_rate_text, &end);
    if (errno || end == cfg->plan_sample_rate_text || *end != '\0' || !(r >= 0.0 && r <= 1.0))
        return -1;
    cfg->plan_sample_rate = r;
    return 0;
}

static void config_on_key(void *user, int line, const char *section, const char *name,
                          const char *value)
{
    config_parse *p = user;
    char why[256];
    const config_key *key;
    void *base;

    p->line = line;
    if (section[0] == '\0') {
        config_error(p, p->line, "key \"%s\" is outside any section (put it under [pgrelay])",
                     name);
        return;
    }
    if (!p->section_ok)
        return; /* the section itself was already reported */
    if (p->node) {
        key = config_find("node", name);
        base = p->node;
    } else {
        key = config_find(p->kind, name);
        base = p->cfg;
    }
    if (!key) {
        config_error(p, p->line, "[%s]: unknown key \"%s\"", section, name);
        return;
    }
    const char *err = inifile_set(key, base, value, why, sizeof(why));
    if (err)
        config_error(p, p->line, "[%s] %s: %s", section, name, err);
    else if (base == p->cfg && strcmp(key->name, "plan_sample_rate") == 0 &&
             config_sample_rate(p->cfg) != 0)
        config_error(p, p->line, "[%s] %s: \"%s\" is not a number from 0 to 1", section, name,
                     value);
}

static void config_defaults(config *cfg)
{
    char why[256];
    memset(cfg, 0, sizeof(*cfg));
    for (size_t i = 0; i < config_n_keys; i++) {
        const config_key *k = &config_keys[i];
        if (strcmp(k->section, "node") != 0 && k->def)
            inifile_set(k, cfg, k->def, why, sizeof(why));
    }
    config_sample_rate(cfg);
}

/* Checks that need the whole file: required node keys, at least one node. */
static void config_validate(config_parse *p)
{
    config *cfg = p->cfg;
    if (cfg->n_nodes == 0)
        config_error(p, 0, "no database node: add a [node.NAME] section with host, port and role");
    for (int i = 0; i < cfg->n_nodes; i++) {
        config_node *n = &cfg->nodes[i];
        if (n->host[0] == '\0')
            config_error(p, n->line, "[node.%s]: missing required key \"host\"", n->name);
        if (n->role < 0)
            config_error(p, n->line,
                         "[node.%s]: missing required key \"role\" (primary or replica)", n->name);
    }
    if (cfg->ha_source == HA_SOURCE_PATRONI && !cfg->ha_patroni_urls[0])
        config_error(p, 0, "[agent] ha_source = patroni needs ha_patroni_urls (the members' "
                     "Patroni REST API, e.g. http://10.0.0.11:8008)");
    if (cfg->client_tls_mode != CLIENT_TLS_DISABLE &&
        (!cfg->client_tls_cert_file[0] || !cfg->client_tls_key_file[0]))
        config_error(p, 0, "[pgrelay] client_tls_mode = %s needs client_tls_cert_file and "
                     "client_tls_key_file", client_tls_words[cfg->client_tls_mode]);
    if (cfg->client_tls_mode >= CLIENT_TLS_VERIFY_CA && !cfg->client_tls_ca_file[0])
        config_error(p, 0, "[pgrelay] client_tls_mode = %s needs client_tls_ca_file (the CA "
                     "client certificates must chain to)", client_tls_words[cfg->client_tls_mode]);
    bool server_verify = cfg->server_tls_mode >= SERVER_TLS_VERIFY_CA;
    for (int i = 0; i < cfg->n_nodes; i++)
        if (config_node_server_tls(cfg, &cfg->nodes[i]) >= SERVER_TLS_VERIFY_CA)
            server_verify = true;
    if (server_verify && !cfg->server_tls_ca_file[0])
        config_error(p, 0, "[pgrelay] server_tls_mode verify-ca or verify-full needs "
                     "server_tls_ca_file (the CA node certificates must chain to)");
    if (!cfg->server_tls_cert_file[0] != !cfg->server_tls_key_file[0])
        config_error(p, 0, "[pgrelay] server_tls_cert_file and server_tls_key_file go together");
    if (cfg->workers == 0) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        cfg->workers = ncpu > 0 ? (int)ncpu : 1;
    }
}

static int config_run(config *cfg, config_parse *p)
{
    static const inifile_handlers handlers = {config_on_section, config_on_key, config_on_error};
    inifile_read(p->fp, p->text, &handlers, p);
    config_validate(p);
    return cfg->n_errors;
}

int config_load(config *cfg, const char *path)
{
    config_parse p = {.cfg = cfg, .name = path, .section_ok = false};
    config_defaults(cfg);
    snprintf(cfg->path, sizeof(cfg->path), "%s", path);
    p.fp = fopen(path, "r");
    if (!p.fp) {
        config_error(&p, 0, "cannot open: %s", strerror(errno));
        return cfg->n_errors;
    }
    int n = config_run(cfg, &p);
    fclose(p.fp);
    return n;
}

int config_load_string(config *cfg, const char *name, const char *text)
{
    config_parse p = {.cfg = cfg, .name = name, .text = text};
    config_defaults(cfg);
    snprintf(cfg->path, sizeof(cfg->path), "%s", name);
    return config_run(cfg, &p);
}

int config_node_server_tls(const config *cfg, const config_node *node)
{
    return node->server_tls_mode > 0 ? node->server_tls_mode - 1 : cfg->server_tls_mode;
}

const char *config_server_tls_word(int mode)
{
    return mode >= 0 && mode < (int)(sizeof(server_tls_words) / sizeof(server_tls_words[0])) - 1
               ? server_tls_words[mode]
               : "disable";
}

int config_first_primary(const config *cfg)
{
    for (int i = 0; i < cfg->n_nodes; i++)
        if (cfg->nodes[i].role == NODE_ROLE_PRIMARY)
            return i;
    return -1;
}

bool config_key_is_secret(const config_key *key)
{
    return strstr(key->name, "token") != NULL || strstr(key->name, "password") != NULL;
}

/* The first secret key (token, password) that cfg sets to a non-empty value, or NULL. */
static const config_key *config_first_secret_set(const config *cfg)
{
    for (size_t i = 0; i < config_n_keys; i++) {
        const config_key *k = &config_keys[i];
        if (k->type != KEY_STRING || !config_key_is_secret(k))
            continue;
        if (strcmp(k->section, "node") != 0) {
            if (((const char *)cfg + k->offset)[0] != '\0')
                return k;
            continue;
        }
        for (int n = 0; n < cfg->n_nodes; n++)
            if (((const char *)&cfg->nodes[n] + k->offset)[0] != '\0')
                return k;
    }
    return NULL;
}

bool config_secrets_exposed(const config *cfg, const char *path, char *msg, size_t len)
{
    struct stat st;
    const config_key *k = config_first_secret_set(cfg);
    if (!k || stat(path, &st) != 0 || (st.st_mode & S_IROTH) == 0)
        return false;
    snprintf(msg, len, "mode %04o lets every user read %s; chmod 0640 %s (owner root, group "
             "of the daemon's user)", (unsigned)(st.st_mode & 07777), k->name, path);
    return true;
}

void config_format_value(const config *cfg, const config_key *key, const void *base, char *buf,
                         size_t len)
{
    (void)cfg;
    inifile_format(key, base, buf, len);
}

void config_apply_logging(const config *cfg)
{
    log_current_level = (log_level)cfg->log_level;
    if (log_open_file(cfg->logfile) != 0)
        log_error("cannot open logfile %s: %s", cfg->logfile, strerror(errno));
    log_close_syslog();
    if (cfg->syslog)
        log_open_syslog(cfg->syslog_ident,
                        config_find("pgrelay", "syslog_facility")->words[cfg->syslog_facility]);
}
