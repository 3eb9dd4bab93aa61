/* daemon.c - pidfile and detaching, shared by pgrelay and pgrelay-control. */
#include "daemon.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

int daemon_pidfile_lock(const char *prog, const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        fprintf(stderr, "%s: cannot open pidfile %s: %s\n", prog, path, strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        char buf[32] = "";
        ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
        buf[n > 0 ? n : 0] = '\0';
        buf[strcspn(buf, "\n")] = '\0';
        fprintf(stderr, "%s: already running (pid %s holds pidfile %s)\n", prog,
                buf[0] ? buf : "?", path);
        close(fd);
        return -1;
    }
    return fd;
}

int daemon_pidfile_write(int fd, const char *path)
{
    char buf[32];
    int len = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, buf, (size_t)len, 0) != len) {
        log_error("cannot write pidfile %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

void daemon_pidfile_abandon(int fd, const char *path)
{
    if (fd < 0)
        return;
    unlink(path); /* still locked by us: nobody else can be using it */
    close(fd);
}

int daemon_detach(void)
{
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid > 0)
        _exit(0);
    if (setsid() < 0)
        return -1;
    pid = fork();
    if (pid < 0)
        return -1;
    if (pid > 0)
        _exit(0);
    if (chdir("/") != 0)
        return -1;
    int fd = open("/dev/null", O_RDWR);
    if (fd >= 0) {
        dup2(fd, STDIN_FILENO);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        if (fd > STDERR_FILENO)
            close(fd);
    }
    return 0;
}
