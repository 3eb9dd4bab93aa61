/* config.h - pgrelay.ini: the declarative key table, the parsed settings, and their validation. */
#ifndef PGRELAY_CONFIG_H
#define PGRELAY_CONFIG_H

#include "inifile.h"

#include <stdbool.h>
#include <stddef.h>

#define CONFIG_DEFAULT_PATH  "/etc/pgrelay/pgrelay.ini"
#define CONFIG_MAX_NODES     64
#define CONFIG_NAME_MAX      64
#define CONFIG_HOST_MAX      256
#define CONFIG_MAX_ERRORS    64
#define CONFIG_ERROR_LEN     512
#define CONFIG_NODE_PREFIX   "node."

typedef enum node_role {
    NODE_ROLE_PRIMARY = 0, /* configured as the write leader */
    NODE_ROLE_REPLICA,     /* configured as a read-only replica */
} node_role;

typedef enum read_fallback {
    READ_FALLBACK_LEADER = 0, /* no replica qualifies: read sessions go to the write leader */
    READ_FALLBACK_NONE,       /* no replica qualifies: read sessions are refused */
} read_fallback;

typedef enum on_leader_change {
    ON_LEADER_CHANGE_CLOSE_IDLE = 0, /* close old-leader sessions at their next safe point */
    ON_LEADER_CHANGE_CLOSE_ALL,      /* close every old-leader session at once */
} on_leader_change;

typedef enum control_lost {
    CONTROL_LOST_KEEP_LEADER = 0, /* keep the leader the control plane last named while it
                                   * answers as a primary; never choose another */
    CONTROL_LOST_DECIDE_ALONE,    /* each agent decides the leader from its own probes */
    CONTROL_LOST_STOP_WRITES,     /* route no write session until the control plane is back */
} control_lost;

typedef enum ha_source {
    HA_SOURCE_NONE = 0, /* the agent's probes alone say who the leader is */
    HA_SOURCE_PATRONI,  /* Patroni's REST API (ha_patroni_urls) also says whom it names leader */
} ha_source;
typedef enum client_tls_mode {
    CLIENT_TLS_DISABLE = 0, /* SSLRequest answered N; a direct-TLS ClientHello is refused */
    CLIENT_TLS_ALLOW,       /* TLS for the clients that ask, clear for the others */
    CLIENT_TLS_REQUIRE,     /* a client in clear gets FATAL 28000 */
    CLIENT_TLS_VERIFY_CA,   /* TLS with a client certificate that chains to client_tls_ca_file */
    CLIENT_TLS_VERIFY_FULL, /* the same, and its common name is the user name it logs in as */
} client_tls_mode;

typedef enum server_tls_mode {
    SERVER_TLS_DISABLE = 0, /* the node is spoken to in clear */
    SERVER_TLS_PREFER,      /* SSLRequest first; in clear when the node answers N */
    SERVER_TLS_REQUIRE,     /* TLS or no session (08006); the certificate is not checked */
    SERVER_TLS_VERIFY_CA,   /* TLS with a certificate that chains to server_tls_ca_file */
    SERVER_TLS_VERIFY_FULL, /* the same, and the certificate names the node's host */
} server_tls_mode;

typedef struct config_node {
    char name[CONFIG_NAME_MAX];  /* NAME of [node.NAME] */
    char host[CONFIG_HOST_MAX];  /* host name, IP address, or a Unix socket directory ("/...") */
    int port;                    /* TCP port, or the suffix of .s.PGSQL.PORT for a socket dir */
    int role;                    /* node_role; -1 until set */
    int line;                    /* line of the [node.NAME] header, for messages */
    char monitor_user[64];       /* per-node override of [agent] monitor_user; "" = none */
    char monitor_password[128];
    char monitor_dbname[64];
    int server_tls_mode;         /* 0 = [pgrelay] server_tls_mode, else server_tls_mode + 1 */
} config_node;

