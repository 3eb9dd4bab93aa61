/* admin_render.c - console output: JSON results as tables, client text as safe UTF-8. */
#include "admin_console.h"
#include "utf8.h"

#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Client-supplied text from a fixed shared-memory field (cap bytes, NUL-terminated or not) as
 * a JSON string that is always valid UTF-8: each byte that is not part of well-formed UTF-8,
 * and each control character the JSON encoder would pass through raw (DEL, C1, bidirectional
 * overrides), becomes U+FFFD; C0 controls stay (the JSON encoder escapes them, the table shows
 * them escaped). With max_chars > 3, longer text is cut to max_chars
 * characters, the last three "...". Never NULL. */
json_t *admin_json_text(const char *field, size_t cap, size_t max_chars)
{
    const uint8_t *p = (const uint8_t *)field;
    size_t n = strnlen(field, cap), in = 0, out = 0, chars = 0, cut = 0;
    char *text = malloc(n * 3 + 4);
    json_t *result = NULL;
    if (!text)
        goto done;
    while (in < n) {
        uint32_t cp;
        size_t len = utf8_decode(p + in, n - in, &cp);
        if (len == 0 || (cp >= 0x7f && utf8_is_control(cp))) {
            memcpy(text + out, UTF8_REPLACEMENT, 3);
            out += 3;
        } else {
            memcpy(text + out, p + in, len);
            out += len;
        }
        in += len ? len : 1;
        chars++;
        if (max_chars > 3 && chars == max_chars - 3)
            cut = out;
    }
    if (max_chars > 3 && chars > max_chars) {
        memcpy(text + cut, "...", 3);
        out = cut + 3;
    }
    result = json_stringn(text, out);
done:
    free(text);
    return result ? result : json_null();
}

/* A string as one table cell of at most cap - 1 bytes, cut at a character boundary: tab and
 * line breaks become spaces, other control characters (utf8_is_control) are shown as \xNN or
 * \uNNNN, so that nothing reaches the operator's terminal that it would act on. */
static void cell_text(const char *s, size_t n, char *buf, size_t cap)
{
    const uint8_t *p = (const uint8_t *)s;
    size_t in = 0, out = 0;
    while (in < n) {
        char piece[8];
        size_t plen;
        uint32_t cp = 0;
        size_t len = utf8_decode(p + in, n - in, &cp);
        if (len == 0) /* not from jansson, which keeps strings valid; shown all the same */
            plen = (size_t)snprintf(piece, sizeof(piece), "\\x%02x", p[in]);
        else if (cp == '\t' || cp == '\n' || cp == '\r')
            plen = (size_t)snprintf(piece, sizeof(piece), " ");
        else if (utf8_is_control(cp))
            plen = (size_t)snprintf(piece, sizeof(piece), cp < 0x100 ? "\\x%02x" : "\\u%04x",
                                    (unsigned)cp);
        else {
            memcpy(piece, p + in, len);
            plen = len;
        }
        if (out + plen >= cap)
            break;
        memcpy(buf + out, piece, plen);
        out += plen;
        in += len ? len : 1;
    }
    if (cap > 0)
        buf[out] = '\0';
}

static void json_cell(json_t *v, char *buf, size_t len)
{
    if (!v) { /* a row without this column */
        snprintf(buf, len, "-");
        return;
    }
    switch (json_typeof(v)) {
    case JSON_STRING:
        cell_text(json_string_value(v), json_string_length(v), buf, len);
        break;
    case JSON_INTEGER:
        snprintf(buf, len, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        break;
    case JSON_REAL:
        snprintf(buf, len, "%.3f", json_real_value(v));
        break;
    case JSON_TRUE:
        snprintf(buf, len, "yes");
        break;
    case JSON_FALSE:
        snprintf(buf, len, "no");
        break;
    case JSON_NULL:
        snprintf(buf, len, "-");
        break;
    default:
        snprintf(buf, len, "...");
    }
}

/* Characters (not bytes) of a valid UTF-8 string: what a column is wide. */
static size_t cell_width(const char *s)
{
    size_t w = 0;
    for (; *s; s++)
        w += ((unsigned char)*s & 0xc0) != 0x80;
    return w;
}

/* One cell padded to width characters, then two spaces, or a newline after the last. */
static void put_cell(struct evbuffer *out, const char *text, size_t width, bool last)
{
    static const char spaces[] = "                                "; /* 32 */
    evbuffer_add(out, text, strlen(text));
    if (last) {
        evbuffer_add(out, "\n", 1);
        return;
    }
    size_t pad = width + 2 - cell_width(text);
    while (pad > 0) {
        size_t n = pad < sizeof(spaces) - 1 ? pad : sizeof(spaces) - 1;
        evbuffer_add(out, spaces, n);
        pad -= n;
    }
}

/* An array of objects as aligned columns under a header of their keys (those of the first
 * row; a row that lacks one shows "-"). */
static void render_table(struct evbuffer *out, json_t *rows)
{
    size_t n = json_array_size(rows);
    if (n == 0) {
        evbuffer_add_printf(out, "(none)\n");
        return;
    }
    json_t *first = json_array_get(rows, 0);
    size_t ncol = json_object_size(first);
    const char **keys = calloc(ncol ? ncol : 1, sizeof(*keys));
    size_t *width = calloc(ncol ? ncol : 1, sizeof(*width));
    char cell[512];
    if (!keys || !width)
        goto done;
    size_t c = 0;
    const char *key;
    json_t *v;
    json_object_foreach(first, key, v)
    {
        keys[c] = key;
        width[c] = cell_width(key);
        c++;
    }
    for (size_t r = 0; r < n; r++)
        for (c = 0; c < ncol; c++) {
            json_cell(json_object_get(json_array_get(rows, r), keys[c]), cell, sizeof(cell));
            if (cell_width(cell) > width[c])
                width[c] = cell_width(cell);
        }
    for (c = 0; c < ncol; c++)
        put_cell(out, keys[c], width[c], c + 1 == ncol);
    for (size_t r = 0; r < n; r++)
        for (c = 0; c < ncol; c++) {
            json_cell(json_object_get(json_array_get(rows, r), keys[c]), cell, sizeof(cell));
            put_cell(out, cell, width[c], c + 1 == ncol);
        }
done:
    free(keys);
    free(width);
}

/* Scalars of an object as "key  value" lines, then its arrays as tables. */
void admin_render(struct evbuffer *out, json_t *result)
{
    if (json_is_array(result)) {
        render_table(out, result);
        return;
    }
    const char *key;
    json_t *v;
    size_t width = 0;
    char cell[512];
    json_object_foreach(result, key, v) if (!json_is_array(v) && strlen(key) > width) width =
        strlen(key);
    json_object_foreach(result, key, v)
    {
        if (json_is_array(v))
            continue;
        json_cell(v, cell, sizeof(cell));
        evbuffer_add_printf(out, "%-*s  %s\n", (int)width, key, cell);
    }
    json_object_foreach(result, key, v)
    {
        if (!json_is_array(v))
            continue;
        evbuffer_add_printf(out, "\n");
        render_table(out, v);
    }
}
