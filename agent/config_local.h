/* config_local.h - the configuration version this proxy claims, checked against its file
 * (PATH.version: the version and a SHA-256 digest of it with its text). */
#ifndef PGRELAY_CONFIG_LOCAL_H
#define PGRELAY_CONFIG_LOCAL_H

#include <stddef.h>
#include <stdint.h>

/* At start: read PATH.version beside path and check path against it. kept: the version the
 * master's shared memory kept (an agent restart), used when PATH.version names none. Returns
 * the version recorded (claimed or not; 0: none). */
int64_t config_local_init(const char *path, int64_t kept);

/* Hash path again if it changed since last time (reporter, before each metrics report). */
void config_local_check(const char *path);

/* An apply is about to write path: no check until config_local_end. */
void config_local_begin(void);

/* The apply ended. version > 0: path now holds text as that version, and line (len bytes)
 * receives PATH.version's new line for the caller to write; returns 0. version 0 (the apply
 * failed): returns 1, nothing to write. -1 when the digest cannot be computed. */
int config_local_end(const char *path, int64_t version, const char *text, char *line, size_t len);

/* The version to report: the recorded one while path matches it, else 0. */
int64_t config_local_claimed(void);

/* The version path no longer matches (a local edit, or PATH.version edited), or 0. */
int64_t config_local_diverged(void);

#endif