typedef struct config {
    char path[1024];                  /* file this was read from */
    char listen_addr[CONFIG_HOST_MAX];
    int listen_port;
    int workers;                      /* worker processes; 0 in the file means one per CPU */
    int max_client_conn;              /* client sessions across all workers */
    int client_login_timeout_ms;      /* startup + authentication must finish within this */
    int client_startup_timeout_ms;    /* the StartupMessage must arrive within this; 0 = none */
    int server_connect_timeout_ms;    /* TCP connect to a node must finish within this */
    int shutdown_timeout_ms;          /* graceful shutdown waits this long for sessions */
    bool tcp_keepalive;               /* SO_KEEPALIVE on client and server sockets */
    int log_level;                    /* log_level from log.h */
    char logfile[1024];               /* "" = stderr */
    bool syslog;                      /* also log to syslog */
    int syslog_facility;              /* index into the facility words */
    char syslog_ident[64];
    char admin_socket[108];           /* Unix socket path of the admin console; "" = none */
    int admin_socket_mode;            /* permission bits of the socket file */
    char admin_socket_group[64];      /* group owning the socket file; "" = the daemon's */
    char admin_users[512];            /* comma-separated user names with admin level */
    char operator_users[512];         /* ... with operator level */
    char stats_users[512];            /* ... with user (read-only) level */

    int http_listen_port;             /* HTTP endpoint (health, metrics); 0 = none */
    char http_listen_addr[CONFIG_HOST_MAX];
    char http_token[256];             /* bearer token for /metrics; "" = none */

    /* Routing (workers) */
    int read_listen_port;             /* read-only port; 0 = none */
    int read_fallback;                /* read_fallback: READ_FALLBACK_* */
    int max_replica_lag_bytes;        /* replicas further behind get no read sessions */
    int max_replica_lag_ms;           /* likewise in time (key max_replica_lag_seconds) */
    int no_leader_wait_ms;            /* hold new write sessions this long for a leader */
    int leader_change_grace_ms;       /* sessions in a transaction on the old leader */
    int on_leader_change;             /* ON_LEADER_CHANGE_* */
    bool agent;                       /* start pgrelay-agent */
    /* TLS toward clients (proxy/tls.c); both ports */
    int client_tls_mode;              /* client_tls_mode: CLIENT_TLS_* */
    char client_tls_cert_file[1024];  /* server certificate chain (PEM) shown to clients */
    char client_tls_key_file[1024];   /* its private key (PEM) */
    char client_tls_ca_file[1024];    /* CAs client certificates must chain to (verify-*) */
    char client_tls_protocols[128];   /* "secure", "all", or tlsv1.0 ... tlsv1.3 listed */
    char client_tls_ciphers[512];     /* OpenSSL cipher list for TLS 1.2; "default" = OpenSSL's */
    /* TLS toward the nodes (proxy sessions and the agent's probes) */
    int server_tls_mode;              /* server_tls_mode: SERVER_TLS_*; [node.NAME] overrides */
    char server_tls_ca_file[1024];    /* CAs node certificates must chain to (verify-*) */
    char server_tls_cert_file[1024];  /* client certificate shown to nodes; "" = none */
    char server_tls_key_file[1024];   /* its private key */
    char agent_path[1024];            /* "" = pgrelay-agent beside the pgrelay binary */

    /* [agent]: health checks */
    char monitor_user[64];
    char monitor_password[128];
    char monitor_dbname[64];
    int health_interval_ms;
    int health_timeout_ms;
    int fall;                         /* failed probes before a node is down */
    int rise;                         /* good probes in a row before a down node is up */
    int control_lost;                 /* control_lost: CONTROL_LOST_*, after control_grace_period */
    char state_file[1024];            /* epoch and leader kept across restarts; "" = beside
                                       * admin_socket (none when that is empty too) */
    int ha_source;                    /* ha_source: HA_SOURCE_* (restart only) */
    char ha_patroni_urls[1024];       /* comma-separated Patroni REST base URLs (restart only) */
    /* [agent]: query plans (workers select, the agent's planner explains) */
    int plan_slow_threshold_ms;       /* statements at least this slow are planned; 0 = off */
    char plan_sample_rate_text[32];   /* plan_sample_rate as written (checked when read) */
    double plan_sample_rate;          /* its value, 0..1: share of statements planned at random */
    int plan_max_age_ms;              /* a statement is planned again only after this */
    int plan_rate_limit;              /* EXPLAINs per second at most */
    int plan_timeout_ms;              /* statement_timeout of each EXPLAIN */

    /* [control]: the control plane (empty endpoint = none) */
    char control_endpoint[1024];      /* comma-separated base URLs */
    char control_token[256];          /* the deployment's bearer token */
    char control_ca_file[1024];       /* CA for https:// endpoints; "" = the system's */
    char control_cert_file[1024];     /* client certificate for the control plane; "" = none */
    char control_key_file[1024];      /* its key; "" = in cert_file */
    char control_node_id[64];         /* this proxy's node id ("" = the host name); NODE_ID wins */
    int control_request_timeout_ms;
    int metrics_interval_ms;
    int active_queries_interval_ms;
    int schema_interval_ms;
    int control_grace_period_ms;      /* unreachable this long: decide alone again */
    int n_nodes;
    config_node nodes[CONFIG_MAX_NODES];

    /* Problems found while loading; each is "file:line: message". */
    int n_errors;
    char errors[CONFIG_MAX_ERRORS][CONFIG_ERROR_LEN];
} config;

