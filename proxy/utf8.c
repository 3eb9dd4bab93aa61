/* utf8.c - UTF-8 decoding for client-supplied text that is shown to operators. */
#include "utf8.h"

#include <string.h>

size_t utf8_decode(const uint8_t *p, size_t n, uint32_t *cp)
{
    size_t len;
    uint32_t c, min;

    if (n == 0)
        return 0;
    if (p[0] < 0x80) {
        *cp = p[0];
        return 1;
    }
    if ((p[0] & 0xe0) == 0xc0) {
        len = 2;
        c = p[0] & 0x1f;
        min = 0x80;
    } else if ((p[0] & 0xf0) == 0xe0) {
        len = 3;
        c = p[0] & 0x0f;
        min = 0x800;
    } else if ((p[0] & 0xf8) == 0xf0) {
        len = 4;
        c = p[0] & 0x07;
        min = 0x10000;
    } else {
        return 0; /* a continuation byte, or 0xf8..0xff */
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        c = (c << 6) | (p[i] & 0x3f);
    }
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
        return 0;
    *cp = c;
    return len;
}

bool utf8_is_control(uint32_t cp)
{
    return cp < 0x20 || (cp >= 0x7f && cp <= 0x9f) || (cp >= 0x202a && cp <= 0x202e) ||
           (cp >= 0x2066 && cp <= 0x2069);
}

void utf8_copy_printable(char *dst, size_t cap, const char *src)
{
    const uint8_t *p = (const uint8_t *)src;
    size_t in = 0, out = 0;
    if (cap == 0)
        return;
    while (p[in]) {
        uint32_t cp;
        size_t len = utf8_decode(p + in, strnlen(src + in, 4), &cp);
        bool keep = len > 0 && !utf8_is_control(cp);
        size_t put = keep ? len : 1;
        if (out + put > cap - 1)
            break;
        if (keep)
            memcpy(dst + out, p + in, len);
        else
            dst[out] = '?';
        out += put;
        in += len ? len : 1;
    }
    dst[out] = '\0';
}
