/* cconfig.h - control.ini: the declarative key table, the parsed settings, and their validation. */
#ifndef PGRELAY_CCONFIG_H
#define PGRELAY_CCONFIG_H

#include "inifile.h"

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CCONFIG_DEFAULT_PATH      "/etc/pgrelay/control.ini"
#define CCONFIG_NAME_MAX          64   /* deployment and lease names, NUL included */
#define CCONFIG_TOKEN_MAX         256  /* one token, NUL included */
#define CCONFIG_TOKENS_MAX        4096 /* the admin_tokens list as written */
#define CCONFIG_MAX_ADMIN_TOKENS  32
#define CCONFIG_MAX_DEPLOYMENTS   256
#define CCONFIG_MAX_ERRORS        64
#define CCONFIG_ERROR_LEN         512
#define CCONFIG_DEPLOYMENT_PREFIX "deployment."
#define CCONFIG_TOKEN_MIN_LEN     8 /* shorter tokens are refused: too easy to guess */
#define CCONFIG_TOKEN_GOOD_LEN    16 /* shorter ones get a warning */

/* One [deployment.NAME] section. */
typedef struct cconfig_deployment {
    char name[CCONFIG_NAME_MAX];   /* NAME of [deployment.NAME] */
    char token[CCONFIG_TOKEN_MAX]; /* its agents' bearer token */
    int line;                      /* line of the section header, for messages */
} cconfig_deployment;

typedef struct cconfig {
    char path[PATH_MAX]; /* file this was read from */

    /* [control] */
    char listen_addr[256];
    int listen_port;
    char tls_cert_file[PATH_MAX];          /* HTTPS certificate chain; "" = plain HTTP */
    char tls_key_file[PATH_MAX];           /* its private key */
    char tls_client_ca_file[PATH_MAX];     /* CA of required client certificates; "" = none */
    char store[2048];                      /* libpq conninfo of the durable store */
    char admin_tokens[CCONFIG_TOKENS_MAX]; /* comma-separated, as written */
    bool auto_register;                    /* unknown agent tokens create a deployment */
    bool auto_declare;                     /* an undeclared proxy is declared at register */
    int64_t proxy_timeout_ms;       /* a proxy is live while its last request is this recent */
    int64_t command_retention_ms;   /* commands older than this are deleted from the store */
    int64_t pause_lease_ms;         /* a maintenance pause ends this long after it was sent */
    int64_t telemetry_retention_ms; /* in-memory samples, queries, schemas older are dropped */
    int64_t poll_wait_max_ms;       /* the longest long poll an agent may ask for */
    int max_connections;            /* open HTTP connections at most; 0 = from the fd limit */
    int64_t idle_timeout_ms;        /* an HTTP connection idle this long is closed */
    int log_level;                  /* log_level from log.h */
    char logfile[PATH_MAX];         /* "" = stderr */

    /* [lease] */
    bool lease_enabled;
    char lease_name[CCONFIG_NAME_MAX];
    int lease_duration_secs;  /* a lease not renewed for this long may be taken over */
    int lease_interval_secs;  /* time between two take-or-renew attempts */
    int release_timeout_secs; /* on shutdown, wait at most this long to give the lease up */

    /* Derived from admin_tokens by validation. */
    int n_admin_tokens;
    char admin_token_list[CCONFIG_MAX_ADMIN_TOKENS][CCONFIG_TOKEN_MAX];

    int n_deployments;
    cconfig_deployment deployments[CCONFIG_MAX_DEPLOYMENTS];

    /* Problems found while loading; each is "file:line: message". */
    int n_errors;
    char errors[CCONFIG_MAX_ERRORS][CCONFIG_ERROR_LEN];
} cconfig;

/* One row of the key table (common/inifile.h): parsing, validation, reload and the man page's
 * list. Sections: "control", "lease", or "deployment" for every [deployment.NAME]. */
typedef inifile_key cconfig_key;

extern const cconfig_key cconfig_keys[];
extern const size_t cconfig_n_keys;

/* Parse a duration ("250ms", "5s", "2m", "1h", "7d"; a bare number is seconds) into
 * milliseconds. Returns 0, or -1 on a malformed value or overflow. */
int cconfig_parse_duration(const char *text, int64_t *ms_out);

/* Load and validate a file into cfg (defaults first). Returns the number of errors;
 * cfg->errors holds them. A missing file is one error. */
int cconfig_load(cconfig *cfg, const char *path);

/* Load from an in-memory string (tests); name is used in messages. */
int cconfig_load_string(cconfig *cfg, const char *name, const char *text);

/* Look a key up by section ("control", "lease", "deployment") and name. */
const cconfig_key *cconfig_find(const char *section, const char *name);

/* Format one key's effective value (for change messages on reload). */
void cconfig_format_value(const cconfig_key *key, const void *base, char *buf, size_t len);

/* The first token shorter than CCONFIG_TOKEN_GOOD_LEN, named in where ("[deployment.prod]
 * token"), or NULL. */
const char *cconfig_weak_token(const cconfig *cfg, char *where, size_t len);

#endif
