/* log.c - leveled logging to stderr, a file or syslog; one line per message, naming the process. */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

log_level log_current_level = LOG_LVL_INFO;

static char log_process[32] = "pgrelay";
static int log_file_fd = -1;        /* -1: stderr */
static char log_file_path[1024];
static char log_syslog_ident[64];
static int log_syslog_on;

static const char *const log_level_names[] = {
    [LOG_LVL_ERROR] = "error",
    [LOG_LVL_WARNING] = "warning",
    [LOG_LVL_INFO] = "info",
    [LOG_LVL_DEBUG] = "debug",
};

static const int log_syslog_priority[] = {
    [LOG_LVL_ERROR] = LOG_ERR,
    [LOG_LVL_WARNING] = LOG_WARNING,
    [LOG_LVL_INFO] = LOG_INFO,
    [LOG_LVL_DEBUG] = LOG_DEBUG,
};

static const struct {
    const char *name;
    int facility;
} log_facilities[] = {
    {"daemon", LOG_DAEMON}, {"user", LOG_USER},     {"local0", LOG_LOCAL0},
    {"local1", LOG_LOCAL1}, {"local2", LOG_LOCAL2}, {"local3", LOG_LOCAL3},
    {"local4", LOG_LOCAL4}, {"local5", LOG_LOCAL5}, {"local6", LOG_LOCAL6},
    {"local7", LOG_LOCAL7},
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

int log_open_file(const char *path)
{
    if (!path || !*path) {
        if (log_file_fd >= 0)
            close(log_file_fd);
        log_file_fd = -1;
        log_file_path[0] = '\0';
        return 0;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (fd < 0)
        return -1;
    if (log_file_fd >= 0)
        close(log_file_fd);
    log_file_fd = fd;
    snprintf(log_file_path, sizeof(log_file_path), "%s", path);
    return 0;
}

int log_reopen(void)
{
    if (log_file_fd < 0)
        return 0;
    char path[sizeof(log_file_path)];
    memcpy(path, log_file_path, sizeof(path));
    return log_open_file(path);
}

int log_fd(void)
{
    return log_file_fd >= 0 ? log_file_fd : STDERR_FILENO;
}

int log_open_syslog(const char *ident, const char *facility)
{
    for (size_t i = 0; i < sizeof(log_facilities) / sizeof(log_facilities[0]); i++) {
        if (strcasecmp(facility, log_facilities[i].name) == 0) {
            /* openlog keeps the pointer: keep the text alive here. */
            snprintf(log_syslog_ident, sizeof(log_syslog_ident), "%s", ident);
            openlog(log_syslog_ident, LOG_PID | LOG_NDELAY, log_facilities[i].facility);
            log_syslog_on = 1;
            return 0;
        }
    }
    return -1;
}

void log_close_syslog(void)
{
    if (log_syslog_on)
        closelog();
    log_syslog_on = 0;
}

void log_msg(log_level level, const char *fmt, ...)
{
    char line[2048];
    struct timeval tv;
    struct tm tm;
    size_t off, body;
    va_list ap;
    int saved = errno;

    if (level > log_current_level)
        return;
    gettimeofday(&tv, NULL);
    localtime_r(&tv.tv_sec, &tm);
    off = strftime(line, sizeof(line), "%Y-%m-%d %H:%M:%S", &tm);
    off += (size_t)snprintf(line + off, sizeof(line) - off, ".%03d [%s pid %d] %s: ",
                            (int)(tv.tv_usec / 1000), log_process, (int)getpid(),
                            log_level_names[level]);
    body = off;
    va_start(ap, fmt);
    int n = vsnprintf(line + off, sizeof(line) - off - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    off += (size_t)n;
    if (off > sizeof(line) - 2)
        off = sizeof(line) - 2;
    if (log_syslog_on) {
        line[off] = '\0';
        /* syslog adds time and pid itself; keep the process tag. */
        syslog(log_syslog_priority[level], "[%s] %s", log_process, line + body);
    }
    line[off++] = '\n';
    /* One write per line so that lines of concurrent processes do not interleave. */
    ssize_t w = write(log_fd(), line, off);
    (void)w;
    errno = saved;
}
