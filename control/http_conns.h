/* http_conns.h - the HTTP server's connections: listen backlog, connection cap, idle timeout. */
#ifndef PGRELAY_HTTP_CONNS_H
#define PGRELAY_HTTP_CONNS_H

#include <event2/http.h>
#include <stddef.h>

struct bufferevent;

/* Listen on addr:port (backlog HTTP_CONNS_BACKLOG) for evhttp, with accept errors handled and
 * the idle sweep started. The bound socket, or NULL with err filled in. */
struct evhttp_bound_socket *http_conns_listen(struct evhttp *http, const char *addr, int port,
                                              char *err, size_t err_len);

/* Follow a connection evhttp is accepting (its bufferevent, returned as is). */
struct bufferevent *http_conns_track(struct bufferevent *bev);

/* A request of a connection was read / is being answered: busy, then idle again. */
void http_conns_request(struct evhttp_request *req);
void http_conns_answered(struct evhttp_request *req);

/* max_connections after a reload. */
void http_conns_apply_config(void);

/* Connections open now. */
int http_conns_open(void);

/* Before evhttp_free: stop the timers. After it: forget what is left. */
void http_conns_stop(void);
void http_conns_release(void);

#endif
