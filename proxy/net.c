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

/* One socket bound to sa; listening unless probe (then only bound, to see whether the port is
 * free). reuseport joins the group of SO_REUSEPORT sockets of this process; dual (an IPv6
 * wildcard) also takes IPv4 connections. err names addr:port. */
static int net_bind_sockaddr(const struct sockaddr *sa, socklen_t salen, bool dual,
                             const char *addr, int port, bool reuseport, bool probe, char *err,
                             size_t errlen)
{
    int one = 1, v6only = dual ? 0 : 1;
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: socket: %s", addr, port, strerror(errno));
        return -1;
    }
    /* SO_REUSEADDR: connections of an earlier run in TIME_WAIT do not block the port; a
     * listening socket still does (Linux) */
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: SO_REUSEPORT: %s", addr, port,
                 strerror(errno));
        goto failed;
    }
    if (sa->sa_family == AF_INET6 &&
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only)) != 0 && dual) {
        snprintf(err, errlen, "cannot listen on %s:%d: IPV6_V6ONLY: %s", addr, port,
                 strerror(errno));
        goto failed;
    }
    if (bind(fd, sa, salen) != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: bind: %s", addr, port, strerror(errno));
        goto failed;
    }
    if (!probe && listen(fd, LISTEN_BACKLOG) != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: listen: %s", addr, port,
                 strerror(errno));
        goto failed;
    }
    return fd;

failed:
    close(fd);
    return -1;
}

/* One socket bound to addr:port (see net_bind_sockaddr). "*" is every address: one dual-stack
 * socket on the IPv6 wildcard, which takes IPv4 connections too, or the IPv4 wildcard alone
 * where the kernel has no IPv6. */
static int net_bind(const char *addr, int port, bool reuseport, bool probe, char *err,
                    size_t errlen)
{
    if (strcmp(addr, "*") == 0) {
        struct sockaddr_in6 any6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port),
                                    .sin6_addr = IN6ADDR_ANY_INIT};
        int probe_fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe_fd >= 0) {
            close(probe_fd);
            return net_bind_sockaddr((const struct sockaddr *)&any6, sizeof(any6), true, addr,
                                     port, reuseport, probe, err, errlen);
        }
        struct sockaddr_in any4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                   .sin_addr = {htonl(INADDR_ANY)}};
        return net_bind_sockaddr((const struct sockaddr *)&any4, sizeof(any4), false, addr, port,
                                 reuseport, probe, err, errlen);
    }
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res = NULL;
    char service[16];
    snprintf(service, sizeof(service), "%d", port);
    int rc = getaddrinfo(addr, service, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", addr, port, gai_strerror(rc));
        return -1;
    }
    int fd = net_bind_sockaddr(res->ai_addr, res->ai_addrlen, false, addr, port, reuseport, probe,
                               err, errlen);
    freeaddrinfo(res);
    return fd;
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
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            /* an IPv4 client of a dual-stack socket (listen_addr = *): shown as IPv4 */
            inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], host, sizeof(host));
            snprintf(buf, cap, "%s:%d", host, ntohs(in6->sin6_port));
            return;
        }
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
        snprintf(buf, cap, "[%s]:%d", host, ntohs(in6->sin6_port));
    } else {
        snprintf(buf, cap, "unix");
    }
}
