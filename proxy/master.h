/* master.h - the master process: listen sockets, shared memory, worker supervision, signals. */
#ifndef PGRELAY_MASTER_H
#define PGRELAY_MASTER_H

#include "config.h"

/* Run the master with an open, validated listen socket. Returns the process exit code. */
int master_run(config *cfg, int listen_fd, const char *pidfile);

#endif
