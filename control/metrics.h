/* metrics.h - /metrics: Prometheus text exposition of the control plane and its proxies. */
#ifndef PGRELAY_METRICS_H
#define PGRELAY_METRICS_H

#include "http.h"

void metrics_handle(http_call *call);

#endif
