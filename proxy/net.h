/* net.h - socket helpers: listening, non-blocking connects, socket options, address text. */
#ifndef PGRELAY_NET_H
#define PGRELAY_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

/* Open a non-blocking listening TCP socket on addr:port ("*" = every address). Returns the fd,
 * or -1 with a message naming the address and the reason in err. */
int net_listen(const char *addr, int port, char *err, size_t errlen);

/* Start a non-blocking connect; returns the fd (connection may still be in progress), or -1
 * with *err set to the errno. */
int net_connect_nonblock(const struct sockaddr_storage *addr, socklen_t len, bool keepalive,
                         int *err);

/* TCP_NODELAY and, if asked, SO_KEEPALIVE (ignored for Unix sockets). */
void net_tune_socket(int fd, bool keepalive);

/* "1.2.3.4:5678", "[::1]:5678" or "unix". */
void net_format_addr(const struct sockaddr_storage *addr, socklen_t len, char *buf, size_t cap);

#endif
