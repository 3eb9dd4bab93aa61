/* daemon.h - what pgrelay and pgrelay-control share to run as daemons: the locked pidfile and
 * detaching from the terminal. */
#ifndef PGRELAY_DAEMON_H
#define PGRELAY_DAEMON_H

/* Open and lock the pidfile so that a second instance refuses to start; the problem goes to
 * stderr prefixed with prog. Returns the open fd, or -1. */
int daemon_pidfile_lock(const char *prog, const char *path);

/* Write our pid into the locked pidfile (after daemon_detach: the pid has changed). */
int daemon_pidfile_write(int fd, const char *path);

/* Not starting after all (or stopping): remove the pidfile we hold locked, then close it. */
void daemon_pidfile_abandon(int fd, const char *path);

/* Fork, new session, fork again, chdir /; stdin, stdout and stderr go to /dev/null (the caller
 * has made sure logs go to a file or syslog). 0, or -1 in the original process. */
int daemon_detach(void);

#endif
