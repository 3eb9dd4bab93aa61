/* net.h - socket helpers: listening, non-blocking connects, socket options, address text. */
#ifndef PGRELAY_NET_H
#define PGRELAY_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

/* Open a non-blocking listening TCP socket on addr:port ("*" = every address). Returns the fd,
 * or -1 with a message naming the address and the reason in err. */
int net_listen(const char *addr, int port, char *err, size_t errlen);

/* n listening sockets on addr:port in one SO_REUSEPORT group (one per worker: the kernel
 * spreads new connections over them by a hash of the client's address and port); a plain
 * socket when n is 1. A port some socket already listens on is refused ("bind: Address
 * already in use"), as by net_listen. 0 with fds[0..n-1] set, or -1 with err set (none open). */
int net_listen_group(const char *addr, int port, int n, int *fds, char *err, size_t errlen);

/* Start a non-blocking connect; returns the fd (connection may still be in progress), or -1
 * with *err set to the errno. */
int net_connect_nonblock(const struct sockaddr_storage *addr, socklen_t len, bool keepalive,
                         int *err);

/* TCP_NODELAY and, if asked, SO_KEEPALIVE (ignored for Unix sockets). */
void net_tune_socket(int fd, bool keepalive);

/* "1.2.3.4:5678", "[::1]:5678" or "unix". */
void net_format_addr(const struct sockaddr_storage *addr, socklen_t len, char *buf, size_t cap);

#endif
