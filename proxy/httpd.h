/* httpd.h - the master's HTTP endpoint: health checks and Prometheus metrics (httpd.c). */
#ifndef PGRELAY_HTTPD_H
#define PGRELAY_HTTPD_H

#include "master.h"

/* Listen on http_listen_addr:http_listen_port when the port is set. 0, or -1 (logged) when the
 * socket cannot be opened. */
int httpd_start(master *m);

/* Close the listening socket and every connection. */
void httpd_stop(void);

/* In a freshly forked child: close the descriptors without touching the event loop. */
void httpd_close_in_child(void);

#endif
