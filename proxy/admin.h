/* admin.h - the admin console: a Unix socket in the master that answers one command per line. */
#ifndef PGRELAY_ADMIN_H
#define PGRELAY_ADMIN_H

struct master;

/* Open the admin socket named by the configuration (none when admin_socket is empty).
 * Returns 0, or -1 after logging why (path in use by a live pgrelay, permissions...). */
int admin_start(struct master *m);

/* Stop accepting and remove the socket file (shutdown). */
void admin_stop_listening(void);

/* In a freshly forked worker: close the descriptors the console holds. */
void admin_close_in_child(void);

#endif
