/* net.c - socket helpers: listening, non-blocking connects, socket options, address text. */
#include "net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

#define LISTEN_BACKLOG 4096 /* the kernel caps it at net.core.somaxconn */

/* One socket bound to addr:port; listening unless probe (then only bound, to see whether the
 * port is free). reuseport joins the group of SO_REUSEPORT sockets of this process. */
static int net_bind(const char *addr, int port, bool reuseport, bool probe, char *err,
                    size_t errlen)
{
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res = NULL;
    char service[16];
    int fd = -1, one = 1;
    const char *host = strcmp(addr, "*") == 0 ? NULL : addr;

    snprintf(service, sizeof(service), "%d", port);
    int rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", addr, port, gai_strerror(rc));
        return -1;
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: socket: %s", addr, port, strerror(errno));
        goto failed;
    }
    /* SO_REUSEADDR: connections of an earlier run in TIME_WAIT do not block the port; a
     * listening socket still does (Linux) */
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: SO_REUSEPORT: %s", addr, port,
                 strerror(errno));
        goto failed;
    }
    if (res->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, res->ai_addr, res->ai_addrlen) != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: bind: %s", addr, port, strerror(errno));
        goto failed;
    }
    if (!probe && listen(fd, LISTEN_BACKLOG) != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: listen: %s", addr, port,
                 strerror(errno));
        goto failed;
    }
    freeaddrinfo(res);
    return fd;

failed:
    if (fd >= 0)
        close(fd);
    freeaddrinfo(res);
    return -1;
}

int net_listen(const char *addr, int port, char *err, size_t errlen)
{
    return net_bind(addr, port, false, false, err, errlen);
}

int net_listen_group(const char *addr, int port, int n, int *fds, char *err, size_t errlen)
{
    if (n <= 1) {
        fds[0] = net_listen(addr, port, err, errlen);
        return fds[0] < 0 ? -1 : 0;
    }
    /* SO_REUSEPORT would let a second pgrelay (same user) join the group silently and take
     * part of the connections: a plain bind first says "in use" as for a single socket */
    int probe = net_bind(addr, port, false, true, err, errlen);
    if (probe < 0)
        return -1;
    close(probe);
    for (int i = 0; i < n; i++) {
        fds[i] = net_bind(addr, port, true, false, err, errlen);
        if (fds[i] < 0) {
            while (i-- > 0) {
                close(fds[i]);
                fds[i] = -1;
            }
            return -1;
        }
    }
    return 0;
}

void net_tune_socket(int fd, bool keepalive)
{
    int one = 1;
    /* Both fail harmlessly (EOPNOTSUPP) on Unix sockets. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (keepalive)
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
}

int net_connect_nonblock(const struct sockaddr_storage *addr, socklen_t len, bool keepalive,
                         int *err)
{
    int fd = socket(addr->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *err = errno;
        return -1;
    }
    if (addr->ss_family != AF_UNIX)
        net_tune_socket(fd, keepalive);
    if (connect(fd, (const struct sockaddr *)addr, len) != 0 && errno != EINPROGRESS &&
        errno != EAGAIN) {
        *err = errno;
        close(fd);
        return -1;
    }
    return fd;
}

void net_format_addr(const struct sockaddr_storage *addr, socklen_t len, char *buf, size_t cap)
{
    char host[INET6_ADDRSTRLEN];
    (void)len;
    if (addr->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
        snprintf(buf, cap, "%s:%d", host, ntohs(in->sin_port));
    } else if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
        snprintf(buf, cap, "[%s]:%d", host, ntohs(in6->sin6_port));
    } else {
        snprintf(buf, cap, "unix");
    }
}
