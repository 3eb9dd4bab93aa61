/* log.h - leveled logging shared by every pgrelay binary; each line names its process. */
#ifndef PGRELAY_LOG_H
#define PGRELAY_LOG_H

#include <stdarg.h>

typedef enum log_level {
    LOG_LVL_ERROR = 0, /* something failed; the process may go on without it */
    LOG_LVL_WARNING,   /* unusual but handled: a client broke the protocol, a node refused */
    LOG_LVL_INFO,      /* lifecycle: start, stop, worker respawn, config load */
    LOG_LVL_DEBUG,     /* per-session detail, off by default */
} log_level;

/* The level in force; messages above it are dropped before formatting. */
extern log_level log_current_level;

/* Set the tag every line carries, e.g. "master" or "worker 2". */
void log_set_process(const char *tag);

/* Send lines to a file (appending; NULL or "" = stderr). Returns 0, or -1 with errno set and
 * the previous destination kept. */
int log_open_file(const char *path);

/* Reopen the log file under its name (after logrotate moved it); no-op for stderr. */
int log_reopen(void);

/* Send lines to syslog as well as (instead of stderr when no file is set) the file.
 * facility is a name such as "daemon" or "local0"; returns -1 for an unknown name. */
int log_open_syslog(const char *ident, const char *facility);
void log_close_syslog(void);

/* The file descriptor lines go to (stderr or the log file), for daemonizing. */
int log_fd(void);

/* Parse "error|warning|info|debug"; returns -1 on an unknown name. */
int log_level_parse(const char *name);
const char *log_level_name(log_level level);

void log_msg(log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LOG_LVL_ERROR, __VA_ARGS__)
#define log_warning(...)                                                                           \
    do {                                                                                           \
        if (log_current_level >= LOG_LVL_WARNING)                                                  \
            log_msg(LOG_LVL_WARNING, __VA_ARGS__);                                                 \
    } while (0)
#define log_info(...)                                                                              \
    do {                                                                                           \
        if (log_current_level >= LOG_LVL_INFO)                                                     \
            log_msg(LOG_LVL_INFO, __VA_ARGS__);                                                    \
    } while (0)
#define log_debug(...)                                                                             \
    do {                                                                                           \
        if (log_current_level >= LOG_LVL_DEBUG)                                                    \
            log_msg(LOG_LVL_DEBUG, __VA_ARGS__);                                                   \
    } while (0)

#endif
