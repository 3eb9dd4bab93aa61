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
