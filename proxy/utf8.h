/* utf8.h - UTF-8 decoding for client-supplied text that is shown to operators. */
#ifndef PGRELAY_UTF8_H
#define PGRELAY_UTF8_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define UTF8_REPLACEMENT "\xef\xbf\xbd" /* U+FFFD, stands for bytes that are not UTF-8 */

/* Length (1 to 4) of the well-formed UTF-8 character at p, with n bytes readable there, and
 * its code point in *cp; 0 when the bytes do not start one: a stray continuation or invalid
 * lead byte, a bad continuation, an overlong form, a surrogate, a code point above U+10FFFF,
 * or a character cut short by n. */
size_t utf8_decode(const uint8_t *p, size_t n, uint32_t *cp);

/* Does a terminal act on this code point rather than print it? C0 controls, DEL, C1 controls,
 * and the bidirectional embeddings, overrides and isolates (which reorder what follows). */
bool utf8_is_control(uint32_t cp);

/* Copy client-supplied text into a fixed field of cap bytes for display: at most cap - 1 bytes,
 * cut at a character boundary, each byte that is not part of well-formed UTF-8 and each control
 * character (utf8_is_control) replaced by '?'. dst is always valid, printable UTF-8. */
void utf8_copy_printable(char *dst, size_t cap, const char *src);

#endif
