/* normalize.c - statement text with its literals replaced by $n, for running-query telemetry. */
#include "normalize.h"

#include <ctype.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct out_buf {
    char *p;
    size_t len, cap;
} out_buf;

static void put(out_buf *o, const char *s, size_t n)
{
    if (o->len + 1 >= o->cap)
        return;
    if (n > o->cap - 1 - o->len)
        n = o->cap - 1 - o->len;
    memcpy(o->p + o->len, s, n);
    o->len += n;
    o->p[o->len] = '\0';
}

static void put_param(out_buf *o, int n)
{
    char tmp[16];
    int len = snprintf(tmp, sizeof(tmp), "$%d", n);
    put(o, tmp, (size_t)len);
}

static bool ident_char(char c)
{
    return isalnum((unsigned char)c) || c == '_' || c == '$' || (unsigned char)c >= 0x80;
}

/* The highest $n already in the text, so that new numbers do not collide. */
static int highest_param(const char *s)
{
    int max = 0;
    for (const char *c = s; *c; c++) {
        if (*c == '$' && isdigit((unsigned char)c[1]) && (c == s || !ident_char(c[-1]))) {
            int n = atoi(c + 1);
            if (n > max)
                max = n;
        }
    }
    return max;
}

/* Length of a dollar-quote tag at s ("$$" or "$tag$"), 0 when s does not open one. */
static size_t dollar_tag(const char *s)
{
    if (s[0] != '$')
        return 0;
    size_t i = 1;
    if (isdigit((unsigned char)s[1]))
        return 0; /* a parameter */
    while (s[i] && (isalnum((unsigned char)s[i]) || s[i] == '_'))
        i++;
    return s[i] == '$' ? i + 1 : 0;
}

void normalize_sql(const char *in, char *out, size_t cap)
{
    out_buf o = {out, 0, cap};
    int next = highest_param(in) + 1;
    const char *s = in;

    if (cap == 0)
        return;
    out[0] = '\0';
    while (*s) {
        char c = *s;
        bool word_start = s == in || !ident_char(s[-1]);
        if (c == '-' && s[1] == '-') { /* comment to end of line */
            const char *e = strchr(s, '\n');
            size_t n = e ? (size_t)(e - s) : strlen(s);
            put(&o, s, n);
            s += n;
        } else if (c == '/' && s[1] == '*') {
            const char *e = strstr(s + 2, "*/");
            size_t n = e ? (size_t)(e + 2 - s) : strlen(s);
            put(&o, s, n);
            s += n;
        } else if (c == '"') { /* quoted identifier */
            const char *e = s + 1;
            while (*e && !(*e == '"' && e[1] != '"'))
                e += *e == '"' ? 2 : 1;
            size_t n = *e ? (size_t)(e + 1 - s) : strlen(s);
            put(&o, s, n);
            s += n;
        } else if (c == '\'' || ((c == 'E' || c == 'e') && s[1] == '\'' && word_start)) {
            bool backslash = c != '\'';
            const char *e = s + (backslash ? 2 : 1);
            while (*e) {
                if (backslash && *e == '\\' && e[1])
                    e += 2;
                else if (*e == '\'' && e[1] == '\'')
                    e += 2;
                else if (*e == '\'')
                    break;
                else
                    e++;
            }
            s = *e ? e + 1 : e;
            put_param(&o, next++);
        } else if (c == '$' && dollar_tag(s) && word_start) {
            size_t tag = dollar_tag(s);
            const char *e = s + tag;
            while (*e && strncmp(e, s, tag) != 0)
                e++;
            s = *e ? e + tag : e;
            put_param(&o, next++);
        } else if (isdigit((unsigned char)c) && word_start) {
            const char *e = s;
            while (isdigit((unsigned char)*e) || *e == '.')
                e++;
            if ((*e == 'e' || *e == 'E') &&
                (isdigit((unsigned char)e[1]) ||
                 ((e[1] == '+' || e[1] == '-') && isdigit((unsigned char)e[2]))))
                for (e += 2; isdigit((unsigned char)*e); e++)
                    ;
            if (ident_char(*e)) { /* part of an identifier after all, e.g. 1abc */
                put(&o, s, (size_t)(e - s));
            } else {
                put_param(&o, next++);
            }
            s = e;
        } else {
            put(&o, s, 1);
            s++;
        }
    }
}
