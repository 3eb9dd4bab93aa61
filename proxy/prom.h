/* prom.h - the proxy's metrics in Prometheus' text exposition format (prom.c). */
#ifndef PGRELAY_PROM_H
#define PGRELAY_PROM_H

#include "master.h"

#include <event2/buffer.h>

/* Append every metric, with HELP and TYPE lines, to out. */
void prom_write(master *m, struct evbuffer *out);

#endif
