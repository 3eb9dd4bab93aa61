/* log.c - leveled logging to stderr; one line per message, prefixed with time, process and level. */
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

log_level log_current_level = LOG_LVL_INFO;

static char log_process[32] = "pgrelay";

static const char *const log_level_names[] = {
    [LOG_LVL_ERROR] = "error",
    [LOG_LVL_WARNING] = "warning",
    [LOG_LVL_INFO] = "info",
    [LOG_LVL_DEBUG] = "debug",
};

void log_set_process(const char *tag)
{
    snprintf(log_process, sizeof(log_process), "%s", tag);
}

int log_level_parse(const char *name)
{
    for (size_t i = 0; i < sizeof(log_level_names) / sizeof(log_level_names[0]); i++)
        if (strcasecmp(name, log_level_names[i]) == 0)
            return (int)i;
    return -1;
}

const char *log_level_name(log_level level)
{
    return log_level_names[level];
}

void log_msg(log_level level, const char *fmt, ...)
{
    char line[2048];
    struct timeval tv;
    struct tm tm;
    size_t off;
    va_list ap;

    if (level > log_current_level)
        return;
    gettimeofday(&tv, NULL);
    localtime_r(&tv.tv_sec, &tm);
    off = strftime(line, sizeof(line), "%Y-%m-%d %H:%M:%S", &tm);
    off += (size_t)snprintf(line + off, sizeof(line) - off, ".%03d [%s pid %d] %s: ",
                            (int)(tv.tv_usec / 1000), log_process, (int)getpid(),
                            log_level_names[level]);
    va_start(ap, fmt);
    int n = vsnprintf(line + off, sizeof(line) - off - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    off += (size_t)n;
    if (off > sizeof(line) - 2)
        off = sizeof(line) - 2;
    line[off++] = '\n';
    /* One write per line so that lines of concurrent processes do not interleave. */
    ssize_t w = write(STDERR_FILENO, line, off);
    (void)w;
}