/* One row of the key table (common/inifile.h): everything parsing, validation, `show config`
 * and the man page need. Sections: "pgrelay", "agent", "control", or "node" for [node.NAME]. */
typedef inifile_key config_key;

extern const config_key config_keys[];
extern const size_t config_n_keys;

/* Parse a duration ("250ms", "5s", "2m", "1h", bare number = seconds) into milliseconds.
 * Returns 0 on success, -1 on a malformed value or overflow. */
int config_parse_duration(const char *text, long *ms_out);

/* Parse a boolean word. Returns 0/1, or -1 when the word is not a boolean. */
int config_parse_bool(const char *text);

/* Load and validate a file into cfg (defaults first). Returns the number of errors;
 * cfg->errors holds them. A missing file is one error. */
int config_load(config *cfg, const char *path);

/* Load from an in-memory string (tests); name is used in messages. */
int config_load_string(config *cfg, const char *name, const char *text);

/* Look a key up by section ("pgrelay" or "node") and name. */
const config_key *config_find(const char *section, const char *name);

/* The default socket path; the directory is created at start if missing. */
#define CONFIG_DEFAULT_ADMIN_SOCKET "/run/pgrelay/admin.sock"

/* The server_tls_mode (SERVER_TLS_*) that applies to a node: its own, else [pgrelay]'s. */
int config_node_server_tls(const config *cfg, const config_node *node);

/* The libpq sslmode word of a SERVER_TLS_* mode. */
const char *config_server_tls_word(int mode);

/* Index of the first node with role primary, or -1. */
int config_first_primary(const config *cfg);

/* Make this process log as cfg says: level, log file, syslog. A log file that cannot be opened
 * is reported and the previous destination kept. */
void config_apply_logging(const config *cfg);

/* Is the key's value a secret (a token, a password)? It never leaves the host and show config
 * masks it. */
bool config_key_is_secret(const config_key *key);

/* True when the file at path is readable by every user while cfg sets a secret (a token or a
 * password); msg then says which mode and key, and what to do. */
bool config_secrets_exposed(const config *cfg, const char *path, char *msg, size_t len);

/* Format one key's effective value into buf (for `show config`). */
void config_format_value(const config *cfg, const config_key *key, const void *base, char *buf,
                         size_t len);

#endif
