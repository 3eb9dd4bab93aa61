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

int net_listen(const char *addr, int port, char *err, size_t errlen)
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
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (res->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, res->ai_addr, res->ai_addrlen) != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: bind: %s", addr, port, strerror(errno));
        goto failed;
    }
    if (listen(fd, LISTEN_BACKLOG) != 0) {
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
