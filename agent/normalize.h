/* normalize.h - statement text with its literals replaced by $n, for running-query telemetry. */
#ifndef PGRELAY_NORMALIZE_H
#define PGRELAY_NORMALIZE_H

#include <stddef.h>

/* Copy SQL text `in` into out (cap bytes, always NUL-terminated), replacing string literals
 * ('...', E'...', $tag$...$tag$) and numeric literals with $1, $2, ... numbered after the
 * highest parameter already in the text. Identifiers, quoted identifiers, comments and
 * parameters stay as they are. */
void normalize_sql(const char *in, char *out, size_t cap);

#endif
